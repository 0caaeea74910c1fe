"""CIM: the bilevel meta-step that learns the rational activations (phi), CAM boxes, and boxed-compression data.

:func:`meta_step` is one CIM meta-iteration (callable on its own, e.g. for throughput benchmarks):

1. rational-branch forward (theta and phi) -> fmaps, logits; ``div = CE(logits)``;
2. ``cams = cim_ext.cam(fmaps, fc.weight.detach(), labels)``; ``reg = MSE(cams, 0)``;
3. ``hybrid = cim_ext.soft_compress(x, cams, compress_ratio)``;
4. inner loss of the ReLU branch on hybrid; gradients of theta minus the heads with ``create_graph=True``;
   ``fast = theta - inner_lr * grad``;
5. ``outer = CE(ReLU branch with fast weights on the next batch) + div_coef * div + reg_coef * reg``;
   gradient for phi only, grad-norm clip, one optimiser step of phi.

As in the original, theta enters the inner loss along two paths: the ReLU branch on the hybrid batch, and the
hybrid batch itself (rational fmaps -> CAM -> soft compression). The inner gradient along the second path depends on
phi, so phi's exact gradient differentiates it once more: double backward through ``rational``, ``cam`` and
``soft_compress`` (their backward ops carry their own autograd, see :mod:`cim_ext._registrations`).
``meta_gradient="first_order"`` detaches theta in the rational branch instead (cheaper, not the original's
gradient: docs/training.md gives its cost and saving). BatchNorm runs in eval mode during the meta-step (as in the
original), so running statistics are not touched.

Boxes (:func:`compute_boxes`) come from ``cim_ext.cam_to_boxes`` on CAM-transformed images (whole image resized,
no crop), at each image's original size, with a fixed threshold or ``"otsu"``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import cim_ext

from .data.boxes import box_iou
from .models import functional_forward, split_parameters

__all__ = [
    "HEAD_PREFIXES",
    "META_GRADIENTS",
    "BoxTable",
    "ImageBoxDataset",
    "CamDataset",
    "inner_parameter_names",
    "meta_objective",
    "meta_step",
    "compute_boxes",
    "truth_boxes",
    "calibrate_threshold",
    "CALIBRATION_GRID",
    "num_meta_iters",
    "upcast",
    "refresh_due",
    "meta_batches",
    "clip_scale",
    "box_iou",
]

#: How phi's gradient is taken: the original's exact second-order gradient, or theta detached in the rational branch.
META_GRADIENTS = ("exact", "first_order")

#: Parameter-name prefixes of the classifier heads, excluded from the inner (fast-weight) step.
HEAD_PREFIXES = ("fc.", "fe_fc.", "old_fc.", "aux_fc.")


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision (autocast) outputs to float32 for losses; float32/float64 unchanged."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def num_meta_iters(num_meta_iters_per_cls: float, new_classes: int) -> int:
    """``int(num_meta_iters_per_cls * new_classes)`` meta-iterations per epoch, as in the original."""
    return int(num_meta_iters_per_cls * new_classes)


def refresh_due(epoch: int, epochs: int, interval: int) -> bool:
    """Whether the boxes are recomputed before ``epoch`` (0-based) of a stage of ``epochs`` epochs.

    As in the original (every ``interval`` epochs, not at the first nor the last epoch), but with the phase's own
    epoch count: the original compared boosting epochs against ``init_epochs - 1``."""
    return epoch % interval == 0 and epoch != 0 and epoch != epochs - 1


def inner_parameter_names(model: nn.Module, head_prefixes: Iterable[str] = HEAD_PREFIXES) -> list[str]:
    """Trainable theta (not rational coefficients, not the classifier heads): the inner step's fast weights."""
    theta, _ = split_parameters(model)
    prefixes = tuple(head_prefixes)
    return [name for name in theta if not name.startswith(prefixes)]


