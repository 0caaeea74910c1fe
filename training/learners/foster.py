"""FOSTER (Wang et al., ECCV 2022) as the original CIM code runs it (``models/foster.py``).

``boost``   phase 0: plain CE; later: a new backbone beside the frozen old one(s), loss
            ``CE(logits / w) + CE(fe_logits) + lambda_okd * KD(logits[:, :known], old_logits, T)`` with per-class
            weights ``w`` from the effective-number rule (beta1) over the class counts (training images of the
            new classes; old classes at the nominal per-class budget as in the original, or at their real exemplar
            counts with ``class_weight_counts="real"``); theta by SGD (or AdamW) with a cosine schedule.
``student`` later phases, when ``compression_epochs > 0``: a one-backbone student distilled from the teacher with
            balanced KD (beta2); it becomes the next phase's old backbone. With ``compression_epochs = 0`` the stage
            is skipped and the network keeps growing by one backbone per phase.
``memory``  the policy's memory update.

As in the original (PyCIL) the per-phase accuracy is that of the teacher (the network trained in the phase); the
student's accuracy is reported beside it. The step functions and losses are module-level so that benchmarks can
call them alone.
"""
from __future__ import annotations

import contextlib
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from ..cim import clip_scale, upcast
from ..memory import class_budget
from ..models import FosterNet, split_parameters
from ..optim import lr_scheduler, theta_optimizer
from ..policy import InnerStep
from .base import Learner, build_network
from .passes import predict
from .steps import finite_or_skip, train_step

__all__ = ["Foster", "class_balance_weights", "kd_loss", "bkd_loss", "foster_loss", "student_step"]


