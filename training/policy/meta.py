"""CIM's phi training: the rational coefficients' optimiser and the meta-iterations run after each epoch.

Each epoch of the learner's training stage ends with ``num_meta_iters`` meta-iterations (default
``int(num_meta_iters_per_cls * new classes)``, the original FOSTER's count) on batches of ``meta_batch_size`` drawn
from the new-class images and the memory; each is :func:`training.cim.meta_step` with the learner's
:class:`InnerStep`. Every rank runs the same meta-steps on the same (unsharded) batches; phi is re-synchronised
afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch

from .. import cim as cim_lib
from ..models import split_parameters
from ..optim import phi_optimizer

__all__ = ["InnerStep", "PhiLearner", "meta_iterations"]


@dataclass
class InnerStep:
    """What a learner's meta-step differentiates through: the inner loss of the ReLU branch on the softly compressed
    batch, ``loss(outputs, labels) -> Tensor`` (the learner's own training loss), the inner SGD step's lr, phi's
    gradient-norm clip (None: none) and the weight of the CAM regulariser in the outer loss."""

    loss: Callable
    lr: float
    max_grad_norm: Union[float, None]
    reg_coef: float


def meta_iterations(cfg, new_classes: int) -> int:
    """Meta-iterations per epoch: ``num_meta_iters`` if set (the original DER's key), else
    ``int(num_meta_iters_per_cls * new_classes)`` (the original FOSTER's)."""
    if cfg.num_meta_iters is not None:
        return int(cfg.num_meta_iters)
    return cim_lib.num_meta_iters(cfg.num_meta_iters_per_cls, new_classes)


class PhiLearner:
    """phi's Adam optimiser and schedule for one training stage, and the meta-iterations of each epoch."""

    def __init__(self, *, cfg, runtime, loader):
        self.cfg, self.runtime, self.loader = cfg, runtime, loader
        self.optimizer: Union[torch.optim.Optimizer, None] = None
        self.scheduler = None

    @property
    def active(self) -> bool:
        return self.optimizer is not None

    def begin(self, phase, network, scheduler: Callable) -> None:
        """Adam over ``network``'s trainable rational coefficients, scheduled by ``scheduler(optimizer)``."""
        _, phi = split_parameters(network)
        self.optimizer = phi_optimizer(self.cfg, phi.values(), first_phase=phase.index == 0)
        self.scheduler = scheduler(self.optimizer)

    def end(self) -> None:
        self.optimizer = self.scheduler = None

    def epoch(self, phase, network, dataset: Callable, inner: InnerStep) -> dict:
        """The epoch's meta-iterations on ``dataset()`` (mean losses), then one step of phi's schedule."""
        cfg, rt = self.cfg, self.runtime
        iters = meta_iterations(cfg, phase.new_classes)
        totals: dict = {}
        skipped = 0
        if iters:
            batches = cim_lib.meta_batches(self.loader(dataset(), cfg.meta_batch_size, shuffle=True, shard=False))
            to = lambda b: (rt.to_device(b[0], image=True), rt.to_device(b[1]))  # noqa: E731
            for _ in range(iters):
                first, second = next(batches), next(batches)
                out = cim_lib.meta_step(network, to(first), to(second), phi_optimizer=self.optimizer,
                                        inner_lr=inner.lr, compress_ratio=cfg.compress_ratio, div_coef=cfg.div_coef,
                                        reg_coef=inner.reg_coef, max_grad_norm=inner.max_grad_norm,
                                        inner_loss=inner.loss, autocast=rt.autocast, meta_gradient=cfg.meta_gradient)
                if float(out.pop("skipped")):
                    skipped += 1  # a non-finite step, not applied: left out of the means, counted
                    continue
                for key, value in out.items():
                    totals[key] = totals.get(key, 0.0) + float(value)
            rt.broadcast_tensors(split_parameters(network)[1].values())
        self.scheduler.step()
        numbers = {f"meta_{key}": value / (iters - skipped) for key, value in totals.items()}
        if skipped:
            numbers["meta_skipped"] = float(skipped)
        return numbers

    def state_dict(self) -> Union[dict, None]:
        if not self.active:
            return None
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: Union[dict, None], phase, network, scheduler: Callable) -> None:
        self.end()
        if state is not None:
            self.begin(phase, network, scheduler)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
