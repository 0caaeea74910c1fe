"""Exemplar memory with compressed exemplars (CIM, CVPR 2023).

A stored exemplar is what :func:`cim_ext.compress_parts` splits an image into: the nearest-exact downsampled image
(``small``) and the full-resolution crop of its box. Training images are rebuilt with :func:`cim_ext.uncompress`,
so a rebuilt exemplar is bit-exact equal to :func:`cim_ext.compress` of the original image.

Budget, in image units as in the original code: ``memory_per_class`` per class when ``fixed_memory``, else
``memory_size // total_seen_classes`` (:func:`class_budget`). Herding (iCaRL) picks exemplars in order and adds them
while the summed cost stays within the class budget, stopping at the first exemplar that does not fit (the original
rule); old classes are trimmed to a shrinking budget by keeping the longest prefix of their stored order that fits.

Cost of one exemplar (:func:`exemplar_costs`): ``compress_cost = A + (1 - A) / ratio`` (A = box area fraction), raised
to the exemplar's real stored size in image units when that is larger. The memory drops the small-image pixels
whose whole upsampled cell lies inside the box (they are never used on rebuild), so an exemplar stores
``C * (kept small pixels + box area)`` bytes. When a box edge cuts through a small-image cell, that cell must still be
kept, and the real size can exceed ``compress_cost`` by a thin boundary term (about the box perimeter in cells);
charging the larger of the two keeps the real bytes of every class within its budget's byte equivalent. See
docs/memory.md.

With an :class:`~training.exemplar_store.ExemplarStore` (what training runs use) the memory keeps only an index in
RAM: each class's parts are encoded (PNG, lossless, by default) into a shard file of the run directory and decoded
on access; without one (``store=None``) the packed pixels stay in RAM.

Modes: ``"none"`` stores the full image (ratio 1, empty box, cost 1); ``"downsample"`` the whole image downsampled
(empty box, cost 1/ratio); ``"cam"`` a CAM box kept at full resolution (used by both the cam and cim learners).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

import cim_ext

__all__ = [
    "MODES",
    "Exemplar",
    "ExemplarMemory",
    "MemoryDataset",
    "class_budget",
    "compress_exemplars",
    "exemplar_costs",
    "herding_select",
]

MODES = ("none", "downsample", "cam")

# Slack for float accumulation of costs (in image units): a cumulative cost counts as within the budget when it is
# at most budget + _COST_TOLERANCE. 1e-9 image is below one byte for any image under 3e8 pixels.
_COST_TOLERANCE = 1e-9
_EMPTY_BOX = (0, 0, 0, 0)


# --------------------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------------------
def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {list(MODES)}, got {mode!r}")
    return mode


def _check_ratio(ratio):
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not math.isfinite(ratio) or ratio < 1:
        raise ValueError(f"ratio: expected a finite real number >= 1, got {ratio!r}")
    return float(ratio)


def _effective_ratio(mode, ratio):
    """The ratio the ops are called with: 1 for uncompressed exemplars (compress_parts then returns the image)."""
    return 1.0 if mode == "none" else ratio


def _check_budget(budget):
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or math.isnan(budget) or budget < 0:
        raise ValueError(f"budget: expected a real number >= 0 (image units), got {budget!r}")
    return float(budget)


def _sizes_tensor(sizes, count):
    """(H, W) or Tensor[N, 2] or a list of (H, W) -> int64 Tensor[N, 2] on CPU."""
    if isinstance(sizes, torch.Tensor):
        if sizes.shape != (count, 2) or sizes.dtype.is_floating_point:
            raise ValueError(f"sizes: expected an integer tensor of shape ({count}, 2), got {sizes.dtype} {tuple(sizes.shape)}")
        return sizes.to("cpu", torch.int64)
    sizes = list(sizes)
    if len(sizes) == 2 and all(isinstance(v, numbers.Integral) for v in sizes):
        return torch.tensor([sizes], dtype=torch.int64).expand(count, 2).contiguous()
    if len(sizes) != count:
        raise ValueError(f"sizes: expected (H, W) or {count} pairs, got {len(sizes)} entries")
    return torch.tensor([[int(h), int(w)] for h, w in sizes], dtype=torch.int64).reshape(count, 2)


def _boxes_tensor(boxes, count, mode):
    """Boxes used for storage: the given int64 boxes in mode "cam", empty boxes otherwise."""
    if mode != "cam":
        return torch.zeros(count, 4, dtype=torch.int64)
    if not isinstance(boxes, torch.Tensor) or boxes.dtype != torch.int64 or boxes.shape != (count, 4):
        got = f"{boxes.dtype} {tuple(boxes.shape)}" if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise ValueError(f"boxes: mode 'cam' needs an int64 tensor of shape ({count}, 4) = (y0, y1, x0, x1), got {got}")
    return boxes.to("cpu")


# --------------------------------------------------------------------------------------------------------------
# Small-image cell geometry (derived from cim_ext.uncompress itself, so it matches the rebuild exactly)
# --------------------------------------------------------------------------------------------------------------
_GRID_CACHE: dict[tuple[int, int, int, int], tuple[torch.Tensor, ...]] = {}


def _grid(height, width, small_h, small_w):
    """Pixel ranges of the small-image cells after upsampling to (height, width).

    Returns (row_start[h], row_end[h], col_start[w], col_end[w]) int64: small row i covers rebuilt rows
    [row_start[i], row_end[i]) (the nearest-exact map is monotone and onto, so the ranges partition [0, height)).
    Computed by rebuilding index images with :func:`cim_ext.uncompress` and an empty box, one axis at a time
    (nearest-exact scales each axis by its own size ratio).
    """
    key = (height, width, small_h, small_w)
    if key not in _GRID_CACHE:
        empty = torch.zeros(1, 4, dtype=torch.int64)
        column = torch.arange(small_h, dtype=torch.float32).view(1, 1, small_h, 1)
        line = torch.arange(small_w, dtype=torch.float32).view(1, 1, 1, small_w)
        rows = cim_ext.uncompress(column, column.new_empty(0), empty, (height, 1)).reshape(-1).to(torch.int64)
        cols = cim_ext.uncompress(line, line.new_empty(0), empty, (1, width)).reshape(-1).to(torch.int64)
        row_start = torch.full((small_h,), height, dtype=torch.int64).scatter_reduce(
            0, rows, torch.arange(height), "amin")
        row_end = torch.zeros(small_h, dtype=torch.int64).scatter_reduce(0, rows, torch.arange(1, height + 1), "amax")
        col_start = torch.full((small_w,), width, dtype=torch.int64).scatter_reduce(
            0, cols, torch.arange(width), "amin")
        col_end = torch.zeros(small_w, dtype=torch.int64).scatter_reduce(0, cols, torch.arange(1, width + 1), "amax")
        _GRID_CACHE[key] = (row_start, row_end, col_start, col_end)
    return _GRID_CACHE[key]


def _kept_mask(box, size, small_size):
    """Bool Tensor[h, w]: small pixels needed on rebuild (those whose cell is not entirely inside the box)."""
    row_start, row_end, col_start, col_end = _grid(size[0], size[1], small_size[0], small_size[1])
    y0, y1, x0, x1 = box
    rows_in = (row_start >= y0) & (row_end <= y1)
    cols_in = (col_start >= x0) & (col_end <= x1)
    return ~(rows_in[:, None] & cols_in[None, :])


def _kept_count(boxes, sizes, small_sizes):
    """Number of small pixels kept per exemplar (int64 Tensor[N]), from the cell ranges, vectorised per size."""
    counts = torch.empty(boxes.shape[0], dtype=torch.int64)
    groups: dict[tuple, list[int]] = {}
    for n, (size, small) in enumerate(zip(sizes.tolist(), small_sizes.tolist())):
        groups.setdefault(tuple(size) + tuple(small), []).append(n)
    for key, members in groups.items():
        rows = torch.tensor(members, dtype=torch.int64)
        row_start, row_end, col_start, col_end = _grid(*key)
        b = boxes[rows]
        rows_in = ((row_start[None] >= b[:, 0:1]) & (row_end[None] <= b[:, 1:2])).sum(1)
        cols_in = ((col_start[None] >= b[:, 2:3]) & (col_end[None] <= b[:, 3:4])).sum(1)
        counts[rows] = key[2] * key[3] - rows_in * cols_in
    return counts


def _small_sizes(sizes, ratio):
    return torch.tensor([cim_ext.down_size(h, w, ratio) for h, w in sizes.tolist()], dtype=torch.int64).reshape(-1, 2)


def _stored_fraction(boxes, sizes, ratio):
    """Real stored size in image units: (kept small pixels + box area) / (H * W). Float64 Tensor[N]."""
    small_sizes = _small_sizes(sizes, ratio)
    kept = _kept_count(boxes, sizes, small_sizes).to(torch.float64)
    area = ((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])).to(torch.float64)
    return (kept + area) / (sizes[:, 0] * sizes[:, 1]).to(torch.float64)


# --------------------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------------------
def class_budget(config=None, /, *, total_classes, memory_size=None, memory_per_class=None, fixed_memory=None):
    """Per-class budget in image units, as in the original ``samples_per_class``.

    Args:
        config: optional object with attributes ``memory_size``, ``memory_per_class``, ``fixed_memory``; explicit
            keyword values take precedence.
        total_classes (int): classes seen so far, including the current phase's (> 0 unless fixed_memory).

    Returns:
        float: ``memory_per_class`` if ``fixed_memory`` else ``memory_size // total_classes``.
    """
    values = {"memory_size": memory_size, "memory_per_class": memory_per_class, "fixed_memory": fixed_memory}
    for key, value in values.items():
        if value is None:
            if config is None or not hasattr(config, key):
                raise ValueError(f"class_budget: {key} missing (pass it or a config object that has it)")
            values[key] = getattr(config, key)
    if values["fixed_memory"]:
        return float(_check_budget(values["memory_per_class"]))
    if isinstance(total_classes, bool) or not isinstance(total_classes, numbers.Integral) or total_classes < 1:
        raise ValueError(f"total_classes: expected an int >= 1, got {total_classes!r}")
    return float(int(values["memory_size"]) // int(total_classes))


def exemplar_costs(boxes, sizes, ratio, mode):
    """Cost of each candidate exemplar in image units, the cost herding and the memory budget charge.

    Args:
        boxes (Tensor[N, 4] int64 or None): (y0, y1, x0, x1) boxes; used in mode "cam" only.
        sizes ((H, W), list of (H, W) or Tensor[N, 2]): original image sizes.
        ratio (float): compression ratio (>= 1); ignored in mode "none".
        mode (str): "none" | "downsample" | "cam".

    Returns:
        Tensor[N] float64: ``max(cim_ext.compress_cost(boxes, sizes, ratio), stored fraction)``: 1 in mode "none",
        1/ratio in mode "downsample" (unless the image is smaller than sqrt(ratio) per side), and the original
        ``A + (1 - A) / ratio`` in mode "cam" except where box edges cut small-image cells (see module docstring).
    """
    mode = _check_mode(mode)
    ratio = _effective_ratio(mode, _check_ratio(ratio))
    if isinstance(boxes, torch.Tensor):
        count = boxes.shape[0]
    elif isinstance(sizes, torch.Tensor):
        count = sizes.shape[0]
    else:
        sizes = list(sizes)
        single = len(sizes) == 2 and all(isinstance(v, numbers.Integral) for v in sizes)
        count = 1 if single else len(sizes)
    boxes = _boxes_tensor(boxes, count, mode)
    sizes = _sizes_tensor(sizes, count)
    if count == 0:
        return torch.zeros(0, dtype=torch.float64)
    nominal = cim_ext.compress_cost(boxes, sizes, ratio)
    return torch.maximum(nominal, _stored_fraction(boxes, sizes, ratio))


def herding_select(features, costs, budget):
    """iCaRL herding with per-exemplar costs, in herding order.

    Features are L2-normalised (``x / (|x| + 1e-8)`` as in the original); at step k the sample whose addition brings
    the running mean of the selected features closest to the class mean is picked (ties: lowest index). Samples are
    added while the cumulative cost stays within ``budget``; the first one that does not fit ends the selection
    (the original rule), as does running out of samples.

    Args:
        features (Tensor[N, D]): float features of the class's candidate images.
        costs (Tensor[N] or sequence): cost of each candidate in image units (:func:`exemplar_costs`).
        budget (float): class budget in image units.

    Returns:
        list[int]: selected positions into ``features``, in herding order.
    """
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ValueError(f"features: expected a 2-D tensor [N, D], got {getattr(features, 'shape', type(features).__name__)}")
    count = features.shape[0]
    costs = torch.as_tensor(costs, dtype=torch.float64).reshape(-1).cpu()
    if costs.shape[0] != count:
        raise ValueError(f"costs: expected {count} values (one per feature row), got {costs.shape[0]}")
    if count and bool(((costs <= 0) | ~torch.isfinite(costs)).any()):
        raise ValueError("costs: expected finite positive values")
    budget = _check_budget(budget)
    vectors = features.detach().to("cpu", torch.float64)
    vectors = vectors / (vectors.norm(dim=1, keepdim=True) + 1e-8)
    class_mean = vectors.mean(0)
    running = torch.zeros_like(class_mean)
    available = torch.ones(count, dtype=torch.bool)
    selected, spent = [], 0.0
    for k in range(1, count + 1):
        distance = ((class_mean - (running + vectors) / k) ** 2).sum(1)
        distance[~available] = math.inf
        i = int(torch.argmin(distance))
        cost = float(costs[i])
        if spent + cost > budget + _COST_TOLERANCE:
            break
        spent += cost
        selected.append(i)
        running += vectors[i]
        available[i] = False
    return selected


@dataclass
class Exemplar:
    """One compressed exemplar.

    index: position of the source image in its training ImageSet; label: class id (as given to the memory);
    small: uint8 [C, h, w] downsampled image (uncompressed exemplars: the full image); crop: uint8 [C, bh, bw]
    full-resolution box crop (empty for an empty box); box: (y0, y1, x0, x1) in the original image; size: (H, W)
    of the original image; cost: charged cost in image units (:func:`exemplar_costs`).
    Exemplars read back from an :class:`ExemplarMemory` have zeros in the small pixels it does not store.
    """

    index: int
    label: int
    small: torch.Tensor
    crop: torch.Tensor
    box: tuple
    size: tuple
    cost: float


def compress_exemplars(images, boxes, ratio, mode, *, indices=None, label=-1):
    """Compress images into exemplars with :func:`cim_ext.compress_parts` (batched over images of equal size).

    Args:
        images (list of Tensor[C, H, W] uint8): original images (sizes may differ).
        boxes (Tensor[N, 4] int64 or None): boxes in the original images; used in mode "cam" only.
        ratio (float): compression ratio (ignored in mode "none").
        mode (str): "none" | "downsample" | "cam".
        indices (sequence of int, optional): source indices stored in the exemplars (default 0..N-1).
        label (int): label stored in the exemplars (:meth:`ExemplarMemory.add_class` sets it anyway).

    Returns:
        list[Exemplar] in input order, each with its charged cost.
    """
    mode = _check_mode(mode)
    ratio = _effective_ratio(mode, _check_ratio(ratio))
    images = list(images)
    for n, image in enumerate(images):
        if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.dim() != 3:
            got = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"images[{n}]: expected a uint8 tensor [C, H, W], got {got}")
    count = len(images)
    indices = list(range(count)) if indices is None else [int(i) for i in indices]
    if len(indices) != count:
        raise ValueError(f"indices: expected {count} values, got {len(indices)}")
    boxes = _boxes_tensor(boxes, count, mode)
    sizes = torch.tensor([list(image.shape[1:]) for image in images], dtype=torch.int64).reshape(count, 2)
    costs = exemplar_costs(boxes, sizes, ratio, mode)
    out = [None] * count
    groups: dict[tuple, list[int]] = {}
    for n, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(n)
    for members in groups.values():
        batch = torch.stack([images[n].cpu() for n in members])
        group_boxes = boxes[members]
        small, flat = cim_ext.compress_parts(batch, group_boxes, ratio)
        offset = 0
        for row, n in enumerate(members):
            y0, y1, x0, x1 = group_boxes[row].tolist()
            numel = batch.shape[1] * (y1 - y0) * (x1 - x0)
            crop = flat[offset:offset + numel].view(batch.shape[1], y1 - y0, x1 - x0).clone()
            offset += numel
            out[n] = Exemplar(index=indices[n], label=int(label), small=small[row].clone(), crop=crop,
                              box=(y0, y1, x0, x1), size=(int(batch.shape[2]), int(batch.shape[3])),
                              cost=float(costs[n]))
    return out


# --------------------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------------------
@dataclass
class _Stored:
    """Packed exemplar: only the small pixels needed on rebuild (``kept``, C * kept values) and the crop, in RAM;
    or, in a store, the references of its two encoded parts (the small image with the unneeded pixels zeroed, and
    the crop)."""

    index: int
    box: tuple
    size: tuple
    small_size: tuple
    cost: float
    kept_numel: int  # C * kept small pixels
    crop_numel: int  # C * box area
    kept: torch.Tensor = None  # in RAM: uint8 [kept_numel], channel-major
    crop: torch.Tensor = None  # in RAM: uint8 [crop_numel]
    refs: tuple = None  # in a store: (small PartRef, crop PartRef or None)

    @property
    def nbytes(self):
        """Raw pixel bytes the exemplar needs (kept small pixels + crop)."""
        return self.kept_numel + self.crop_numel

    @property
    def encoded_bytes(self):
        """Bytes of its encoded parts in the store (0 in RAM)."""
        return sum(ref.length for ref in self.refs or () if ref is not None)


class ExemplarMemory:
    """Per-class compressed exemplars, in insertion (herding) order.

    Args:
        ratio (float): compression ratio (>= 1); exemplars in mode "none" use 1.
        mode (str): "none" | "downsample" | "cam".
        channels (int): image channels (3).
        store (ExemplarStore, optional): where the pixels go (encoded, on disk); None keeps them in RAM.
    """

    def __init__(self, *, ratio, mode, channels=3, store=None):
        self.mode = _check_mode(mode)
        self.ratio = _check_ratio(ratio)
        self.channels = int(channels)
        self.store = store
        self._classes: dict[int, list[_Stored]] = {}

    @property
    def effective_ratio(self):
        return _effective_ratio(self.mode, self.ratio)

    def __repr__(self):
        return (f"ExemplarMemory(mode={self.mode!r}, ratio={self.ratio}, classes={len(self._classes)}, "
                f"exemplars={len(self)}, cost={self.total_cost():.3f}, bytes={self.bytes_held()})")

    def __len__(self):
        return sum(len(stored) for stored in self._classes.values())

    # ---- building -------------------------------------------------------------------------------------------
    def _pack(self, exemplar):
        small, crop = exemplar.small, exemplar.crop
        size = (int(exemplar.size[0]), int(exemplar.size[1]))
        box = tuple(int(v) for v in exemplar.box)
        where = f"exemplar of image {exemplar.index}"
        if not isinstance(small, torch.Tensor) or small.dtype != torch.uint8 or small.dim() != 3:
            raise ValueError(f"{where}: small must be a uint8 tensor [C, h, w]")
        if small.shape[0] != self.channels:
            raise ValueError(f"{where}: expected {self.channels} channels, got {small.shape[0]}")
        expected = cim_ext.down_size(size[0], size[1], self.effective_ratio)
        if tuple(small.shape[1:]) != expected:
            raise ValueError(f"{where}: small is {tuple(small.shape[1:])}, expected {expected} for size {size} "
                             f"and mode {self.mode!r} (ratio {self.effective_ratio})")
        y0, y1, x0, x1 = box
        if not (0 <= y0 <= y1 <= size[0] and 0 <= x0 <= x1 <= size[1]):
            raise ValueError(f"{where}: box {box} outside the image size {size}")
        if self.mode != "cam" and box != _EMPTY_BOX:
            raise ValueError(f"{where}: mode {self.mode!r} stores no box, got {box}")
        if not isinstance(crop, torch.Tensor) or crop.dtype != torch.uint8 or crop.numel() != self.channels * (y1 - y0) * (x1 - x0):
            raise ValueError(f"{where}: crop must be a uint8 tensor of {self.channels} x {y1 - y0} x {x1 - x0} values")
        cost = float(exemplar.cost)
        floor = float(exemplar_costs(torch.tensor([box]), [size], self.ratio, self.mode)[0])
        if not cost >= floor - _COST_TOLERANCE:
            raise ValueError(f"{where}: cost {cost} is below its charged cost {floor} (use exemplar_costs / "
                             f"compress_exemplars so that the bytes stay within the budget)")
        mask = _kept_mask(box, size, expected)
        kept = small.cpu()[:, mask].reshape(-1).clone()
        return _Stored(index=int(exemplar.index), box=box, size=size, small_size=expected, cost=cost,
                       kept_numel=kept.numel(), crop_numel=crop.numel(), kept=kept, crop=crop.cpu().reshape(-1).clone())

    def _to_store(self, label, records, *, replace=False):
        """Move the pixels of a class's records into the store (one shard, rewritten if ``replace``), leaving
        references."""
        parts = []
        for record in records:
            y0, y1, x0, x1 = record.box
            parts += [self._unpack_small(record), self._crop_of(record).view(self.channels, y1 - y0, x1 - x0)]
        refs = self.store.write(f"class{label:05d}", parts, replace=replace)
        for n, record in enumerate(records):
            record.refs, record.kept, record.crop = (refs[2 * n], refs[2 * n + 1]), None, None

    def add_class(self, label, exemplars, *, replace=False):
        """Store the exemplars of a class in the given (herding) order. A stored label raises unless ``replace``."""
        label = int(label)
        if label in self._classes and not replace:
            raise ValueError(f"add_class: class {label} is already stored (pass replace=True to overwrite it)")
        records = [self._pack(exemplar) for exemplar in exemplars]
        if self.store is not None and records:
            self._to_store(label, records)
        self._classes[label] = records

    def trim(self, label, budget):
        """Keep the longest prefix of the class's stored order whose summed cost fits ``budget``; returns the number
        of exemplars removed."""
        budget = _check_budget(budget)
        stored = self._classes[int(label)]
        spent, keep = 0.0, 0
        for record in stored:
            if spent + record.cost > budget + _COST_TOLERANCE:
                break
            spent += record.cost
            keep += 1
        removed = len(stored) - keep
        del stored[keep:]
        return removed

    def remove_class(self, label):
        del self._classes[int(label)]

    # ---- reading --------------------------------------------------------------------------------------------
    def classes(self):
        """Stored labels in insertion order."""
        return list(self._classes)

    def _records(self, labels=None):
        labels = self.classes() if labels is None else [int(label) for label in labels]
        for label in labels:
            if label not in self._classes:
                raise KeyError(f"class {label} is not in the memory (stored: {self.classes()})")
            for record in self._classes[label]:
                yield label, record

    def _unpack_small(self, record):
        mask = _kept_mask(record.box, record.size, record.small_size)
        if record.refs is None:
            small = torch.zeros(self.channels, *record.small_size, dtype=torch.uint8)
            small[:, mask] = record.kept.view(self.channels, -1)
            return small
        small = self.store.read(record.refs[0])
        if not self.store.lossless:  # a lossy codec may leave non-zero values in the unstored pixels
            small = small.masked_fill(~mask, 0)
        return small

    def _crop_of(self, record):
        """The record's crop, uint8 [C * box area]."""
        if record.refs is None:
            return record.crop
        if record.refs[1] is None:
            return torch.zeros(0, dtype=torch.uint8)
        return self.store.read(record.refs[1]).reshape(-1)

    def exemplars(self, label):
        """The class's exemplars as :class:`Exemplar` (unstored small pixels read as 0), in stored order."""
        return [Exemplar(index=r.index, label=int(label), small=self._unpack_small(r).clone(),
                         crop=self._crop_of(r).view(self.channels, r.box[1] - r.box[0], r.box[3] - r.box[2]).clone(),
                         box=r.box, size=r.size, cost=r.cost) for _, r in self._records([label])]

    def counts(self):
        """{label: number of exemplars}."""
        return {label: len(stored) for label, stored in self._classes.items()}

    def targets(self, labels=None):
        """Labels of the exemplars in the order of :meth:`images`."""
        return [label for label, _ in self._records(labels)]

    def indices(self, labels=None):
        """Source indices of the exemplars in the order of :meth:`images`."""
        return [record.index for _, record in self._records(labels)]

    def total_cost(self, label=None):
        """Summed charged cost in image units (one class or all)."""
        return float(sum(record.cost for _, record in self._records(None if label is None else [label])))

    def compress_cost(self, label=None):
        """Summed ``cim_ext.compress_cost`` of the stored exemplars (the original accounting), for comparison."""
        records = [record for _, record in self._records(None if label is None else [label])]
        if not records:
            return 0.0
        boxes = torch.tensor([record.box for record in records], dtype=torch.int64)
        sizes = torch.tensor([record.size for record in records], dtype=torch.int64)
        return float(cim_ext.compress_cost(boxes, sizes, self.effective_ratio).sum())

    def bytes_held(self, label=None):
        """Raw pixel bytes of the exemplars (kept small pixels + crops), one class or all."""
        return int(sum(record.nbytes for _, record in self._records(None if label is None else [label])))

    def encoded_bytes(self, label=None):
        """Bytes of the exemplars' encoded parts in the store (0 without a store), one class or all."""
        return int(sum(record.encoded_bytes for _, record in self._records(None if label is None else [label])))

    def cost_bytes(self, label=None):
        """Byte equivalent of the charged costs: sum of cost * C * H * W over exemplars (>= :meth:`bytes_held`)."""
        return float(sum(record.cost * self.channels * record.size[0] * record.size[1]
                         for _, record in self._records(None if label is None else [label])))

    def budget_bytes(self, budget_images, image_size):
        """Byte equivalent of a budget in image units for images of ``image_size`` ((H, W) or S): floor(b * C*H*W)."""
        height, width = (image_size, image_size) if isinstance(image_size, numbers.Integral) else image_size
        return int(math.floor(_check_budget(budget_images) * self.channels * int(height) * int(width)
                              + _COST_TOLERANCE * self.channels * int(height) * int(width)))

    def report(self):
        """Per-class and total counts, charged cost, compress_cost, bytes held and cost bytes (JSON-ready)."""
        per_class = {
            str(label): {"exemplars": len(self._classes[label]), "cost": self.total_cost(label),
                         "compress_cost": self.compress_cost(label), "bytes": self.bytes_held(label)}
            for label in self.classes()
        }
        return {"mode": self.mode, "ratio": self.ratio, "exemplars": len(self), "cost": self.total_cost(),
                "compress_cost": self.compress_cost(), "bytes": self.bytes_held(), "cost_bytes": self.cost_bytes(),
                "classes": per_class}

    # ---- rebuilding -----------------------------------------------------------------------------------------
    def _rebuild(self, records, device=None):
        """uint8 images of the records (list order), one cim_ext.uncompress call per (size, small size) group, on
        ``device`` (default: where the memory is held, the CPU)."""
        out = [None] * len(records)
        groups: dict[tuple, list[int]] = {}
        for n, record in enumerate(records):
            groups.setdefault((record.size, record.small_size), []).append(n)
        for (size, _), members in groups.items():
            small = torch.stack([self._unpack_small(records[n]) for n in members])
            boxes = torch.tensor([records[n].box for n in members], dtype=torch.int64).reshape(-1, 4)
            crops = torch.cat([self._crop_of(records[n]) for n in members]) if members else small.new_empty(0)
            if device is not None:
                small, crops, boxes = small.to(device), crops.to(device), boxes.to(device)
            images = cim_ext.uncompress(small, crops, boxes, size)
            for row, n in enumerate(members):
                out[n] = images[row]
        return out

    def images(self, labels=None, device=None):
        """Rebuilt uint8 images [C, H, W] (class order, then stored order), equal to ``cim_ext.compress`` of the
        originals with their boxes; rebuilt on ``device`` if given (e.g. the GPU, in batches)."""
        return self._rebuild([record for _, record in self._records(labels)], device)

    def dataset(self, transform=None, label_map=None, *, labels=None, cache=False, device=None):
        """A :class:`MemoryDataset` over the current exemplars (a snapshot: later changes do not affect it); images
        rebuilt on ``device`` if given."""
        items = list(self._records(labels))
        return MemoryDataset(self, items, transform=transform, label_map=label_map, cache=cache, device=device)

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self):
        """Tensors (and plain values) describing the whole memory (:func:`training.memory_state.memory_state`)."""
        from .memory_state import memory_state

        return memory_state(self)

    def load_state_dict(self, state):
        """Restore :meth:`state_dict` (:func:`training.memory_state.load_memory_state`)."""
        from .memory_state import load_memory_state

        load_memory_state(self, state)


