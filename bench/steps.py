"""Training throughput: the learner's own step functions with the cim_ext ops vs the reference ops.

    python -m bench.steps [--device cpu|cuda] [--quick] [--out JSON] [--config NAME] [--min-time S]
    python -m bench.steps --project STEPS_JSON [--config NAME] [--out JSON]

Measures images/s of

``train0``   a phase-0 FOSTER step (one backbone, CE)                       :func:`training.learners.steps.train_step`
``boost``    a boosting FOSTER step (new backbone + frozen old one, FOSTER loss)  ``train_step`` with ``foster_loss``
``student``  a FOSTER compression-stage step (student + frozen teacher)     :func:`training.learners.foster.student_step`
``meta0``    a CIM bilevel meta-step, second order, phase-0 network         :func:`training.cim.meta_step`
``meta``     the same on the boosting network (FOSTER inner loss)
``meta0_first_order``, ``meta_first_order``  the same two with ``meta_gradient="first_order"`` (theta detached in
             the rational branch): what the exact second-order gradient costs
``der``      a DER step in a later phase (two backbones, the old one frozen; CE + auxiliary CE)  ``train_step`` with
             :func:`training.learners.der.der_loss`
``der_meta`` the CIM meta-step on that DER network with DER's inner loss (the original DER's: theta's lr, no
             regulariser, no clip)
``infer``    an evaluation forward of the boosting network (no grad)
``memory``   exemplar selection + storage + rebuild for one class: CAM boxes (``cim_ext.cam_to_boxes`` on the
             rational branch), features of the box-compressed views (``cim_ext.compress``), cost-aware herding
             (:func:`training.memory.herding_select`), ``cim_ext.compress_parts`` of the chosen images, copy of
             the parts to host memory (storage), and ``cim_ext.uncompress`` on the device (rebuild)

with ResNet-18 at 224, batch 256, meta batch 16, 100 old + 100 new classes, 1300 candidate images per class
(``--quick``: tiny sizes for CPU/CI), in two settings:

``cim_ext``    the compiled cim_ext ops; on CUDA with AMP bf16 autocast and channels_last (``amp=true``)
``reference``  the same step functions with every cim_ext op swapped for its plain-PyTorch definition in
               :mod:`cim_ext.reference`, float32, no autocast, contiguous NCHW: the original setting

The swap (:func:`reference_ops`) replaces the public op functions on the ``cim_ext`` module (and
``cim_ext.ops.rational``, which ``cim_ext.nn.Rational`` calls) for the duration of a ``with`` block. The training code needs no backend
parameter: every call site in ``training`` resolves ``cim_ext.<op>`` when it runs (tests/test_steps.py checks that the
swap reaches the learner's calls). Convolutions keep PyTorch's defaults in both settings (cuDNN may use TF32 for
float32 convolutions, as the original did); cudnn.benchmark is on in both.

From the measurements the script projects the GPU-hours of the whole schedule of ``--config`` (default the original
ImageNet-1000 B0 10 phases; :func:`project_hours`, formula in its docstring and in docs/scale.md) for both settings,
prints a table and writes JSON (default ``bench/results/steps-<device>[-quick]-<date>.json``), rewritten after every
case so that a run cut short keeps what it measured. Each case runs after warm-up steps with the device synchronised
around every timed step; a case that fails (e.g. an op without a kernel on this device) is recorded with its error
and the others still run. ``--project`` measures nothing: it projects the schedule of ``--config`` (e.g.
``imagenet100``, B0 10 phases) from the rates of an earlier result file.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Callable, Union

import torch

import cim_ext
from cim_ext import reference as _ref

from training import cim as cim_lib
from training.config import ConfigError, load_config
from training.runtime import Runtime
from training.learners.foster import class_balance_weights, foster_loss, student_step
from training.learners.steps import train_step
from training.memory import exemplar_costs, herding_select
from training.learners.der import der_loss
from training.models import DERNet, FosterNet, build_backbone, split_parameters

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ("cim_ext", "reference")
CASES = ("train0", "boost", "student", "meta0", "meta", "meta0_first_order", "meta_first_order", "der", "der_meta",
         "infer", "memory")
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------- op backend
def _reference_uncompress(small, crops, boxes, size):
    if isinstance(crops, (list, tuple)):
        crops = torch.cat([c.reshape(-1) for c in crops]) if crops else small.new_empty(0)
    height, width = (int(v) for v in size)
    return _ref.uncompress(small, crops.reshape(-1), boxes, height, width)


#: Public cim_ext op name -> its plain-PyTorch replacement with the same signature. ``compress_parts`` and
#: ``compress_cost`` are plain PyTorch in cim_ext.ops already (no kernel), so both settings share them.
REFERENCE_OPS: dict[str, Callable] = {
    "cam": _ref.cam,
    "cam_boxes": _ref.cam_boxes,
    "otsu_threshold": _ref.otsu_threshold,
    "cam_to_boxes": _ref.cam_to_boxes,
    "compress": _ref.compress,
    "uncompress": _reference_uncompress,
    "soft_compress": _ref.soft_compress,
    "rational": _ref.rational,
}


#: Dispatcher ops behind each public op (forward and backward kernels).
KERNELS = {
    "cam": ("cam", "_cam_backward"),
    "cam_boxes": ("cam_boxes",),
    "otsu_threshold": ("otsu_threshold",),
    "cam_to_boxes": ("cam_to_boxes",),
    "compress": ("compress",),
    "uncompress": ("uncompress",),
    "soft_compress": ("soft_compress", "_soft_compress_backward"),
    "rational": ("rational", "_rational_backward"),
}


def missing_kernels(device: torch.device) -> list[str]:
    """Public ops with no compiled kernel (forward or backward) for ``device`` in this build."""
    key = "CUDA" if device.type == "cuda" else "CPU"
    return [name for name, kernels in KERNELS.items()
            if not all(torch._C._dispatch_has_kernel_for_dispatch_key(f"cim_ext::{k}", key) for k in kernels)]


@contextlib.contextmanager
def reference_ops(names=None):
    """Within the block, ``cim_ext.<op>`` (and ``cim_ext.ops.rational`` used by ``cim_ext.nn.Rational``) are the
    reference definitions of :data:`REFERENCE_OPS` (all, or those in ``names``); restored on exit."""
    names = list(REFERENCE_OPS) if names is None else [n for n in names if n in REFERENCE_OPS]
    targets = [(cim_ext, name) for name in names] + ([(cim_ext.ops, "rational")] if "rational" in names else [])
    saved = [(module, name, getattr(module, name)) for module, name in targets]
    try:
        for module, name in targets:
            setattr(module, name, REFERENCE_OPS[name])
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def ops_backend(name: str, fallback=()):
    """Context manager of a setting: ``"cim_ext"`` (nothing swapped, except the ops in ``fallback``: those without
    a kernel on the device) or ``"reference"`` (everything swapped)."""
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    if name == "reference":
        return reference_ops()
    return reference_ops(fallback) if fallback else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------- sizes
@dataclass
class Sizes:
    image: int = 224
    batch: int = 256
    meta_batch: int = 16
    known: int = 100  # old classes of the boosting network (phase 1 of ImageNet-1000 B100 10 steps)
    new: int = 100
    candidates: int = 1300  # candidate images of the class in the memory case
    budget: float = 100.0  # the class budget in image units (memory_size 20000 / 200 classes at phase 1)
    chunk: int = 256  # images per forward in the memory case
    backbone: str = "resnet18"
    threshold: float = 0.6
    ratio: float = 4.0


FULL = Sizes()
QUICK = Sizes(image=32, batch=4, meta_batch=2, known=3, new=3, candidates=8, budget=3.0, chunk=4, backbone="resnet32")


# ----------------------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int, min_time: float, min_iters: int,
            max_iters: int) -> list[float]:
    """Seconds of each timed call of ``fn`` (after ``warmup`` untimed calls), the device synchronised before and
    after every call; at least ``min_iters`` calls and ``min_time`` seconds, at most ``max_iters`` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    started = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - started
        if len(times) >= max_iters or (len(times) >= min_iters and elapsed >= min_time):
            return times