# ------------------------------------------------------------------------------------------------------ losses
def class_balance_weights(counts, beta: float) -> torch.Tensor:
    """Effective-number class weights ``(1 - beta) / (1 - beta^n_c)``, normalised to sum to the class count."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    weights = (1.0 - beta) / (1.0 - np.power(beta, counts))
    weights = weights / weights.sum() * len(counts)
    return torch.tensor(weights, dtype=torch.float32)


def kd_loss(pred: torch.Tensor, soft: torch.Tensor, T: float) -> torch.Tensor:
    """Original FOSTER/PyCIL KD: ``-sum(softmax(soft/T) * log_softmax(pred/T)) / B``."""
    return -(torch.softmax(soft / T, dim=1) * torch.log_softmax(pred / T, dim=1)).sum() / pred.shape[0]


def bkd_loss(pred: torch.Tensor, soft: torch.Tensor, class_weights: torch.Tensor, T: float) -> torch.Tensor:
    """Balanced KD: teacher probabilities re-weighted per class and renormalised."""
    target = torch.softmax(soft / T, dim=1) * class_weights
    target = target / target.sum(1, keepdim=True)
    return -(target * torch.log_softmax(pred / T, dim=1)).sum() / pred.shape[0]


def foster_loss(outputs: dict, labels: torch.Tensor, *, class_weights: Union[torch.Tensor, None], T: float,
                lambda_okd: float) -> tuple[torch.Tensor, dict]:
    """Phase 0 (no old head): CE. Boosting: CE(logits / w) + CE(fe_logits) + lambda_okd * KD(old logits, T)."""
    logits = upcast(outputs["logits"])
    if "old_logits" not in outputs:
        loss = F.cross_entropy(logits, labels)
        return loss, {"clf": loss.detach()}
    old_logits = upcast(outputs["old_logits"]).detach()
    known = old_logits.shape[1]
    clf = F.cross_entropy(logits / class_weights, labels)
    fe = F.cross_entropy(upcast(outputs["fe_logits"]), labels)
    kd = lambda_okd * kd_loss(logits[:, :known], old_logits, T)
    return clf + fe + kd, {"clf": clf.detach(), "fe": fe.detach(), "kd": kd.detach()}


# ------------------------------------------------------------------------------------------------------ steps
def student_step(student, teacher, images: torch.Tensor, labels: torch.Tensor, *, optimizer: torch.optim.Optimizer,
                 class_weights: torch.Tensor, T: float, autocast=None, nonfinite: str = "error") -> dict:
    """One step of FOSTER's compression stage: balanced KD of the student towards the (frozen) teacher
    (``nonfinite`` as in :func:`~training.learners.steps.train_step`)."""
    autocast = autocast or contextlib.nullcontext
    with torch.no_grad(), autocast():
        teacher_logits = upcast(teacher(images)["logits"])
    with autocast():
        logits = upcast(student(images)["logits"])
        loss = bkd_loss(logits, teacher_logits, class_weights, T)
    if not finite_or_skip(loss, nonfinite):
        return {"loss": loss.detach(), "skipped": True}
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.detach(), "correct": (logits.detach().argmax(1) == labels).sum()}


# ------------------------------------------------------------------------------------------------------ learner
class Foster(Learner):
    """FOSTER (+ the compression setting's memory policy); see the module docstring."""

    NAME = "foster"
    STAGES = ("boost", "student", "memory")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.student_net: Union[FosterNet, None] = None
        self.class_weights: Union[torch.Tensor, None] = None

    # ---------------------------------------------------------------- phase setup
    def _begin_phase(self, phase) -> None:
        self._grow(FosterNet, phase)
        self.class_weights = self._class_weights(phase, self.cfg.beta1) if phase.index > 0 else None
        self.stage, self.epoch = "boost", 0
        self._make_optimizers(phase)
        self.policy.begin_phase(phase, self.network, self._phi_scheduler(phase))

    def epochs_in(self, phase) -> int:
        return self._epochs(phase) + (self.cfg.compression_epochs if phase.index > 0 else 0)

    def _make_optimizers(self, phase) -> None:
        super()._make_optimizers(phase)
        if self.stage == "student":
            cfg = self.cfg
            theta, _ = split_parameters(self.student_net)
            opt = theta_optimizer(cfg, theta.values(), cfg.incre_theta_lr, 0.0)  # the original student has no decay
            self.optimizers = {"student": opt}
            self.schedulers = {"student": lr_scheduler(opt, "cosine", epochs=cfg.compression_epochs)}

    def _class_counts(self, phase) -> list:
        """Per-class counts for the class-balance weights, in model label order: each old class at the nominal
        per-class budget (``class_weight_counts="nominal"``, the original's rule) or at its real number of stored
        exemplars (``"real"``), then the training images of each new class."""
        if self.cfg.class_weight_counts == "nominal":
            counts = [class_budget(self.cfg, total_classes=phase.known)] * phase.known
        else:
            stored = self.memory.counts()
            counts = [stored.get(cls, 0) for cls in self.stream.order[: phase.known]]
        return counts + [self.stream.train_count(cls) for cls in phase.classes]

    def _class_weights(self, phase, beta: float) -> torch.Tensor:
        return class_balance_weights(self._class_counts(phase), beta).to(self.runtime.device)

    def _loss(self, outputs, labels):
        return foster_loss(outputs, labels, class_weights=self.class_weights, T=self.cfg.T,
                           lambda_okd=self.cfg.lambda_okd)

    # ---------------------------------------------------------------- stage: boost
    def _run_boost(self, phase) -> None:
        cfg, rt, policy = self.cfg, self.runtime, self.policy
        epochs = self._epochs(phase)

        def epoch_fn(epoch):
            refreshed = policy.before_epoch(phase, self.network, epoch, epochs)
            step = lambda model, x, y: train_step(model, x, y, optimizer=self.optimizers["theta"],  # noqa: E731
                                                  loss_fn=self._loss, autocast=rt.autocast,
                                                  nonfinite=cfg.on_nonfinite_loss)
            stats = self._epoch(self.network, policy.train_dataset(phase, self.transforms["train"]), step,
                                prefix="train_")
            inner = InnerStep(loss=lambda out, y: self._loss(out, y)[0],
                              lr=self.schedulers["theta"].get_last_lr()[0] * cfg.lr_ratio,
                              max_grad_norm=cfg.max_phi_grad_norm * clip_scale(phase.index > 0),
                              reg_coef=cfg.reg_coef)
            stats.update(policy.after_epoch(phase, self.network, inner))
            self.schedulers["theta"].step()
            return {"aug_prob": policy.aug_prob, **refreshed, **stats}

        def finish():
            if epochs > 0 and phase.index > 0 and cfg.is_teacher_wa:
                self.network.weight_align(phase.known, phase.new_classes, cfg.wa_value)
            self._end_boost(phase)

        self._run_epochs(phase, stage="boost", epochs=epochs, epoch_fn=epoch_fn, finish=finish, evaluate=True)

    def _end_boost(self, phase) -> None:
        """Move on to the student stage (later phases with compression_epochs > 0) or to the memory update."""
        self.policy.end_training()
        if phase.index > 0 and self.cfg.compression_epochs > 0:
            self.student_net = self.network.student()
            self.runtime.prepare_model(self.student_net)
            self.class_weights = self._class_weights(phase, self.cfg.beta2)
            self.stage, self.epoch = "student", 0
        else:
            self.stage, self.epoch = "memory", 0
        self._make_optimizers(phase)

    # ---------------------------------------------------------------- stage: student
    def _run_student(self, phase) -> None:
        cfg, rt = self.cfg, self.runtime

        def epoch_fn(epoch):
            self.network.eval()
            step = lambda model, x, y: student_step(  # noqa: E731
                model, self.network, x, y, optimizer=self.optimizers["student"], class_weights=self.class_weights,
                T=cfg.T, autocast=rt.autocast, nonfinite=cfg.on_nonfinite_loss)
            stats = self._epoch(self.student_net, self.policy.train_dataset(phase, self.transforms["train"]), step,
                                prefix="student_")
            self.schedulers["student"].step()
            return stats

        def finish():
            if cfg.is_student_wa:
                self.student_net.weight_align(phase.known, phase.new_classes, cfg.wa_value)
            self.optimizers, self.schedulers = {}, {}
            self.stage, self.epoch = "memory", 0

        self._run_epochs(phase, stage="student", epochs=cfg.compression_epochs, epoch_fn=epoch_fn, finish=finish)

    # ---------------------------------------------------------------- phase end and state
    def _extra_predictions(self, loader) -> dict:
        student = predict(self.student_net, loader, self.runtime)[0] if self.student_net is not None else None
        return {"student_predictions": student}

    def _close_phase(self) -> None:
        if self.student_net is not None:  # the student becomes the next phase's old backbone
            self.network, self.student_net = self.student_net, None
        self.class_weights = None

    def _extra_state(self) -> dict:
        return {"student": None if self.student_net is None else {"spec": self.student_net.spec(),
                                                                   "state": self.student_net.state_dict()},
                "class_weights": None if self.class_weights is None else self.class_weights.cpu()}

    def _load_extra_state(self, state: dict) -> None:
        self.student_net = build_network(state["student"], self.runtime)
        weights = state["class_weights"]
        self.class_weights = None if weights is None else weights.to(self.runtime.device)