class MemoryDataset(Dataset):
    """Rebuilt exemplars as ``(transform(image), label_map[label], index)`` items, like training.data.PhaseDataset.

    ``transform`` takes a uint8 [C, H, W] tensor (None: the uint8 image itself); ``label_map`` maps memory labels
    to training labels (None: identity); ``index`` is the exemplar's source index in its training ImageSet.
    With ``cache`` all images are rebuilt once (batched); otherwise each item is rebuilt on access; on ``device``
    if given (default: the CPU).
    """

    def __init__(self, memory, items, *, transform=None, label_map=None, cache=False, device=None):
        self._memory = memory
        self._records = [record for _, record in items]
        self.targets = np.array([label if label_map is None else label_map[label] for label, _ in items],
                                dtype=np.int64)
        self.indices = np.array([record.index for record in self._records], dtype=np.int64)
        self.transform = transform
        self.device = device
        self._cache = memory._rebuild(self._records, device) if cache else None

    def __len__(self):
        return len(self._records)

    def load(self, i):
        """The rebuilt uint8 image of item ``i``."""
        if self._cache is not None:
            return self._cache[i]
        return self._memory._rebuild([self._records[i]], self.device)[0]

    def __getitem__(self, i):
        image = self.load(i)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[i]), int(self.indices[i])
