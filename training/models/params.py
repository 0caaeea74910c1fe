"""Parameter groups and fast weights of the networks: theta (everything but the rational coefficients) and phi (the
rational coefficients), and forwards with some parameters replaced (:func:`torch.func.functional_call`, never a
second hand-written module)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from cim_ext.nn import Rational

__all__ = ["rational_modules", "split_parameters", "functional_forward"]


def rational_modules(model: nn.Module) -> Iterable[tuple[str, Rational]]:
    return ((name, m) for name, m in model.named_modules() if isinstance(m, Rational))


def split_parameters(model: nn.Module, *, trainable_only: bool = True) -> tuple[dict, dict]:
    """(theta, phi): name -> parameter dicts; phi are the rational coefficients, theta everything else."""
    phi_names = {
        f"{prefix}.{pname}" if prefix else pname
        for prefix, module in rational_modules(model)
        for pname, _ in module.named_parameters(recurse=False)
    }
    theta, phi = {}, {}
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        (phi if name in phi_names else theta)[name] = p
    return theta, phi


def functional_forward(model: nn.Module, params: dict, x: torch.Tensor, activation: str = "relu") -> dict:
    """``model(x, activation)`` with some parameters/buffers replaced by ``params`` (fast weights), via
    :func:`torch.func.functional_call`; names not in ``params`` use the module's own tensors."""
    return torch.func.functional_call(model, params, (x,), {"activation": activation}, strict=False)
