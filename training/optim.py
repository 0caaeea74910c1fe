"""Optimisers and learning-rate schedules of the learners and of phi, from the config.

theta: SGD with ``momentum`` (the original) or AdamW (``theta_optimizer``); phi: Adam (the original). Schedules
(``lr_schedule``): ``cosine`` (FOSTER's, ``T_max`` = the stage's epochs) or ``multistep`` (DER's: ``lr_decay`` at
``init_milestones`` / ``incre_milestones``); ``auto`` is the learner's own.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["theta_optimizer", "phi_optimizer", "lr_scheduler"]


def theta_optimizer(cfg, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The backbone/classifier optimiser of ``cfg.theta_optimizer``: SGD with ``cfg.momentum`` (the original) or
    AdamW."""
    if cfg.theta_optimizer == "adamw":
        return torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(list(params), lr=lr, momentum=cfg.momentum, weight_decay=weight_decay)


def phi_optimizer(cfg, params, *, first_phase: bool) -> torch.optim.Optimizer:
    """Adam over the rational coefficients at the phase's ``*_phi_lr`` and ``*_weight_decay`` (the original)."""
    return torch.optim.Adam(list(params), lr=cfg.init_phi_lr if first_phase else cfg.incre_phi_lr,
                            weight_decay=cfg.init_weight_decay if first_phase else cfg.incre_weight_decay)


def lr_scheduler(optimizer: torch.optim.Optimizer, kind: str, *, epochs: int, milestones: Sequence[int] = (),
                 gamma: float = 0.1) -> torch.optim.lr_scheduler.LRScheduler:
    """``cosine`` over ``epochs`` (at least 1) or ``multistep`` at ``milestones`` by ``gamma``."""
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    if kind == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma)
    raise ValueError(f"lr_schedule: expected 'cosine' or 'multistep', got {kind!r}")