def meta_objective(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    next_batch: tuple[torch.Tensor, torch.Tensor],
    *,
    inner_lr: float,
    compress_ratio: float,
    div_coef: float,
    reg_coef: float,
    inner_loss: Union[Callable[[dict, torch.Tensor], torch.Tensor], None] = None,
    fast_names: Union[list[str], None] = None,
    classifier: str = "fc",
    autocast=None,
    meta_gradient: str = "exact",
) -> tuple[torch.Tensor, dict]:
    """The CIM outer objective as a differentiable function of phi (steps 1-5 of the module docstring).

    Returns (outer loss, dict of detached parts: inner, outer_ce, div, reg). Runs the model in eval mode (restored
    afterwards). See :func:`meta_step` for the arguments.
    """
    if meta_gradient not in META_GRADIENTS:
        raise ValueError(f"meta_gradient: expected one of {META_GRADIENTS}, got {meta_gradient!r}")
    images, labels = batch
    next_images, next_labels = next_batch
    inner_loss = inner_loss or (lambda out, y: F.cross_entropy(upcast(out["logits"]), y))
    fast_names = inner_parameter_names(model) if fast_names is None else list(fast_names)
    autocast = autocast or _no_autocast
    params = dict(model.named_parameters())
    _, phi = split_parameters(model, trainable_only=False)
    was_training = model.training
    model.eval()
    try:
        # 1. rational branch; "first_order" cuts theta's second path through it.
        if meta_gradient == "first_order":
            rational_params = {name: (p if name in phi else p.detach()) for name, p in params.items()}
        else:
            rational_params = params
        with autocast():
            rational_out = functional_forward(model, rational_params, images, "rational")
        div = F.cross_entropy(upcast(rational_out["logits"]), labels)
        # 2. CAM of the labelled class (min-max normalised by the op) and 3. soft compression of the inputs; under
        # AMP the ops' autocast kernels run both in float32.
        weight = params[f"{classifier}.weight"].detach()
        with autocast():
            cams = cim_ext.cam(rational_out["fmaps"], weight, labels)
            hybrid = cim_ext.soft_compress(images.to(cams.dtype), cams, compress_ratio)
        reg = F.mse_loss(cams, torch.zeros_like(cams))
        # 4. inner loss and one differentiable SGD step on theta minus the heads.
        with autocast():
            inner_out = model(hybrid, activation="relu")
            inner = inner_loss(inner_out, labels)
        grads = torch.autograd.grad(inner, [params[n] for n in fast_names], create_graph=True, allow_unused=True)
        fast = {
            name: params[name] if grad is None else params[name] - inner_lr * grad
            for name, grad in zip(fast_names, grads)
        }
        # 5. outer loss of the fast weights on a fresh batch.
        with autocast():
            outer_out = functional_forward(model, fast, next_images, "relu")
        outer_ce = F.cross_entropy(upcast(outer_out["logits"]), next_labels)
        outer = outer_ce + div_coef * div + reg_coef * reg
    finally:
        model.train(was_training)
    parts = {"inner": inner.detach(), "outer_ce": outer_ce.detach(), "div": div.detach(), "reg": reg.detach()}
    return outer, parts