# ----------------------------------------------------------------------------------------------------- inputs
class Bench:
    """Networks, optimisers and device-resident inputs of one setting."""

    def __init__(self, sizes: Sizes, device: torch.device, backend: str, *, seed: int = 0):
        self.sizes = sizes
        self.device = device
        self.backend = backend
        fast = backend == "cim_ext" and device.type == "cuda"
        amp = fast and torch.cuda.is_bf16_supported()
        self.runtime = Runtime(device=device, amp_dtype=torch.bfloat16 if amp else None, channels_last=fast)
        self.gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        s = sizes
        self.phase0 = self.runtime.prepare_model(FosterNet(backbone=s.backbone).grow(s.known))
        self.boost = self.runtime.prepare_model(FosterNet(backbone=s.backbone).grow(s.known).grow(s.known + s.new))
        self.student = self.runtime.prepare_model(self.boost.student())
        self.der = self.runtime.prepare_model(DERNet(backbone=s.backbone).grow(s.known).grow(s.known + s.new))
        counts = [20] * s.known + [s.candidates] * s.new
        self.weights = class_balance_weights(counts, 0.97).to(device)
        self.student_weights = class_balance_weights(counts, 0.97).to(device)
        self.batches = [self._batch(s.batch, s.known + s.new) for _ in range(2)]
        self.meta_batches = [self._batch(s.meta_batch, s.known + s.new) for _ in range(3)]
        self.candidates = torch.randint(0, 256, (s.candidates, 3, s.image, s.image), generator=self.gen,
                                        dtype=torch.uint8).to(device)
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255
        self.step_index = 0

    def _batch(self, size: int, classes: int):
        images = torch.randn(size, 3, self.sizes.image, self.sizes.image, generator=self.gen)
        labels = torch.randint(0, classes, (size,), generator=self.gen)
        return self.runtime.to_device(images, image=True), labels.to(self.device)

    def normalize(self, images_u8: torch.Tensor) -> torch.Tensor:
        x = (images_u8.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.runtime.channels_last else x

    def _next(self, batches):
        self.step_index += 1
        return batches[self.step_index % len(batches)]

    # ---------------------------------------------------------------- cases
    def case(self, name: str) -> tuple[Callable[[], object], int]:
        """(step function, images per step) of a case."""
        return getattr(self, f"_case_{name}")()

    def _sgd(self, net):
        theta, _ = split_parameters(net)
        return torch.optim.SGD(list(theta.values()), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def _adam(self, net):
        _, phi = split_parameters(net)
        return torch.optim.Adam(list(phi.values()), lr=0.001)

    def _case_train0(self):
        net, optimizer = self.phase0, self._sgd(self.phase0)
        net.train()
        loss_fn = lambda out, y: foster_loss(out, y, class_weights=None, T=2.0, lambda_okd=1.0)  # noqa: E731

        def step():
            images, labels = self._next(self.batches)
            labels = labels % self.sizes.known
            return train_step(net, images, labels, optimizer=optimizer, loss_fn=loss_fn,
                              autocast=self.runtime.autocast)

        return step, self.sizes.batch

    def _case_boost(self):
        net, optimizer = self.boost, self._sgd(self.boost)
        net.train()
        loss_fn = lambda out, y: foster_loss(out, y, class_weights=self.weights, T=2.0, lambda_okd=1.0)  # noqa: E731

        def step():
            images, labels = self._next(self.batches)
            return train_step(net, images, labels, optimizer=optimizer, loss_fn=loss_fn,
                              autocast=self.runtime.autocast)

        return step, self.sizes.batch

    def _case_student(self):
        student, optimizer = self.student, self._sgd(self.student)
        student.train()
        self.boost.eval()

        def step():
            images, labels = self._next(self.batches)
            return student_step(student, self.boost, images, labels, optimizer=optimizer,
                                class_weights=self.student_weights, T=2.0, autocast=self.runtime.autocast)

        return step, self.sizes.batch

    def _case_der(self):
        net, optimizer = self.der, self._sgd(self.der)
        net.train()
        loss_fn = lambda out, y: der_loss(out, y, known=self.sizes.known)  # noqa: E731

        def step():
            images, labels = self._next(self.batches)
            return train_step(net, images, labels, optimizer=optimizer, loss_fn=loss_fn,
                              autocast=self.runtime.autocast)

        return step, self.sizes.batch

    def _case_der_meta(self):
        net, optimizer = self.der, self._adam(self.der)
        inner_loss = lambda out, y: der_loss(out, y, known=self.sizes.known)[0]  # noqa: E731
        net.train()

        def step():
            first, second = self._next(self.meta_batches), self._next(self.meta_batches)
            return cim_lib.meta_step(net, first, second, phi_optimizer=optimizer, inner_lr=0.1,
                                     compress_ratio=self.sizes.ratio, div_coef=0.2, reg_coef=0.0, max_grad_norm=None,
                                     inner_loss=inner_loss, autocast=self.runtime.autocast)

        return step, self.sizes.meta_batch

    def _meta(self, boosting, meta_gradient="exact"):
        net, classes = (self.boost, self.sizes.known + self.sizes.new) if boosting else (self.phase0, self.sizes.known)
        weights = self.weights if boosting else None
        inner_loss = lambda out, y: foster_loss(out, y, class_weights=weights, T=2.0, lambda_okd=1.0)[0]  # noqa: E731
        optimizer = self._adam(net)
        net.train()

        def step():
            first, second = self._next(self.meta_batches), self._next(self.meta_batches)
            first = (first[0], first[1] % classes)
            second = (second[0], second[1] % classes)
            return cim_lib.meta_step(net, first, second, phi_optimizer=optimizer, inner_lr=0.01,
                                     compress_ratio=self.sizes.ratio, div_coef=0.2, reg_coef=0.1,
                                     max_grad_norm=math.sqrt(2.0), inner_loss=inner_loss,
                                     autocast=self.runtime.autocast, meta_gradient=meta_gradient)

        return step, self.sizes.meta_batch

    def _case_meta0(self):
        return self._meta(boosting=False)

    def _case_meta(self):
        return self._meta(boosting=True)

    def _case_meta0_first_order(self):
        return self._meta(boosting=False, meta_gradient="first_order")

    def _case_meta_first_order(self):
        return self._meta(boosting=True, meta_gradient="first_order")

    def _case_infer(self):
        net = self.boost
        net.eval()

        @torch.no_grad()
        def step():
            images, _ = self._next(self.batches)
            with self.runtime.autocast():
                return net(images)["logits"].float().topk(5, dim=1).indices

        return step, self.sizes.batch

    def _case_memory(self):
        self.stages: dict = {}

        def step():
            self.stages = memory_class(self.boost, self.candidates, label=self.sizes.known, sizes=self.sizes,
                                       runtime=self.runtime, normalize=self.normalize)

        return step, self.sizes.candidates


@torch.no_grad()
def memory_class(net: FosterNet, images: torch.Tensor, *, label: int, sizes: Sizes, runtime: Runtime,
                 normalize: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """Select, store and rebuild the exemplars of one class from its candidate images (uint8 [N, 3, S, S] on the
    device); returns the seconds of each stage (device synchronised between stages)."""
    device = images.device
    was_training = net.training
    net.eval()
    count, side = images.shape[0], images.shape[-1]
    labels = torch.full((count,), label, dtype=torch.int64, device=device)
    image_sizes = torch.tensor([[side, side]], dtype=torch.int64, device=device).expand(count, 2).contiguous()
    weight = net.fc.weight.detach().float()
    stages, mark = {}, time.perf_counter()

    def lap(name):
        nonlocal mark
        synchronize(device)
        now = time.perf_counter()
        stages[name] = now - mark
        mark = now

    try:
        boxes = []
        for start in range(0, count, sizes.chunk):
            part = slice(start, start + sizes.chunk)
            with runtime.autocast():
                fmaps = net(normalize(images[part]), activation="rational")["fmaps"]
            boxes.append(cim_ext.cam_to_boxes(fmaps.float(), weight, labels[part], image_sizes[part],
                                              sizes.threshold))
        boxes = torch.cat(boxes)
        lap("boxes")
        features = []
        for start in range(0, count, sizes.chunk):
            part = slice(start, start + sizes.chunk)
            view = cim_ext.compress(images[part], boxes[part], sizes.ratio)
            with runtime.autocast():
                features.append(net(normalize(view))["features"].float())
        features = torch.cat(features)
        lap("features")
        costs = exemplar_costs(boxes.cpu(), image_sizes.cpu(), sizes.ratio, "cam")
        chosen = herding_select(features, costs, sizes.budget)
        lap("herding")
        index = torch.tensor(chosen, dtype=torch.int64, device=device)
        small, crops = cim_ext.compress_parts(images[index], boxes[index], sizes.ratio)
        small, crops, kept_boxes = small.cpu(), crops.cpu(), boxes[index].cpu()  # the memory lives in host RAM
        lap("store")
        rebuilt = cim_ext.uncompress(small.to(device, non_blocking=True), crops.to(device, non_blocking=True),
                                     kept_boxes.to(device), (side, side))
        lap("rebuild")
        stages["exemplars"] = len(chosen)
        stages["mean_cost"] = float(costs[chosen].mean()) if chosen else float("nan")
        del rebuilt
    finally:
        net.train(was_training)
    return stages


# ----------------------------------------------------------------------------------------------------- DER's size
def der_parameters(backbone: str = "resnet18", *, init_cls: int = 100, increment: int = 100, phases: int = 10) -> list:
    """Parameters of DER's network in each phase (one backbone more per phase, old ones frozen; ``fc`` over every
    backbone's features, ``aux_fc`` over the new one's): total and trainable, counted from one built backbone."""
    one = build_backbone(backbone)
    per_backbone, dim = sum(p.numel() for p in one.parameters()), one.out_dim
    rows = []
    for p in range(phases):
        seen, new = init_cls + p * increment, init_cls if p == 0 else increment
        heads = (p + 1) * dim * seen + dim * (new + 1)  # bias-free heads, as the original's
        aux = 0 if p == 0 else dim * (new + 1)  # phase 0's auxiliary head is built but not trained
        rows.append({"phase": p, "backbones": p + 1, "classes": seen, "total": (p + 1) * per_backbone + heads,
                     "trainable": per_backbone + (p + 1) * dim * seen + aux})
    return rows


# ----------------------------------------------------------------------------------------------------- projection
#: The schedule keys of the original ImageNet-1000 config (xfflzl/CIM-CIL cim-imagenet1000.json), used when no
#: bundled ``imagenet1000`` config is available.
ORIGINAL_IMAGENET1000 = {
    "init_cls": 100, "increment": 100, "memory_size": 20000, "memory_per_class": 20, "fixed_memory": False,
    "init_epochs": 200, "incre_epochs": 170, "compression_epochs": 130, "batch_size": 256, "meta_batch_size": 16,
    "num_meta_iters_per_cls": 0.5, "cam_update_interval": 40, "compress_ratio": 4.0, "compression": "cim",
}


#: Classes of the datasets whose schedules can be projected (training images per class: 1300, test images: 50).
DATASET_CLASSES = {"imagenet100": 100, "imagenet1000": 1000}


def schedule_config(name: str) -> tuple[dict, str]:
    """The schedule keys of a config (bundled name or file) with its ``num_classes`` (from its dataset), or of
    :data:`ORIGINAL_IMAGENET1000` if that config is absent. ValueError for a dataset of unknown class count."""
    try:
        cfg = load_config(name)
    except ConfigError as error:
        if name != "imagenet1000":
            raise
        schedule = dict(ORIGINAL_IMAGENET1000, num_classes=DATASET_CLASSES["imagenet1000"])
        return schedule, f"embedded copy of the original cim-imagenet1000.json ({error})"
    if cfg.dataset not in DATASET_CLASSES:
        raise ValueError(f"config {name!r}: dataset {cfg.dataset!r} has no known class count "
                         f"(one of {', '.join(DATASET_CLASSES)})")
    schedule = {key: getattr(cfg, key) for key in ORIGINAL_IMAGENET1000}
    return dict(schedule, num_classes=DATASET_CLASSES[cfg.dataset]), f"config {name!r}"


def project_hours(rates: dict, schedule: dict, *, num_classes: int = 1000, images_per_class: int = 1300,
                  test_per_class: int = 50, exemplar_cost: float = 1.0) -> dict:
    """Projected single-GPU hours of a whole class-incremental schedule from measured rates.

    ``rates``: ``train0``, ``boost``, ``student``, ``infer`` in images/s; ``meta0``, ``meta`` in meta-steps/s;
    ``boxes`` in images/s (CAM boxes of the rational branch); ``memory`` in seconds per class.

    For phase p with n_p new classes, t_p seen classes and e_p epochs (init_epochs for p = 0, incre_epochs after):

    - training images  D_p = n_p * images_per_class + E_p, with E_p = 0 for p = 0 and otherwise the exemplars kept
      after phase p - 1: min(memory_size, (t_p - n_p) * images_per_class) / exemplar_cost (image units / mean cost);
    - boosting       e_p * D_p / rate(train0 if p = 0 else boost)
    - meta-steps     e_p * int(num_meta_iters_per_cls * n_p) / rate(meta0 if p = 0 else meta)
    - box refreshes  r_p * n_p * images_per_class / rate(boxes), r_p = epochs where training.cim.refresh_due
    - student        compression_epochs * D_p / rate(student)  (p > 0)
    - memory update  n_p * seconds(memory)  (boxes, herding features, herding, compress_parts, rebuild per class)
    - evaluation     2 * test_per_class * t_p / rate(infer)  (teacher and student)

    Data loading is assumed to keep up (bench.loader measures whether it does); hours = sum / 3600.
    """
    epochs0, epochs = schedule["init_epochs"], schedule["incre_epochs"]
    memory_size = schedule["memory_size"] if not schedule["fixed_memory"] else None
    phases, known = [], 0
    sizes = [schedule["init_cls"]]
    while sum(sizes) < num_classes:
        sizes.append(min(schedule["increment"], num_classes - sum(sizes)))
    totals = {"train": 0.0, "meta": 0.0, "boxes": 0.0, "student": 0.0, "memory": 0.0, "eval": 0.0}
    for p, new in enumerate(sizes):
        total = known + new
        e = epochs0 if p == 0 else epochs
        if p == 0:
            stored = 0.0
        else:
            units = (memory_size if memory_size is not None else schedule["memory_per_class"] * known)
            stored = min(units, known * images_per_class) / exemplar_cost
        d = new * images_per_class + stored
        iters = int(schedule["num_meta_iters_per_cls"] * new) if schedule.get("compression", "cim") == "cim" else 0
        refreshes = sum(cim_lib.refresh_due(k, e, schedule["cam_update_interval"]) for k in range(e))
        if schedule.get("compression", "cim") != "cim":
            refreshes = 0
        seconds = {
            "train": e * d / rates["train0" if p == 0 else "boost"],
            "meta": e * iters / rates["meta0" if p == 0 else "meta"] if iters else 0.0,
            "boxes": refreshes * new * images_per_class / rates["boxes"],
            "student": schedule["compression_epochs"] * d / rates["student"] if p > 0 else 0.0,
            "memory": new * rates["memory"],
            "eval": 2 * test_per_class * total / rates["infer"],
        }
        for key, value in seconds.items():
            totals[key] += value
        phases.append({"phase": p, "new": new, "seen": total, "epochs": e, "train_images": d, "meta_iters": iters,
                       "refreshes": refreshes, "hours": sum(seconds.values()) / 3600,
                       **{f"{k}_hours": v / 3600 for k, v in seconds.items()}})
        known = total
    return {"gpu_hours": sum(totals.values()) / 3600, "hours_by_part": {k: v / 3600 for k, v in totals.items()},
            "phases": phases}


def rates_of(results: dict) -> Union[dict, None]:
    """The rates :func:`project_hours` needs from one setting's case results (None if a case is missing)."""
    needed = {}
    for name in ("train0", "boost", "student", "infer"):
        if "images_per_s" not in results.get(name, {}):
            return None
        needed[name] = results[name]["images_per_s"]
    for name in ("meta0", "meta"):
        if "steps_per_s" not in results.get(name, {}):
            return None
        needed[name] = results[name]["steps_per_s"]
    memory = results.get("memory", {})
    if "seconds" not in memory:
        return None
    needed["memory"] = memory["seconds"]
    needed["boxes"] = memory["images"] / memory["stages"]["boxes"]
    return needed


# ----------------------------------------------------------------------------------------------------- driver
def environment(device: torch.device) -> dict:
    info = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else (
            platform.processor() or platform.machine()),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "cim_ext_cuda_compiled": cim_ext.cuda_compiled(),
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }
    info["ops_without_kernel"] = missing_kernels(device)
    if device.type == "cuda":
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def run_setting(backend: str, sizes: Sizes, device: torch.device, cases, *, warmup: int, min_time: float,
                min_iters: int, max_iters: int, fallback=(), log=print, on_case=None) -> dict:
    """Results of the ``cases`` in one setting; ``on_case(results)`` after each case."""
    results = {}
    with ops_backend(backend, fallback):
        bench = Bench(sizes, device, backend)
        for name in cases:
            try:
                step, images = bench.case(name)
                memory_case = name == "memory"
                times = measure(step, device, warmup=1 if memory_case else warmup, min_time=min_time,
                                min_iters=min(2, min_iters) if memory_case else min_iters,
                                max_iters=min(3, max_iters) if memory_case else max_iters)
                seconds = statistics.median(times)
                entry = {"seconds": seconds, "images": images, "images_per_s": images / seconds,
                         "steps_per_s": 1.0 / seconds, "iters": len(times), "times": times}
                if memory_case:
                    entry["stages"] = dict(bench.stages)
                results[name] = entry
                log(f"  {backend:9s} {name:8s} {images / seconds:10.1f} img/s  ({seconds * 1e3:9.2f} ms/step, "
                    f"{len(times)} steps)")
            except Exception as error:  # record and go on: one missing kernel must not lose the other numbers
                results[name] = {"error": f"{type(error).__name__}: {error}",
                                 "traceback": traceback.format_exc(limit=8)}
                log(f"  {backend:9s} {name:8s} FAILED {type(error).__name__}: {error}")
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if on_case is not None:
                on_case(results)
        del bench
    return results


def projections(settings: dict, schedule: dict, exemplar_cost: float) -> dict:
    """:func:`project_hours` of ``schedule`` for every setting whose results hold all the rates it needs."""
    out = {}
    for backend, results in settings.items():
        rates = rates_of(results)
        if rates is not None:
            out[backend] = {"rates": rates, **project_hours(rates, schedule, num_classes=schedule["num_classes"],
                                                            exemplar_cost=exemplar_cost)}
    return out


def project_main(parser, args) -> int:
    """``--project``: the projection of ``--config``'s schedule from the rates of an earlier result file."""
    try:
        with open(args.project) as handle:
            measured = json.load(handle)
        settings = measured["settings"]
    except (OSError, json.JSONDecodeError, KeyError) as error:
        parser.error(f"--project: cannot read the settings of a bench.steps result from {args.project}: {error}")
    try:
        schedule, schedule_source = schedule_config(args.config)
    except (ConfigError, ValueError) as error:
        parser.error(f"--config: {error}")
    report = {"source": args.project, "environment": measured.get("environment", {}), "sizes": measured.get("sizes"),
              "schedule": schedule, "schedule_source": schedule_source, "exemplar_cost": args.exemplar_cost,
              "formula": project_hours.__doc__, "projection": projections(settings, schedule, args.exemplar_cost)}
    if not report["projection"]:
        print(f"{args.project}: no setting has every rate the projection needs "
              "(train0, boost, student, infer, meta0, meta, memory)")
        return 1
    if (report["sizes"] or {}).get("batch", 0) < 64:
        print("(quick sizes: the projection is not representative)")
    print_projection(report)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=2)
        print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.steps", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU/CI smoke run, not representative)")
    parser.add_argument("--out", help="output JSON (default bench/results/steps-<device>[-quick]-<date>.json)")
    parser.add_argument("--config", default="imagenet1000",
                        help="config whose schedule is projected (imagenet1000: B0 10 phases; imagenet100 likewise)")
    parser.add_argument("--project", metavar="STEPS_JSON",
                        help="measure nothing: project --config's schedule from this earlier bench.steps result")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset of cim_ext,reference")
    parser.add_argument("--min-time", type=float, default=None, help="seconds of timed steps per case")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--no-fallback", action="store_true",
                        help="cim_ext setting: fail the cases that need an op without a kernel on the device instead "
                             "of running that op's reference definition (recorded as fallback_ops)")
    parser.add_argument("--exemplar-cost", type=float, default=1.0,
                        help="mean exemplar cost in image units for the projection (exemplars = memory_size / cost)")
    args = parser.parse_args(argv)
    if not args.exemplar_cost > 0:
        parser.error(f"--exemplar-cost: expected a positive number, got {args.exemplar_cost}")
    if args.project:
        return project_main(parser, args)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    sizes = QUICK if args.quick else FULL
    cases = [c for c in args.cases.split(",") if c]
    backends = [b for b in args.backends.split(",") if b]
    for c in cases:
        if c not in CASES:
            parser.error(f"--cases: unknown case {c!r}; choose from {', '.join(CASES)}")
    for b in backends:
        if b not in BACKENDS:
            parser.error(f"--backends: unknown {b!r}; choose from {', '.join(BACKENDS)}")
    if args.min_time is not None and args.min_time < 0:
        parser.error(f"--min-time: expected seconds >= 0, got {args.min_time}")
    try:
        schedule, schedule_source = schedule_config(args.config)
    except (ConfigError, ValueError) as error:
        parser.error(f"--config: {error}")
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    min_time = args.min_time if args.min_time is not None else (0.0 if args.quick else 2.0)
    min_iters, max_iters = (1, 1) if args.quick else (3, 50)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    info = environment(device)
    info["quick"] = args.quick
    print(f"bench.steps on {info['device_name']} (torch {info['torch']}, cuda {info['cuda']}); sizes {asdict(sizes)}")
    fallback = [] if args.no_fallback else info["ops_without_kernel"]
    info["fallback_ops"] = fallback
    if info["ops_without_kernel"]:
        print(f"  note: no {device.type} kernel for {', '.join(info['ops_without_kernel'])}"
              + ("; the cim_ext setting runs their reference definitions (fallback_ops)" if fallback else ""))

    name = f"steps-{device.type}{'-quick' if args.quick else ''}-{info['date']}.json"
    out = args.out or os.path.join(HERE, "results", name)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    started = time.perf_counter()
    settings: dict = {}
    der_rows = der_parameters(sizes.backbone)

    def write(complete: bool) -> dict:
        """Write the report of what was measured so far (``complete`` once every setting has run)."""
        report = {"environment": info, "sizes": asdict(sizes), "settings": settings, "schedule": schedule,
                  "schedule_source": schedule_source, "exemplar_cost": args.exemplar_cost,
                  "formula": project_hours.__doc__, "projection": projections(settings, schedule, args.exemplar_cost),
                  "speedup": {}, "der_parameters": der_rows, "complete": complete,
                  "bench_seconds": time.perf_counter() - started}
        fast, slow = settings.get("cim_ext", {}), settings.get("reference", {})
        for case in cases:
            if "seconds" in fast.get(case, {}) and "seconds" in slow.get(case, {}):
                report["speedup"][case] = slow[case]["seconds"] / fast[case]["seconds"]
        with open(out, "w") as handle:
            json.dump(report, handle, indent=2)
        return report

    for b in backends:
        def case_done(results, backend=b):
            settings[backend] = results
            write(complete=False)

        settings[b] = run_setting(b, sizes, device, cases, warmup=warmup, min_time=min_time, min_iters=min_iters,
                                  max_iters=max_iters, fallback=fallback if b == "cim_ext" else (), on_case=case_done)
    report = write(complete=True)
    print_report(report)
    print(f"wrote {out}")
    failed = [f"{b}/{c}" for b, res in settings.items() for c, entry in res.items() if "error" in entry]
    return 1 if failed and len(failed) == sum(len(r) for r in settings.values()) else 0


