"""The two usual bounds of class-incremental learning, on the same schedule as the learners and with no memory: one
network whose ``fc`` is widened each phase (:meth:`~training.models.IncrementalNet.widened`), trained with plain CE
on the new classes' images (``learner="finetune"``, the lower bound) or on every seen class's images
(``learner="joint"``, the upper bound)."""
from __future__ import annotations

import torch.nn.functional as F

from ..cim import upcast
from ..data import PhaseDataset
from ..models import IncrementalNet
from .base import Learner
from .steps import train_step

__all__ = ["Finetune", "Joint"]


def _cross_entropy(outputs, labels):
    loss = F.cross_entropy(upcast(outputs["logits"]), labels)
    return loss, {}


class Finetune(Learner):
    """Fine-tuning on the new classes only: the lower bound."""

    NAME = "finetune"
    STAGES = ("train",)
    USES_MEMORY = False

    def _begin_phase(self, phase) -> None:
        cfg = self.cfg
        if self.network is None:
            self.network = IncrementalNet(backbone=cfg.backbone, fc_bias=cfg.fc_bias).grow(phase.total)
        else:
            self.network = self.network.widened(phase.total)
        self.runtime.prepare_model(self.network)
        self.stage, self.epoch = "train", 0
        self._make_optimizers(phase)

    def _classes(self, phase) -> list:
        """The classes whose training images a phase trains on."""
        return list(phase.classes)

    def _run_train(self, phase) -> None:
        cfg, rt = self.cfg, self.runtime

        def epoch_fn(epoch):
            dataset = PhaseDataset(self.stream.source.train, self.stream.train_indices(self._classes(phase)),
                                   self.transforms["train"], self.stream.label_map)
            step = lambda model, x, y: train_step(model, x, y, optimizer=self.optimizers["theta"],  # noqa: E731
                                                  loss_fn=_cross_entropy, autocast=rt.autocast,
                                                  nonfinite=cfg.on_nonfinite_loss)
            stats = self._epoch(self.network, dataset, step, prefix="train_")
            self.schedulers["theta"].step()
            return stats

        def finish():
            self.optimizers, self.schedulers = {}, {}
            self.stage = "trained"

        self._run_epochs(phase, stage="train", epochs=self._epochs(phase), epoch_fn=epoch_fn, finish=finish,
                         evaluate=True)

    def _upgrade(self, state: dict) -> dict:
        """Checkpoints of the bounds written before the split ran them as FOSTER's stages ``boost`` -> ``memory`` (a
        no-op for them) -> ``trained``."""
        old = "learner" not in state
        state = super()._upgrade(state)
        if old:
            state["stage"] = {"boost": "train", "memory": "trained"}.get(state["stage"], state["stage"])
        return state


class Joint(Finetune):
    """Joint training on every seen class's images: the upper bound."""

    NAME = "joint"

    def _classes(self, phase) -> list:
        return self.stream.seen_classes(phase)