def meta_step(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    next_batch: tuple[torch.Tensor, torch.Tensor],
    *,
    phi_optimizer: torch.optim.Optimizer,
    inner_lr: float,
    compress_ratio: float,
    div_coef: float,
    reg_coef: float,
    max_grad_norm: Union[float, None],
    inner_loss: Union[Callable[[dict, torch.Tensor], torch.Tensor], None] = None,
    fast_names: Union[list[str], None] = None,
    classifier: str = "fc",
    autocast=None,
    meta_gradient: str = "exact",
) -> dict:
    """One CIM meta-iteration; updates the rational coefficients (phi) only, unless its outer loss or phi's
    gradient is not finite (then nothing is updated and ``skipped`` is 1). Returns detached loss tensors.

    Args:
        model: a network whose ``forward(x, activation)`` returns a dict with ``fmaps`` and ``logits``, and whose
            ``<classifier>.weight`` maps the channels of fmaps to classes (``FosterNet`` or any such toy).
        batch, next_batch: (images float [B, C, H, W], labels int64 [B]) on the model's device: the inner batch and
            the fresh batch of the outer loss.
        phi_optimizer: optimiser over the rational coefficients (its parameters get the gradient).
        inner_lr: lr of the differentiable inner SGD step (``lr_now * lr_ratio``).
        compress_ratio, div_coef, reg_coef: as in the config.
        max_grad_norm: clip of phi's gradient norm (None: no clipping).
        inner_loss: ``(outputs, labels) -> loss`` of the ReLU branch on the soft-compressed batch; CE by default
            (the FOSTER loss in boosting phases).
        fast_names: parameters of the inner step; default :func:`inner_parameter_names`.
        classifier: name of the head whose weight gives the CAM.
        autocast: a context manager factory for the forward passes (e.g. ``runtime.autocast``); None: none.
        meta_gradient: ``"exact"`` (the original's gradient) or ``"first_order"`` (theta detached in the rational
            branch; see the module docstring).
    """
    outer, parts = meta_objective(model, batch, next_batch, inner_lr=inner_lr, compress_ratio=compress_ratio,
                                  div_coef=div_coef, reg_coef=reg_coef, inner_loss=inner_loss,
                                  fast_names=fast_names, classifier=classifier, autocast=autocast,
                                  meta_gradient=meta_gradient)
    phi_list = [p for group in phi_optimizer.param_groups for p in group["params"]]
    phi_grads = torch.autograd.grad(outer, phi_list, allow_unused=True)
    phi_optimizer.zero_grad(set_to_none=True)
    for p, g in zip(phi_list, phi_grads):
        p.grad = None if g is None else g.detach()
    present = [g for g in phi_grads if g is not None]
    if max_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(phi_list, max_grad_norm)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in present])) if present else torch.zeros(())
    # A non-finite outer loss or phi gradient is never applied: it would leave every rational, CAM and box NaN
    # for the rest of the phase (what the original code does on real photos).
    skipped = not (bool(torch.isfinite(outer)) and bool(torch.isfinite(torch.as_tensor(grad_norm))))
    if skipped:
        phi_optimizer.zero_grad(set_to_none=True)
    else:
        phi_optimizer.step()
    return {"outer": outer.detach(), **parts, "phi_grad_norm": torch.as_tensor(grad_norm).detach(),
            "skipped": torch.tensor(float(skipped))}


class _NoAutocast:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _no_autocast():
    return _NoAutocast()


