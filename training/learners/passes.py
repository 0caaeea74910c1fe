"""One pass over a loader: the resumable training pass behind ``Learner._epoch`` and the prediction pass behind its
evaluation. Plain functions of the model, the loader and the runtime; the learner keeps the pass's state."""
from __future__ import annotations

from typing import Callable

import torch

from .steps import NonFiniteLoss

__all__ = ["new_pass_state", "train_pass", "pass_numbers", "predict"]


def new_pass_state(generator: torch.Generator) -> dict:
    """The state of a training pass before its first batch: the loader generator's state from before the pass drew
    its order, the batches done and the running sums."""
    return {"generator": generator.get_state(), "batches": 0, "totals": {}, "seen": 0, "skipped": 0}


def train_pass(model, loader, step: Callable, state: dict, *, runtime, total: int, on_batch: Callable[[int, int], None],
               where: Callable[[int], str]) -> None:
    """Run ``step(model, images, labels) -> dict`` on every batch of ``loader``, adding to ``state`` after each one
    (so that a checkpoint taken in ``on_batch(done, total)`` continues here). A step that returns ``skipped`` counts
    no image; :class:`NonFiniteLoss` is raised again with ``where(batch)`` appended."""
    totals = state["totals"]
    for batch in loader:
        if batch is not None:
            images, labels = runtime.to_device(batch[0], image=True), runtime.to_device(batch[1])
            try:
                out = step(model, images, labels)
            except NonFiniteLoss as error:
                raise NonFiniteLoss(f"{error} {where(state['batches'] + 1)}") from None
            if out.pop("skipped", False):
                state["skipped"] += 1
            else:
                for key, value in out.items():
                    totals[key] = totals.get(key, 0.0) + float(value) * (1 if key == "correct" else len(labels))
                state["seen"] += len(labels)
        state["batches"] += 1
        on_batch(state["batches"], total)


def pass_numbers(state: dict, prefix: str) -> dict:
    """The pass's mean numbers (``correct`` as an accuracy in %), keys prefixed, and the skipped batches if any."""
    seen = state["seen"]
    numbers = {prefix + ("acc" if key == "correct" else key): (100.0 if key == "correct" else 1.0) * value / seen
               for key, value in state["totals"].items()} if seen else {}
    if state["skipped"]:
        numbers[prefix + "skipped_batches"] = float(state["skipped"])
    return numbers


@torch.no_grad()
def predict(net, loader, runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-5 predictions (or fewer classes) and targets of ``net`` in eval mode over ``loader``, on the CPU."""
    net.eval()
    preds, targets = [], []
    for batch in loader:
        if batch is None:
            continue
        with runtime.autocast():
            logits = net(runtime.to_device(batch[0], image=True))["logits"].float()
        preds.append(logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu())
        targets.append(torch.as_tensor(batch[1]).cpu())
    if not preds:
        return torch.zeros(0, 5, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    return torch.cat(preds), torch.cat(targets)
