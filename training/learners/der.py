"""DER (Yan et al., CVPR 2021) as the original CIM code runs it (``models/der.py``, ``utils/inc_net.py`` DERNet).

``train``   every phase adds a backbone (initialised from the previous one) beside all earlier ones, which are
            frozen whole (rational coefficients included); ``fc`` classifies every seen class from the concatenated
            features (old rows copied), and in later phases an auxiliary classifier ``aux_fc`` over the new
            backbone's features classifies the new classes plus one "old" class. Loss: ``CE(logits)`` in phase 0,
            ``CE(logits) + CE(aux_logits, aux_targets)`` later. theta by SGD (or AdamW) with ``lr_decay`` at
            ``init_milestones`` / ``incre_milestones`` (``lr_schedule``); after a later phase's training the new
            classes' ``fc`` rows are aligned to the old rows' mean norm (``weight_align``).
``memory``  the policy's memory update.

With ``compression=cim`` each epoch ends with the meta-iterations of the original DER: the inner loss is DER's loss
above, the inner step's lr is theta's (no ``lr_ratio``), the outer loss has no CAM regulariser (``reg_coef`` is not
used; ``der_reg_coef`` adds one, a departure) and phi's gradient is not clipped (docs/training.md lists where this
differs from PyCIL's DER).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cim import upcast
from ..models import DERNet
from ..policy import InnerStep
from .base import Learner
from .steps import train_step

__all__ = ["DER", "aux_targets", "der_loss"]


def aux_targets(labels: torch.Tensor, known: int) -> torch.Tensor:
    """Labels of the auxiliary classifier: new class ``known + j`` -> ``j + 1``, every old class -> 0."""
    shifted = labels - known + 1
    return torch.where(shifted > 0, shifted, torch.zeros_like(shifted))


def der_loss(outputs: dict, labels: torch.Tensor, *, known: int) -> tuple[torch.Tensor, dict]:
    """Phase 0 (``known == 0``): CE. Later phases: CE(logits) + CE(aux_logits, :func:`aux_targets`)."""
    clf = F.cross_entropy(upcast(outputs["logits"]), labels)
    if known == 0:
        return clf, {"clf": clf.detach()}
    aux = F.cross_entropy(upcast(outputs["aux_logits"]), aux_targets(labels, known))
    return clf + aux, {"clf": clf.detach(), "aux": aux.detach()}


class DER(Learner):
    """DER (+ the compression setting's memory policy); see the module docstring."""

    NAME = "der"
    STAGES = ("train", "memory")
    SCHEDULE = "multistep"

    def _begin_phase(self, phase) -> None:
        self._grow(DERNet, phase)
        self.stage, self.epoch = "train", 0
        self._make_optimizers(phase)
        self.policy.begin_phase(phase, self.network, self._phi_scheduler(phase))

    def _run_train(self, phase) -> None:
        cfg, rt, policy = self.cfg, self.runtime, self.policy
        epochs = self._epochs(phase)
        loss = lambda outputs, labels: der_loss(outputs, labels, known=phase.known)  # noqa: E731

        def epoch_fn(epoch):
            refreshed = policy.before_epoch(phase, self.network, epoch, epochs)
            step = lambda model, x, y: train_step(model, x, y, optimizer=self.optimizers["theta"],  # noqa: E731
                                                  loss_fn=loss, autocast=rt.autocast, nonfinite=cfg.on_nonfinite_loss)
            stats = self._epoch(self.network, policy.train_dataset(phase, self.transforms["train"]), step,
                                prefix="train_")
            inner = InnerStep(loss=lambda out, y: loss(out, y)[0], lr=self.schedulers["theta"].get_last_lr()[0],
                              max_grad_norm=None, reg_coef=cfg.der_reg_coef)
            stats.update(policy.after_epoch(phase, self.network, inner))
            self.schedulers["theta"].step()
            return {"aug_prob": policy.aug_prob, **refreshed, **stats}

        def finish():
            if phase.index > 0:
                self.network.weight_align(phase.known, phase.new_classes)
            policy.end_training()
            self.optimizers, self.schedulers = {}, {}
            self.stage, self.epoch = "memory", 0

        self._run_epochs(phase, stage="train", epochs=epochs, epoch_fn=epoch_fn, finish=finish, evaluate=True)
