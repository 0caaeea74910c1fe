"""Training steps shared by the learners (module-level, so that benchmarks can call them alone)."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

__all__ = ["train_step"]


def train_step(model, images: torch.Tensor, labels: torch.Tensor, *, optimizer: torch.optim.Optimizer,
               loss_fn: Callable[[dict, torch.Tensor], tuple], autocast=None) -> dict:
    """One training step of theta (the ReLU branch): forward, loss, backward, optimiser step.

    ``model`` is what to call (the network, or its DDP wrapper); returns detached loss parts and the number of
    correct top-1 predictions."""
    with (autocast or contextlib.nullcontext)():
        outputs = model(images)
        loss, parts = loss_fn(outputs, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    correct = (outputs["logits"].detach().argmax(1) == labels).sum()
    return {"loss": loss.detach(), "correct": correct, **parts}