# --------------------------------------------------------------------------------------------------------- boxes
@dataclass
class BoxTable:
    """Boxes (y0, y1, x0, x1) at original image size for some training images (by index into the ImageSet)."""

    indices: torch.Tensor  # int64 [N]
    boxes: torch.Tensor  # int64 [N, 4]
    sizes: torch.Tensor  # int64 [N, 2] (H, W) of the original images
    cams: Union[torch.Tensor, None] = None  # float16 [N, h, w]: the normalised CAMs the boxes came from

    def __post_init__(self):
        self._rows = {int(i): r for r, i in enumerate(self.indices.tolist())}

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, index: int) -> bool:
        return int(index) in self._rows

    def box(self, index: int) -> torch.Tensor:
        return self.boxes[self._rows[int(index)]]

    def select(self, indices: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(boxes [n, 4], sizes [n, 2]) of the given indices."""
        rows = torch.tensor([self._rows[int(i)] for i in indices], dtype=torch.int64)
        return self.boxes[rows], self.sizes[rows]

    def cams_of(self, indices: Iterable[int]) -> Union[torch.Tensor, None]:
        """The stored CAMs [n, h, w] of the given indices (None when the table keeps none)."""
        if self.cams is None:
            return None
        return self.cams[torch.tensor([self._rows[int(i)] for i in indices], dtype=torch.int64)]

    def area_fraction(self) -> float:
        """Mean box area / image area."""
        if not len(self):
            return float("nan")
        area = ((self.boxes[:, 1] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 2])).double()
        return float((area / (self.sizes[:, 0] * self.sizes[:, 1]).double()).mean())

    @classmethod
    def empty_boxes(cls, indices) -> "BoxTable":
        """All-zero boxes (the whole image downsampled); sizes unknown (recorded as 0)."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        zeros = torch.zeros(len(indices), 4, dtype=torch.int64)
        return cls(indices, zeros, zeros[:, :2].clone())

    def state_dict(self) -> dict:
        return {"indices": self.indices, "boxes": self.boxes, "sizes": self.sizes, "cams": self.cams}

    @classmethod
    def from_state(cls, state: Union[dict, None]) -> Union["BoxTable", None]:
        return None if state is None else cls(state["indices"], state["boxes"], state["sizes"], state.get("cams"))


class ImageBoxDataset(Dataset):
    """Training/view images of an ImageSet, optionally compressed outside their box before the transform.

    Items: (image float [3, S, S], label (mapped), index[, original size int64 [2] with ``return_size``]); None for
    unreadable images (drop with ``training.data.collate_skip_bad``). With ``prob`` the box compression (``cim_ext.compress`` at the original
    size) is applied with that probability, drawn from torch's RNG (seeded per DataLoader worker); ``prob=1``
    gives the deterministic compressed view used for herding features.
    """

    def __init__(self, imageset, indices, transform, label_map: dict, *, boxes: Union[BoxTable, None] = None,
                 prob: float = 0.0, ratio: float = 1.0, return_size: bool = False):
        self.imageset = imageset
        self.indices = [int(i) for i in indices]
        self.transform = transform
        self.label_map = label_map
        self.boxes = boxes
        self.prob = float(prob)
        self.ratio = float(ratio)
        self.return_size = return_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        image = self.imageset.load(index)
        if image is None:
            return None
        size = torch.tensor(image.shape[-2:], dtype=torch.int64)
        if self.boxes is not None and self.prob > 0 and index in self.boxes:
            if self.prob >= 1 or float(torch.rand(())) < self.prob:
                box = self.boxes.box(index)[None].to(image.device)  # images may be decoded on the GPU
                image = cim_ext.compress(image[None], box, self.ratio)[0]
        label = self.label_map[int(self.imageset.targets[index])]
        if self.return_size:
            return self.transform(image), label, index, size
        return self.transform(image), label, index


class CamDataset(Dataset):
    """Images for CAM boxes: (CAM-transformed image, label (mapped), index, original size int64 [2]) or None."""

    def __init__(self, imageset, indices, transform, label_map: dict):
        self.imageset = imageset
        self.indices = [int(i) for i in indices]
        self.transform = transform
        self.label_map = label_map

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        image = self.imageset.load(index)
        if image is None:
            return None
        size = torch.tensor(image.shape[-2:], dtype=torch.int64)
        return self.transform(image), self.label_map[int(self.imageset.targets[index])], index, size


@torch.no_grad()
def compute_boxes(model: nn.Module, loader, *, activation: str, threshold: Union[float, str], runtime,
                  classifier: str = "fc", progress: bool = False) -> BoxTable:
    """CAM boxes of every image of a :class:`CamDataset` loader, at the images' original sizes.

    The model runs in eval mode with the given activation branch; boxes come from ``cim_ext.cam_to_boxes``.
    """
    was_training = model.training
    model.eval()
    indices, boxes, sizes, cams = [], [], [], []
    weight = getattr(model, classifier).weight.detach()
    try:
        for images, labels, index, size in _maybe_tqdm(loader, progress, "boxes"):
            images = runtime.to_device(images, image=True)
            labels = labels.to(runtime.device)
            size_dev = size.to(runtime.device)
            with runtime.autocast():  # under AMP the CAM ops compute in float32 (their autocast kernels)
                fmaps = model(images, activation=activation)["fmaps"]
                b = cim_ext.cam_to_boxes(fmaps, weight, labels, size_dev, threshold)
                cams.append(cim_ext.cam(fmaps, weight, labels).to(torch.float16).cpu())
            indices.append(index.to(torch.int64))
            boxes.append(b.cpu())
            sizes.append(size)
    finally:
        model.train(was_training)
    if not indices:
        empty = torch.zeros(0, dtype=torch.int64)
        return BoxTable(empty, empty.reshape(0, 4), empty.reshape(0, 2))
    return BoxTable(torch.cat(indices), torch.cat(boxes), torch.cat(sizes), torch.cat(cams))


def truth_boxes(imageset, indices) -> BoxTable:
    """Boxes from the source's own object boxes (``compression="gt"``): for each readable image of ``indices`` the
    one box around its true boxes (:meth:`~training.data.boxes.ObjectBoxes.enclosing`; the whole image, i.e. kept
    uncompressed, where it has none), at its original size."""
    truth = imageset.object_boxes
    kept, boxes, sizes = [], [], []
    for index in indices:
        image = imageset.load(int(index))
        if image is None:
            continue
        size = tuple(image.shape[-2:])
        kept.append(int(index))
        boxes.append(truth.enclosing(int(index), size))
        sizes.append(size)
    as_tensor = lambda rows, width: torch.tensor(rows, dtype=torch.int64).reshape(-1, width)  # noqa: E731
    return BoxTable(as_tensor(kept, 1).reshape(-1), as_tensor(boxes, 4), as_tensor(sizes, 2))


#: Thresholds tried by :func:`calibrate_threshold`.
CALIBRATION_GRID = tuple(round(0.05 * k, 2) for k in range(1, 20))


@torch.no_grad()
def calibrate_threshold(model: nn.Module, loader, truth, *, activation: str, runtime, classifier: str = "fc",
                        grid=CALIBRATION_GRID) -> dict:
    """The fixed CAM threshold whose boxes best match the true boxes of the images of a :class:`CamDataset` loader
    (held-out images: ``threshold="calibrated"``).

    Returns {"threshold": the best of ``grid`` by mean IoU (ties: the higher threshold, i.e. the smaller boxes),
    "iou": {threshold: mean IoU}, "otsu_iou": the per-image Otsu threshold's, "images": how many were scored}."""
    was_training = model.training
    model.eval()
    weight = getattr(model, classifier).weight.detach()
    cams, sizes, indices = [], [], []
    try:
        for images, labels, index, size in loader:
            with runtime.autocast():
                fmaps = model(runtime.to_device(images, image=True), activation=activation)["fmaps"]
                cams.append(cim_ext.cam(fmaps, weight, labels.to(runtime.device)).float().cpu())
            sizes.append(size)
            indices.append(index.to(torch.int64))
    finally:
        model.train(was_training)
    if not cams:
        raise ValueError("threshold=calibrated: no readable held-out image of the phase-0 classes")
    cams, sizes, indices = torch.cat(cams), torch.cat(sizes), torch.cat(indices)
    score = lambda boxes: float(truth.best_iou(indices, boxes).nanmean())  # noqa: E731
    curve = {float(t): score(cim_ext.cam_boxes(cams, sizes, float(t))) for t in grid}
    best = max(sorted(curve, reverse=True), key=lambda t: curve[t])
    thresholds = cim_ext.otsu_threshold(cams, sizes)
    return {"threshold": best, "iou": curve, "otsu_iou": score(cim_ext.cam_boxes(cams, sizes, thresholds)),
            "images": int(len(indices))}


def _maybe_tqdm(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


def meta_batches(loader):
    """Endless iterator over a loader (restarting it when exhausted)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            return


def clip_scale(boosting: bool) -> float:
    """The original clips phi's gradient at max_phi_grad_norm in phase 0 and sqrt(2) x that when boosting."""
    return math.sqrt(2.0) if boosting else 1.0
