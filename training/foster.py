"""FOSTER class-incremental learner with CIM exemplar compression (PyCIL contract).

``Foster.incremental_train(phase)`` trains one phase, ``eval_task()`` evaluates on every seen class,
``after_task()`` closes the phase. A phase runs as resumable stages:

``boost``   phase 0: plain CE; later: a new backbone beside the frozen old one(s), loss
            ``CE(logits / w) + CE(fe_logits) + lambda_okd * KD(logits[:, :known], old_logits, T)`` with per-class
            weights ``w`` from the effective-number rule (beta1) over the class counts (training images of the
            new classes; old classes at the nominal per-class budget as in the original, or at their real exemplar
            counts with ``class_weight_counts="real"``). With ``compression="cim"`` every epoch ends with
            ``int(num_meta_iters_per_cls * new_classes)`` CIM meta-steps (:func:`training.cim.meta_step`), and the
            boxes of the new-class images are refreshed every ``cam_update_interval`` epochs to drive the
            boxed-compression augmentation.
``student`` later phases, when ``compression_epochs > 0``: a one-backbone student distilled from the teacher with
            balanced KD (beta2); it becomes the next phase's old backbone. With ``compression_epochs = 0`` the stage
            is skipped and the network keeps growing by one backbone per phase.
``memory``  boxes of the new-class images -> compressed exemplars -> cost-aware herding (:mod:`training.memory`);
            old classes trimmed to the new per-class budget.

``learner="finetune"`` / ``"joint"`` are the two usual bounds on the same schedule: one network widened each phase
(:meth:`~training.models.FosterNet.widened`), plain CE on the new classes' images (lower bound) or on every seen
class's images (upper bound), no student, no memory.

As in the original (PyCIL) the per-phase accuracy is that of the teacher (the network trained in the phase); the
student's accuracy is reported beside it. Step functions (:func:`train_step`, :func:`student_step`) and the CIM
meta-step are module-level so that benchmarks can call them alone.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader

from . import cim as cim_lib
from .cim import upcast
from .config import Config, ConfigError, Runtime
from .data import build_transform, class_order, collate_skip_bad, phase_classes, PhaseDataset
from .data.boxes import centred_boxes
from .exemplar_store import ExemplarStore
from .memory import ExemplarMemory, class_budget, compress_exemplars, exemplar_costs, herding_select
from .models import FosterNet, split_parameters

__all__ = [
    "Phase",
    "ClassStream",
    "Foster",
    "class_balance_weights",
    "kd_loss",
    "bkd_loss",
    "foster_loss",
    "train_step",
    "student_step",
    "memory_mode",
]

STAGES = ("boost", "student", "memory", "trained", "done")


# ------------------------------------------------------------------------------------------------------ the stream
@dataclass(frozen=True)
class Phase:
    """One phase: its index, the original class ids it introduces, and the classes known before / seen after."""

    index: int
    classes: tuple
    known: int
    total: int

    @property
    def new_classes(self) -> int:
        return self.total - self.known


class ClassStream:
    """The seeded class order and the phases over a ``training.data.Source`` (PyCIL's data manager role).

    Labels seen by the model are positions in the class order (``label_map``: original class id -> position).
    """

    def __init__(self, source, *, init_cls: int, increment: int, order_seed: int = 1993):
        self.source = source
        if init_cls > source.num_classes:
            raise ValueError(f"init_cls: {init_cls} exceeds the {source.num_classes} classes of {source.name!r}")
        self.order = [int(c) for c in class_order(source.num_classes, seed=order_seed)]
        self.label_map = {cls: pos for pos, cls in enumerate(self.order)}
        self.phases: list[Phase] = []
        known = 0
        for index, positions in enumerate(phase_classes(source.num_classes, init_cls, increment)):
            classes = tuple(self.order[p] for p in positions)
            self.phases.append(Phase(index=index, classes=classes, known=known, total=known + len(classes)))
            known += len(classes)
        self._train_targets = np.asarray(source.train.targets)
        self._test_targets = np.asarray(source.test.targets)

    def __len__(self) -> int:
        return len(self.phases)

    def train_indices(self, classes) -> np.ndarray:
        return np.flatnonzero(np.isin(self._train_targets, list(classes)))

    def test_indices(self, classes) -> np.ndarray:
        return np.flatnonzero(np.isin(self._test_targets, list(classes)))

    def seen_classes(self, phase: Phase) -> list:
        return self.order[: phase.total]

    def task_labels(self, phase: Phase) -> list:
        """Model labels introduced in each phase 0..phase."""
        return [list(range(p.known, p.total)) for p in self.phases[: phase.index + 1]]


# ------------------------------------------------------------------------------------------------------ losses
def class_balance_weights(counts, beta: float) -> torch.Tensor:
    """Effective-number class weights ``(1 - beta) / (1 - beta^n_c)``, normalised to sum to the class count."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    weights = (1.0 - beta) / (1.0 - np.power(beta, counts))
    weights = weights / weights.sum() * len(counts)
    return torch.tensor(weights, dtype=torch.float32)


def theta_optimizer(cfg: Config, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The backbone/classifier optimiser of ``cfg.theta_optimizer``: SGD with ``cfg.momentum`` (the original) or
    AdamW."""
    if cfg.theta_optimizer == "adamw":
        return torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(list(params), lr=lr, momentum=cfg.momentum, weight_decay=weight_decay)


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
class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _null():
    return _Null()


def train_step(model, images: torch.Tensor, labels: torch.Tensor, *, optimizer: torch.optim.Optimizer,
               loss_fn: Callable[[dict, torch.Tensor], tuple], autocast=None) -> dict:
    """One FOSTER training step of theta (the ReLU branch): forward, loss, backward, optimiser step.

    ``model`` is what to call (the network, or its DDP wrapper); returns detached loss parts and the number of
    correct top-1 predictions."""
    with (autocast or _null)():
        outputs = model(images)
        loss, parts = loss_fn(outputs, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    correct = (outputs["logits"].detach().argmax(1) == labels).sum()
    return {"loss": loss.detach(), "correct": correct, **parts}


def student_step(student, teacher, images: torch.Tensor, labels: torch.Tensor, *, optimizer: torch.optim.Optimizer,
                 class_weights: torch.Tensor, T: float, autocast=None) -> dict:
    """One step of FOSTER's compression stage: balanced KD of the student towards the (frozen) teacher."""
    autocast = autocast or _null
    with torch.no_grad(), autocast():
        teacher_logits = upcast(teacher(images)["logits"])
    with autocast():
        logits = upcast(student(images)["logits"])
        loss = bkd_loss(logits, teacher_logits, class_weights, T)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.detach(), "correct": (logits.detach().argmax(1) == labels).sum()}


def memory_mode(compression: str) -> str:
    """ExemplarMemory mode of a compression setting."""
    return {"none": "none", "downsample": "downsample", "cam": "cam", "cim": "cam", "gt": "cam"}[compression]


# ------------------------------------------------------------------------------------------------------ learner
class Foster:
    """FOSTER (+ CIM) learner.

    Args:
        cfg: the run's :class:`~training.config.Config`.
        stream: the :class:`ClassStream` (source, class order, phases).
        runtime: the :class:`~training.config.Runtime` (device, precision, distributed hooks).
        image_size: side of the training images after the transforms.
        on_epoch_end: called as ``on_epoch_end(info)`` after every epoch of every stage (checkpoints, logging);
            ``info`` has phase, stage, epoch, epochs, and the epoch's mean losses.
        memory_dir: directory of the exemplar store (encoded exemplars on disk, ``cfg.memory_codec``); None keeps
            the exemplars' pixels in RAM.
    """

    def __init__(self, *, cfg: Config, stream: ClassStream, runtime: Runtime, image_size: int,
                 on_epoch_end: Union[Callable[[dict], None], None] = None, memory_dir: Union[str, None] = None):
        self.cfg = cfg
        self.stream = stream
        self.runtime = runtime
        self.image_size = int(image_size)
        self.on_epoch_end = on_epoch_end
        self.network: Union[FosterNet, None] = None
        self.student_net: Union[FosterNet, None] = None
        store = None if memory_dir is None else ExemplarStore(memory_dir, codec=cfg.memory_codec,
                                                              quality=cfg.memory_quality, writer=runtime.is_main)
        self.memory = ExemplarMemory(ratio=cfg.compress_ratio, mode=memory_mode(cfg.compression), store=store)
        self.exemplar_cams: dict = {}  # class id -> {"indices", "cams"} of its exemplars at selection (visualize)
        self.generator = torch.Generator()
        self.generator.manual_seed(cfg.seed)
        self.known = 0
        self.total = 0
        self.phase_index = -1
        self.stage = "done"
        self.epoch = 0
        self.optimizers: dict = {}
        self.schedulers: dict = {}
        self.class_weights: Union[torch.Tensor, None] = None
        self.boxes: Union[cim_lib.BoxTable, None] = None
        self.aug_prob = 0.0
        self.phase_log: dict = {}
        self.calibration: Union[dict, None] = None  # threshold="calibrated": the choice made at the end of phase 0
        self._memory_view = None
        _check_box_sources(cfg, stream.source)
        augment = cfg.original_augmentation
        self.transforms = {kind: build_transform(kind, self.image_size, augment=augment)
                           for kind in ("train", "test", "cam")}

    # ---------------------------------------------------------------- PyCIL contract
    def incremental_train(self, phase: Phase) -> None:
        """Train phase ``phase`` (resuming inside it if the learner state says so)."""
        if self.phase_index != phase.index:
            if self.stage != "done" or phase.index != self.phase_index + 1:
                raise RuntimeError(f"incremental_train: phase {phase.index} after phase {self.phase_index} "
                                   f"(stage {self.stage!r}); phases run in order")
            self._begin_phase(phase)
        if self.stage == "boost":
            self._run_boost(phase)
        if self.stage == "student":
            self._run_student(phase)
        if self.stage == "memory":
            self._update_memory(phase)
            self.stage = "trained"

    def eval_task(self) -> dict:
        """Top-5 predictions of the teacher (and the student, if any) on the test images of every seen class.

        Returns {"predictions": int64 [N, 5], "targets": int64 [N], "task_classes": labels per phase,
        "student_predictions": ... or None}."""
        phase = self.stream.phases[self.phase_index]
        loader = self._test_loader(phase)
        predictions, targets = self._predict(self.network, loader)
        student = self._predict(self.student_net, loader)[0] if self.student_net is not None else None
        return {
            "predictions": predictions,
            "targets": targets,
            "task_classes": self.stream.task_labels(phase),
            "student_predictions": student,
        }

    def after_task(self) -> None:
        """Close the phase: the student (if trained) becomes the network of the next phase."""
        if self.stage != "trained":
            raise RuntimeError(f"after_task: phase {self.phase_index} is in stage {self.stage!r}, not trained")
        if self.student_net is not None:
            self.network = self.student_net
            self.student_net = None
        self.known = self.total
        self.optimizers, self.schedulers = {}, {}
        self.boxes, self.aug_prob, self.class_weights = None, 0.0, None
        self.stage = "done"
        self.epoch = 0

    # ---------------------------------------------------------------- phase setup
    def _begin_phase(self, phase: Phase) -> None:
        self.phase_index = phase.index
        self.total = phase.total
        if self.network is None:
            self.network = FosterNet(backbone=self.cfg.backbone, fc_bias=self.cfg.fc_bias).grow(phase.total)
        elif self.cfg.learner == "foster":
            self.network.grow(phase.total)
        else:
            self.network = self.network.widened(phase.total)
        self.runtime.prepare_model(self.network)
        boosting = phase.index > 0 and self.cfg.learner == "foster"
        self.class_weights = self._class_weights(phase, self.cfg.beta1) if boosting else None
        self.boxes, self.aug_prob = None, 0.0
        self.phase_log = {"boxes_area": None}
        self._memory_view = None
        self.stage, self.epoch = "boost", 0
        self._make_boost_optimizers(phase)

    def _class_counts(self, phase: Phase) -> list:
        """Per-class counts for the class-balance weights, in model label order: each old class at the nominal
        per-class budget (``class_weight_counts="nominal"``, the original's rule) or at its real number of stored
        exemplars (``"real"``), then the training images of each new class."""
        if self.cfg.class_weight_counts == "nominal":
            counts = [class_budget(self.cfg, total_classes=phase.known)] * phase.known
        else:
            stored = self.memory.counts()
            counts = [stored.get(cls, 0) for cls in self.stream.order[: phase.known]]
        targets = np.asarray(self.stream.source.train.targets)
        counts += [int((targets == cls).sum()) for cls in phase.classes]
        return counts

    def _class_weights(self, phase: Phase, beta: float) -> torch.Tensor:
        return class_balance_weights(self._class_counts(phase), beta).to(self.runtime.device)

    def _make_boost_optimizers(self, phase: Phase) -> None:
        cfg = self.cfg
        first = phase.index == 0
        epochs = max(1, cfg.init_epochs if first else cfg.incre_epochs)
        theta, phi = split_parameters(self.network)
        opt = theta_optimizer(cfg, theta.values(), cfg.init_theta_lr if first else cfg.incre_theta_lr,
                              cfg.init_weight_decay if first else cfg.incre_weight_decay)
        self.optimizers = {"theta": opt}
        self.schedulers = {"theta": torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)}
        if cfg.compression == "cim":
            adam = torch.optim.Adam(list(phi.values()), lr=cfg.init_phi_lr if first else cfg.incre_phi_lr,
                                    weight_decay=cfg.init_weight_decay if first else cfg.incre_weight_decay)
            self.optimizers["phi"] = adam
            self.schedulers["phi"] = torch.optim.lr_scheduler.CosineAnnealingLR(adam, T_max=epochs)

    def _make_student_optimizer(self) -> None:
        cfg = self.cfg
        theta, _ = split_parameters(self.student_net)
        opt = theta_optimizer(cfg, theta.values(), cfg.incre_theta_lr, 0.0)  # the original student has no decay
        self.optimizers = {"student": opt}
        self.schedulers = {"student": torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.compression_epochs))}

    # ---------------------------------------------------------------- data
    def _loader(self, dataset, batch_size: int, *, shuffle: bool, shard: bool = True) -> DataLoader:
        return self.runtime.loader(dataset, batch_size, shuffle=shuffle, generator=self.generator,
                                   collate_fn=collate_skip_bad, workers=self.cfg.workers, shard=shard)

    def _memory_dataset(self, transform):
        """The rebuilt exemplars as a dataset (None when the memory is empty); built once per phase, since the
        memory only changes in the memory stage."""
        if not len(self.memory):
            return None
        if self._memory_view is None:
            # Rebuild all exemplars once (batched) when they fit in 1 GiB (bound: every exemplar uncompressed);
            # otherwise each item is read from the store and rebuilt on access, on the GPU with decode_on_device.
            full_bytes = self.memory.cost_bytes() * max(1.0, self.cfg.compress_ratio)
            device = self.runtime.device if self.runtime.decode_on_device else None
            self._memory_view = self.memory.dataset(None, self.stream.label_map, cache=full_bytes <= 2**30,
                                                    device=device)
        return _Transformed(self._memory_view, transform)

    def _new_class_dataset(self, phase: Phase, transform, *, prob: float, boxes=None):
        return cim_lib.ImageBoxDataset(self.stream.source.train, self.stream.train_indices(phase.classes), transform,
                                       self.stream.label_map, boxes=boxes, prob=prob, ratio=self.cfg.compress_ratio)

    def _train_dataset(self, phase: Phase, *, with_augmentation: bool):
        if self.cfg.learner == "joint":
            return PhaseDataset(self.stream.source.train, self.stream.train_indices(self.stream.seen_classes(phase)),
                                self.transforms["train"], self.stream.label_map)
        parts = [self._new_class_dataset(phase, self.transforms["train"], boxes=self.boxes,
                                         prob=self.aug_prob if with_augmentation else 0.0)]
        memory = self._memory_dataset(self.transforms["train"])
        if memory is not None:
            parts.append(memory)
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    def _test_loader(self, phase: Phase) -> DataLoader:
        test = self.stream.source.test
        dataset = PhaseDataset(test, self.stream.test_indices(self.stream.seen_classes(phase)),
                               self.transforms["test"], self.stream.label_map)
        return self._loader(dataset, self.cfg.batch_size, shuffle=False)

    def _cam_loader(self, phase: Phase) -> DataLoader:
        dataset = cim_lib.CamDataset(self.stream.source.train, self.stream.train_indices(phase.classes),
                                     self.transforms["cam"], self.stream.label_map)
        return self._loader(dataset, self.cfg.cam_batch_size, shuffle=False)

    # ---------------------------------------------------------------- stage: boost
    def _epochs(self, phase: Phase) -> int:
        return self.cfg.init_epochs if phase.index == 0 else self.cfg.incre_epochs

    def _inner_loss(self):
        cfg, weights = self.cfg, self.class_weights
        return lambda outputs, labels: foster_loss(outputs, labels, class_weights=weights, T=cfg.T,
                                                   lambda_okd=cfg.lambda_okd)[0]

    def _run_boost(self, phase: Phase) -> None:
        cfg, rt = self.cfg, self.runtime
        epochs = self._epochs(phase)
        cim_on = cfg.compression == "cim"
        meta_iters = cim_lib.num_meta_iters(cfg.num_meta_iters_per_cls, phase.new_classes) if cim_on else 0
        bar = _progress(range(self.epoch, epochs), enabled=cfg.progress and rt.is_main, initial=self.epoch,
                        total=epochs, desc=f"phase {phase.index} {'train' if phase.index == 0 else 'boost'}")
        for epoch in bar:
            start = time.perf_counter()
            refreshed = {}
            if cim_on and cim_lib.refresh_due(epoch, epochs, cfg.cam_update_interval):
                self.boxes = self._compute_boxes(phase, "rational")
                self.aug_prob = min(1.0, (epoch // cfg.cam_update_interval) * cfg.randombbxblur_prob_incre)
                refreshed = self._box_quality(self.boxes)
                self.phase_log.setdefault("box_refreshes", []).append({"epoch": epoch, **refreshed})
            loader = self._loader(self._train_dataset(phase, with_augmentation=cim_on), cfg.batch_size, shuffle=True)
            stats = self._train_epoch(loader)
            if meta_iters:
                stats.update(self._meta_epoch(phase, meta_iters))
            for scheduler in self.schedulers.values():
                scheduler.step()
            self.epoch = epoch + 1
            if self.epoch == epochs and phase.index > 0 and cfg.is_teacher_wa:
                self.network.weight_align(phase.known, phase.new_classes, cfg.wa_value)
            if self.epoch == epochs:
                self._end_boost(phase)
            info = {"phase": phase.index, "stage": "boost", "epoch": epoch, "epochs": epochs,
                    "aug_prob": self.aug_prob, "seconds": time.perf_counter() - start, **refreshed, **stats}
            if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0:
                info["test_top1"] = self._quick_accuracy(self.network, phase)
            _set_postfix(bar, info)
            self._emit(info)
        if epochs == 0:
            self._end_boost(phase)

    def _end_boost(self, phase: Phase) -> None:
        """Move on to the student stage (later phases with compression_epochs > 0) or to the memory update."""
        if phase.index > 0 and self.cfg.compression_epochs > 0 and self.cfg.learner == "foster":
            self.student_net = self.network.student()
            self.runtime.prepare_model(self.student_net)
            self.class_weights = self._class_weights(phase, self.cfg.beta2)
            self._make_student_optimizer()
            self.stage, self.epoch = "student", 0
        else:
            self.optimizers, self.schedulers = {}, {}
            self.stage, self.epoch = "memory", 0

    def _train_epoch(self, loader) -> dict:
        rt = self.runtime
        model = rt.wrap(self.network)
        self.network.train()
        loss_fn = lambda outputs, labels: foster_loss(outputs, labels, class_weights=self.class_weights,  # noqa: E731
                                                      T=self.cfg.T, lambda_okd=self.cfg.lambda_okd)
        totals, seen = {}, 0
        for batch in loader:
            if batch is None:
                continue
            images, labels = rt.to_device(batch[0], image=True), rt.to_device(batch[1])
            out = train_step(model, images, labels, optimizer=self.optimizers["theta"], loss_fn=loss_fn,
                             autocast=rt.autocast)
            _accumulate(totals, out, len(labels))
            seen += len(labels)
        return _means(totals, seen, prefix="train_")

    def _meta_epoch(self, phase: Phase, iters: int) -> dict:
        cfg, rt = self.cfg, self.runtime
        dataset = self._new_class_dataset(phase, self.transforms["train"], prob=0.0)
        memory = self._memory_dataset(self.transforms["train"])
        if memory is not None:
            dataset = ConcatDataset([dataset, memory])
        # every rank runs the same meta-steps on the same (unsharded) batches; phi is re-synchronised below
        batches = cim_lib.meta_batches(self._loader(dataset, cfg.meta_batch_size, shuffle=True, shard=False))
        lr_now = self.schedulers["theta"].get_last_lr()[0]
        clip = cfg.max_phi_grad_norm * cim_lib.clip_scale(phase.index > 0)
        inner_loss = self._inner_loss()
        totals = {}
        for _ in range(iters):
            first, second = next(batches), next(batches)
            to = lambda b: (rt.to_device(b[0], image=True), rt.to_device(b[1]))  # noqa: E731
            out = cim_lib.meta_step(self.network, to(first), to(second), phi_optimizer=self.optimizers["phi"],
                                    inner_lr=lr_now * cfg.lr_ratio, compress_ratio=cfg.compress_ratio,
                                    div_coef=cfg.div_coef, reg_coef=cfg.reg_coef, max_grad_norm=clip,
                                    inner_loss=inner_loss, autocast=rt.autocast, meta_gradient=cfg.meta_gradient)
            _accumulate(totals, out, 1)
        rt.broadcast_tensors(split_parameters(self.network)[1].values())
        return _means(totals, iters, prefix="meta_")

    # ---------------------------------------------------------------- stage: student
    def _run_student(self, phase: Phase) -> None:
        cfg, rt = self.cfg, self.runtime
        epochs = cfg.compression_epochs
        bar = _progress(range(self.epoch, epochs), enabled=cfg.progress and rt.is_main, initial=self.epoch,
                        total=epochs, desc=f"phase {phase.index} student")
        for epoch in bar:
            start = time.perf_counter()
            loader = self._loader(self._train_dataset(phase, with_augmentation=cfg.compression == "cim"),
                                  cfg.batch_size, shuffle=True)
            model = rt.wrap(self.student_net)
            self.student_net.train()
            self.network.eval()
            totals, seen = {}, 0
            for batch in loader:
                if batch is None:
                    continue
                images, labels = rt.to_device(batch[0], image=True), rt.to_device(batch[1])
                out = student_step(model, self.network, images, labels, optimizer=self.optimizers["student"],
                                   class_weights=self.class_weights, T=cfg.T, autocast=rt.autocast)
                _accumulate(totals, out, len(labels))
                seen += len(labels)
            self.schedulers["student"].step()
            self.epoch = epoch + 1
            if self.epoch == epochs:
                if cfg.is_student_wa:
                    self.student_net.weight_align(phase.known, phase.new_classes, cfg.wa_value)
                self.optimizers, self.schedulers = {}, {}
                self.stage, self.epoch = "memory", 0
            info = {"phase": phase.index, "stage": "student", "epoch": epoch, "epochs": epochs,
                    "seconds": time.perf_counter() - start, **_means(totals, seen, prefix="student_")}
            _set_postfix(bar, info)
            self._emit(info)

    # ---------------------------------------------------------------- stage: memory
    def _compute_boxes(self, phase: Phase, activation: str) -> cim_lib.BoxTable:
        table = cim_lib.compute_boxes(self.network, self._cam_loader(phase), activation=activation,
                                      threshold=self._threshold(), runtime=self.runtime)
        return self.runtime.broadcast_object(table)  # every rank uses rank 0's boxes

    def _threshold(self) -> Union[float, str]:
        """The threshold of the CAM boxes: the config's, or the calibrated one (``mask_threshold`` until phase 0 has
        chosen it)."""
        if self.cfg.threshold != "calibrated":
            return self.cfg.cam_threshold
        return self.cfg.mask_threshold if self.calibration is None else self.calibration["threshold"]

    def _calibrate(self, phase: Phase, activation: str) -> None:
        """``threshold="calibrated"``: choose the threshold on the held-out images of the phase-0 classes."""
        heldout = self.stream.source.heldout
        indices = np.flatnonzero(np.isin(np.asarray(heldout.targets), list(phase.classes)))
        loader = self._loader(cim_lib.CamDataset(heldout, indices, self.transforms["cam"], self.stream.label_map),
                              self.cfg.cam_batch_size, shuffle=False)
        result = cim_lib.calibrate_threshold(self.network, loader, heldout.object_boxes, activation=activation,
                                             runtime=self.runtime)
        self.calibration = self.runtime.broadcast_object(result)

    def _final_boxes(self, phase: Phase) -> Union[cim_lib.BoxTable, None]:
        mode = self.cfg.compression
        if mode in ("cam", "cim") and self.cfg.threshold == "calibrated" and self.calibration is None:
            self._calibrate(phase, "rational" if mode == "cim" else "relu")
        if mode == "gt":
            return cim_lib.truth_boxes(self.stream.source.train, self.stream.train_indices(phase.classes))
        if mode == "cim":
            return self._compute_boxes(phase, "rational")
        if mode == "cam":
            return self._compute_boxes(phase, "relu")
        if mode == "downsample":
            return cim_lib.BoxTable.empty_boxes(self.stream.train_indices(phase.classes))
        return None

    @torch.no_grad()
    def _features(self, dataset) -> tuple[torch.Tensor, list, torch.Tensor]:
        """ReLU-branch features (concatenated over backbones), indices and original sizes of the readable images
        of a dataset with ``return_size``."""
        rt = self.runtime
        self.network.eval()
        feats, kept, sizes = [], [], []
        for batch in self._loader(dataset, self.cfg.batch_size, shuffle=False):
            if batch is None:
                continue
            with rt.autocast():
                feats.append(self.network(rt.to_device(batch[0], image=True))["features"].float().cpu())
            kept.extend(int(i) for i in batch[2])
            sizes.append(batch[3])
        if not feats:
            return torch.zeros(0, self.network.feature_dim), [], torch.zeros(0, 2, dtype=torch.int64)
        return torch.cat(feats), kept, torch.cat(sizes)

    def _box_quality(self, table) -> dict:
        """Mean box area fraction of a box table and, where the source has true object boxes (synthetic, Tiny
        ImageNet), the mean IoU of the boxes with them and that of the whole-image box (the trivial baseline)."""
        quality = {"box_area": table.area_fraction()}
        truth = getattr(self.stream.source.train, "object_boxes", None)
        if truth is not None and len(table):
            whole = torch.zeros_like(table.boxes)
            whole[:, 1], whole[:, 3] = table.sizes[:, 0], table.sizes[:, 1]
            scores = truth.best_iou(table.indices, table.boxes)
            if not bool(scores.isnan().all()):  # images without a true box are left out of the means
                quality["box_iou"] = float(scores.nanmean())
                quality["box_iou_whole_image"] = float(truth.best_iou(table.indices, whole).nanmean())
                centred = centred_boxes(table.boxes, table.sizes)
                quality["box_iou_centre_prior"] = float(truth.best_iou(table.indices, centred).nanmean())
        return quality

    def _update_memory(self, phase: Phase) -> None:
        cfg = self.cfg
        if cfg.learner != "foster":
            return  # the bounds keep no exemplars
        budget = class_budget(cfg, total_classes=phase.total)
        if not cfg.fixed_memory:
            for label in self.memory.classes():
                self.memory.trim(label, budget)
        table = self._final_boxes(phase)
        if table is not None and cfg.compression in ("cam", "cim", "gt"):
            quality = self._box_quality(table)
            self.phase_log["boxes_area"] = quality["box_area"]
            for key in ("box_iou", "box_iou_whole_image", "box_iou_centre_prior"):
                if key in quality:
                    self.phase_log[key] = quality[key]
        mode = self.memory.mode
        train = self.stream.source.train
        for cls in phase.classes:
            indices = self.stream.train_indices([cls])
            view = cim_lib.ImageBoxDataset(train, indices, self.transforms["test"], self.stream.label_map,
                                           boxes=table, prob=1.0 if table is not None else 0.0,
                                           ratio=cfg.compress_ratio, return_size=True)
            features, kept, sizes = self._features(view)
            if not kept:
                self.memory.add_class(cls, [])
                continue
            boxes = table.select(kept)[0] if mode == "cam" else None
            costs = exemplar_costs(boxes, sizes, cfg.compress_ratio, mode)
            chosen = [kept[i] for i in herding_select(features, costs, budget)]
            chosen = self.runtime.broadcast_object(chosen)  # every rank stores rank 0's choice
            images = [train.load(i) for i in chosen]
            chosen_boxes = table.select(chosen)[0] if mode == "cam" else None
            self.memory.add_class(cls, compress_exemplars(images, chosen_boxes, cfg.compress_ratio, mode,
                                                          indices=chosen, label=cls))
            if mode == "cam" and table.cams is not None:
                self.exemplar_cams[cls] = {"indices": torch.tensor(chosen, dtype=torch.int64),
                                           "cams": table.cams_of(chosen)}

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def _predict(self, net: FosterNet, loader) -> tuple[torch.Tensor, torch.Tensor]:
        rt = self.runtime
        net.eval()
        preds, targets = [], []
        for batch in loader:
            if batch is None:
                continue
            with rt.autocast():
                logits = net(rt.to_device(batch[0], image=True))["logits"].float()
            preds.append(logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu())
            targets.append(torch.as_tensor(batch[1]).cpu())
        if not preds:
            return torch.zeros(0, 5, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
        return torch.cat(preds), torch.cat(targets)

    def _quick_accuracy(self, net: FosterNet, phase: Phase) -> float:
        preds, targets = self._predict(net, self._test_loader(phase))
        return float((preds[:, 0] == targets).double().mean() * 100) if len(targets) else float("nan")

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Everything needed to continue exactly from here (at an epoch boundary or between phases)."""
        net = lambda n: None if n is None else {"spec": n.spec(), "state": n.state_dict()}  # noqa: E731
        return {
            "phase_index": self.phase_index,
            "stage": self.stage,
            "epoch": self.epoch,
            "known": self.known,
            "total": self.total,
            "network": net(self.network),
            "student": net(self.student_net),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "class_weights": None if self.class_weights is None else self.class_weights.cpu(),
            "boxes": None if self.boxes is None else self.boxes.state_dict(),
            "aug_prob": self.aug_prob,
            "phase_log": dict(self.phase_log),
            "memory": self.memory.state_dict(),
            "exemplar_cams": self.exemplar_cams,
            "generator": self.generator.get_state(),
            "calibration": self.calibration,
        }

    def load_state_dict(self, state: dict) -> None:
        rt = self.runtime
        self.phase_index, self.stage, self.epoch = state["phase_index"], state["stage"], state["epoch"]
        self.known, self.total = state["known"], state["total"]

        def build(entry):
            if entry is None:
                return None
            net = FosterNet.from_spec(entry["spec"])
            net.load_state_dict(entry["state"])
            return rt.prepare_model(net)

        self.network = build(state["network"])
        self.student_net = build(state["student"])
        self.memory.load_state_dict(state["memory"])
        self.exemplar_cams = dict(state.get("exemplar_cams", {}))
        self._memory_view = None
        self.class_weights = None if state["class_weights"] is None else state["class_weights"].to(rt.device)
        self.boxes = cim_lib.BoxTable.from_state(state["boxes"])
        self.aug_prob = state["aug_prob"]
        self.phase_log = dict(state["phase_log"])
        self.generator.set_state(state["generator"])
        self.calibration = state.get("calibration")
        self.optimizers, self.schedulers = {}, {}
        phase = self.stream.phases[self.phase_index] if self.phase_index >= 0 else None
        if self.stage == "boost":
            self._make_boost_optimizers(phase)
        elif self.stage == "student":
            self._make_student_optimizer()
        for key, value in state["optimizers"].items():
            self.optimizers[key].load_state_dict(value)
        for key, value in state["schedulers"].items():
            self.schedulers[key].load_state_dict(value)

    # ---------------------------------------------------------------- helpers
    def _emit(self, info: dict) -> None:
        if self.on_epoch_end is not None:
            self.on_epoch_end(info)


def _check_box_sources(cfg: Config, source) -> None:
    """One-line errors, before any training, for settings that need what the source may lack."""
    if cfg.compression == "gt" and getattr(source.train, "object_boxes", None) is None:
        raise ConfigError(f"compression=gt stores exemplars with the source's own object boxes, and {source.name!r} "
                          "has none (synthetic, tinyimagenet and ImageNet with its localisation files have them)")
    if cfg.threshold == "calibrated" and cfg.compression in ("cam", "cim"):
        heldout = getattr(source, "heldout", None)
        if heldout is None or heldout.object_boxes is None:
            raise ConfigError(f"threshold=calibrated chooses the threshold on held-out images with object boxes, and "
                              f"{source.name!r} has none: set data_options.heldout_per_class (synthetic, "
                              "tinyimagenet)")


class _Transformed(torch.utils.data.Dataset):
    """Items (image, label, index) of a dataset of uint8 images, with ``transform`` applied to the image."""

    def __init__(self, dataset, transform):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label, index = self.dataset[i]
        return self.transform(image), label, index


def _accumulate(totals: dict, out: dict, weight: int) -> None:
    for key, value in out.items():
        value = float(value)
        if key == "correct":
            totals[key] = totals.get(key, 0.0) + value
        else:
            totals[key] = totals.get(key, 0.0) + value * weight


def _means(totals: dict, count: int, *, prefix: str) -> dict:
    if not count:
        return {}
    out = {}
    for key, value in totals.items():
        if key == "correct":
            out[prefix + "acc"] = 100.0 * value / count
        else:
            out[prefix + key] = value / count
    return out


def _progress(iterable, *, enabled: bool, initial: int, total: int, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, initial=initial, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _set_postfix(bar, info: dict) -> None:
    if hasattr(bar, "set_postfix"):
        keys = ("train_loss", "train_acc", "meta_outer", "student_loss", "test_top1")
        bar.set_postfix({k: f"{info[k]:.3f}" for k in keys if k in info and isinstance(info[k], float)})

