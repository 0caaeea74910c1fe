"""Training steps shared by the learners (module-level, so that benchmarks can call them alone)."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

__all__ = ["NonFiniteLoss", "train_step", "finite_or_skip"]


class NonFiniteLoss(FloatingPointError):
    """A training loss that is NaN or infinite (``on_nonfinite_loss="error"``); the message says where."""


def finite_or_skip(loss: torch.Tensor, nonfinite: str) -> bool:
    """Whether to apply a step with ``loss``: True if it is finite; False to skip it (``nonfinite="skip"``);
    raises :class:`NonFiniteLoss` (``"error"``) before any parameter is touched."""
    if bool(torch.isfinite(loss)):
        return True
    if nonfinite == "skip":
        return False
    raise NonFiniteLoss(f"non-finite training loss ({float(loss.detach())})")


def train_step(model, images: torch.Tensor, labels: torch.Tensor, *, optimizer: torch.optim.Optimizer,
               loss_fn: Callable[[dict, torch.Tensor], tuple], autocast=None, nonfinite: str = "error") -> dict:
    """One training step of theta (the ReLU branch): forward, loss, backward, optimiser step.

    ``model`` is what to call (the network, or its DDP wrapper); returns detached loss parts and the number of
    correct top-1 predictions, or ``{"loss", "skipped": True}`` for a non-finite loss with ``nonfinite="skip"``
    (no parameter changes; see :func:`finite_or_skip`)."""
    with (autocast or contextlib.nullcontext)():
        outputs = model(images)
        loss, parts = loss_fn(outputs, labels)
    if not finite_or_skip(loss, nonfinite):
        return {"loss": loss.detach(), "skipped": True}
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    correct = (outputs["logits"].detach().argmax(1) == labels).sum()
    return {"loss": loss.detach(), "correct": correct, **parts}