def print_report(report: dict) -> None:
    settings = report["settings"]
    backends = list(settings)
    print(f"\n{'case':8s} " + " ".join(f"{b + ' img/s':>18s}" for b in backends) + f" {'speed-up':>9s}")
    for name in CASES:
        if not any(name in settings[b] for b in backends):
            continue
        cells = []
        for b in backends:
            entry = settings[b].get(name, {})
            cells.append(f"{entry['images_per_s']:18.1f}" if "images_per_s" in entry else f"{'failed':>18s}")
        speed = report["speedup"].get(name)
        print(f"{name:8s} " + " ".join(cells) + (f" {speed:8.2f}x" if speed else f" {'-':>9s}"))
    if report["sizes"]["batch"] < 64:
        print("(quick sizes: the numbers and the projection below are not representative)")
    if report["environment"].get("fallback_ops"):
        print(f"(cim_ext setting with reference definitions for {', '.join(report['environment']['fallback_ops'])}: "
              "no kernel on this device)")
    print_projection(report)


def print_projection(report: dict) -> None:
    """One line per setting: the projected hours of the report's schedule, by part."""
    schedule = report["schedule"]
    base = 0 if schedule["init_cls"] == schedule["increment"] else schedule["init_cls"]  # B0: equal phases
    for b, projection in report["projection"].items():
        parts = ", ".join(f"{k} {v:.1f}" for k, v in projection["hours_by_part"].items())
        print(f"projected GPU-hours, {schedule['num_classes']} classes B{base} {len(projection['phases'])} phases "
              f"({report['schedule_source']}), {b}: {projection['gpu_hours']:.1f} h  ({parts})")
    if len(report["projection"]) == 2:
        fast, slow = report["projection"]["cim_ext"]["gpu_hours"], report["projection"]["reference"]["gpu_hours"]
        print(f"schedule speed-up cim_ext vs reference: {slow / fast:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
