"""True object boxes of a dataset's images, and how CAM boxes are scored against them.

Boxes are (y0, y1, x0, x1), half-open, in pixels of the image at its original size, like every box in cim-ext. An
image may have several true boxes (ImageNet's localisation annotations list one per object) or none (an image
outside the annotated subset); a CAM box is scored against its best match, and images without a true box are left
out of the mean. Readers for the annotation formats: Tiny ImageNet's box files (in :mod:`training.data.sources`),
ImageNet's bounding-box XML files and its ``LOC_*_solution.csv`` files (:func:`imagenet_boxes`).
"""
from __future__ import annotations

import csv
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable, Sequence

import torch

__all__ = ["ObjectBoxes", "box_iou", "centred_boxes", "inclusive_box", "imagenet_boxes", "IMAGENET_BOX_DIRS"]


def box_iou(boxes: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """IoU of paired boxes (y0, y1, x0, x1), int64 [N, 4] each -> float64 [N] (0 where the union is empty)."""
    boxes, other = boxes.to(torch.int64), other.to(torch.int64)
    height = (torch.minimum(boxes[:, 1], other[:, 1]) - torch.maximum(boxes[:, 0], other[:, 0])).clamp(min=0)
    width = (torch.minimum(boxes[:, 3], other[:, 3]) - torch.maximum(boxes[:, 2], other[:, 2])).clamp(min=0)
    inter = (height * width).double()
    area = lambda b: ((b[:, 1] - b[:, 0]) * (b[:, 3] - b[:, 2])).double()  # noqa: E731
    union = area(boxes) + area(other) - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


def centred_boxes(boxes: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """The centre prior of each box: a box of the same area, centred in its image, with the image's aspect ratio
    (a centred square in a square image). int64 [N, 4] boxes and [N, 2] (H, W) sizes -> int64 [N, 4]; an empty box
    stays empty."""
    boxes, sizes = boxes.to(torch.int64), sizes.to(torch.int64)
    area = ((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])).double()
    scale = (area / (sizes[:, 0] * sizes[:, 1]).double().clamp(min=1)).sqrt()
    height = torch.minimum((sizes[:, 0] * scale).round().to(torch.int64), sizes[:, 0])
    width = torch.minimum((sizes[:, 1] * scale).round().to(torch.int64), sizes[:, 1])
    empty = area == 0
    height, width = height.masked_fill(empty, 0), width.masked_fill(empty, 0)
    y0, x0 = (sizes[:, 0] - height) // 2, (sizes[:, 1] - width) // 2
    return torch.stack([y0, y0 + height, x0, x0 + width], 1).masked_fill(empty[:, None], 0)


def inclusive_box(x0: int, y0: int, x1: int, y1: int) -> tuple[int, int, int, int]:
    """Inclusive pixel coordinates ``x0 y0 x1 y1`` (the annotation files' convention) -> half-open (y0, y1, x0, x1)."""
    return y0, y1 + 1, x0, x1 + 1


class ObjectBoxes:
    """Zero or more true boxes per image of an image set, stored flat: ``boxes`` int64 [M, 4] and ``offsets`` int64
    [N + 1] (the boxes of image i are ``boxes[offsets[i]:offsets[i + 1]]``)."""

    def __init__(self, boxes: torch.Tensor, offsets: torch.Tensor):
        self.boxes = boxes.to(torch.int64).reshape(-1, 4)
        self.offsets = offsets.to(torch.int64)
        if self.offsets.dim() != 1 or not len(self.offsets) or int(self.offsets[-1]) != len(self.boxes):
            raise ValueError(f"offsets must be [N + 1] ending at the {len(self.boxes)} boxes")

    @classmethod
    def one_per_image(cls, boxes) -> "ObjectBoxes":
        boxes = torch.as_tensor(boxes, dtype=torch.int64).reshape(-1, 4)
        return cls(boxes, torch.arange(len(boxes) + 1, dtype=torch.int64))

    @classmethod
    def from_lists(cls, per_image: Sequence[Sequence[Sequence[int]]]) -> "ObjectBoxes":
        counts = torch.tensor([len(b) for b in per_image], dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        flat = [box for boxes in per_image for box in boxes]
        return cls(torch.tensor(flat, dtype=torch.int64).reshape(-1, 4), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def of(self, index: int) -> torch.Tensor:
        """The true boxes of image ``index``, int64 [k, 4] (k may be 0)."""
        return self.boxes[int(self.offsets[index]): int(self.offsets[index + 1])]

    def subset(self, indices) -> "ObjectBoxes":
        """The boxes of images ``indices`` (in that order), as a new ObjectBoxes."""
        indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        starts, counts = self.offsets[indices], self.offsets[indices + 1] - self.offsets[indices]
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        within = torch.arange(int(offsets[-1])) - torch.repeat_interleave(offsets[:-1], counts)
        return ObjectBoxes(self.boxes[torch.repeat_interleave(starts, counts) + within], offsets)

    def enclosing(self, index: int, size: tuple) -> tuple:
        """One box around every true box of image ``index`` (what a tight box over a perfect object mask gives),
        clipped to its (H, W) ``size``; the whole image when it has no true box."""
        own = self.of(index)
        height, width = int(size[0]), int(size[1])
        if not len(own):
            return 0, height, 0, width
        y0, x0 = max(0, int(own[:, 0].min())), max(0, int(own[:, 2].min()))
        y1, x1 = min(height, int(own[:, 1].max())), min(width, int(own[:, 3].max()))
        return (y0, y1, x0, x1) if y1 > y0 and x1 > x0 else (0, height, 0, width)

    def annotated(self) -> int:
        """Number of images with at least one box."""
        return int((self.offsets[1:] > self.offsets[:-1]).sum())

    def best_iou(self, indices: Iterable[int], boxes: torch.Tensor) -> torch.Tensor:
        """IoU of ``boxes[j]`` with the best-matching true box of image ``indices[j]``: float64 [len(boxes)], NaN
        where the image has no true box."""
        indices = torch.as_tensor(list(indices) if not isinstance(indices, torch.Tensor) else indices,
                                  dtype=torch.int64)
        starts, ends = self.offsets[indices], self.offsets[indices + 1]
        counts = ends - starts
        out = torch.full((len(indices),), float("nan"), dtype=torch.float64)
        if int(counts.sum()) == 0:
            return out
        owner = torch.repeat_interleave(torch.arange(len(indices)), counts)
        rows = torch.cat([torch.arange(int(s), int(e)) for s, e in zip(starts, ends) if e > s])
        scores = box_iou(boxes.to(torch.int64)[owner], self.boxes[rows])
        best = torch.full((len(indices),), -1.0, dtype=torch.float64).scatter_reduce(0, owner, scores, "amax")
        return torch.where(counts > 0, best, out)


# ------------------------------------------------------------------------------------------------------ ImageNet
#: Folders under an ImageNet data root searched for the bounding-box XML files: the extracted ILSVRC2012 bbox
#: archives (``bbox/train/<wnid>/<wnid>_<id>.xml``, ``bbox/val/ILSVRC2012_val_<id>.xml``) and the Kaggle layout
#: (``ILSVRC/Annotations/CLS-LOC/{train,val}``).
IMAGENET_BOX_DIRS = {
    "train": ("bbox/train", "Annotations/CLS-LOC/train", "ILSVRC/Annotations/CLS-LOC/train"),
    "val": ("bbox/val", "Annotations/CLS-LOC/val", "ILSVRC/Annotations/CLS-LOC/val"),
}
_LOC_CSV = {"train": "LOC_train_solution.csv", "val": "LOC_val_solution.csv"}


def _xml_boxes(path: Path) -> list[tuple[int, int, int, int]]:
    boxes = []
    for box in ET.parse(path).getroot().iter("bndbox"):
        x0, y0, x1, y1 = (int(float(box.findtext(tag))) for tag in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append(inclusive_box(x0, y0, x1, y1))
    return boxes


def _csv_boxes(path: Path) -> dict[str, list[tuple[int, int, int, int]]]:
    """``ImageId -> boxes`` of a LOC_*_solution.csv (PredictionString: ``wnid x0 y0 x1 y1`` repeated)."""
    found = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            fields = row["PredictionString"].split()
            found[row["ImageId"]] = [inclusive_box(*(int(float(v)) for v in fields[k + 1: k + 5]))
                                     for k in range(0, len(fields) - 4, 5)]
    return found


def imagenet_boxes(root, split: str, paths: Sequence[str]) -> ObjectBoxes | None:
    """ImageNet's own localisation boxes of the images ``paths`` (one split), from ``LOC_<split>_solution.csv`` in
    the root and/or the XML files of :data:`IMAGENET_BOX_DIRS`; None when the root has neither. An image is matched
    by its file stem (``n01440764_10026``, ``ILSVRC2012_val_00000001``); images without annotation get no box."""
    root = Path(root)
    by_stem: dict[str, list] = {}
    csv_path = root / _LOC_CSV[split]
    if csv_path.is_file():
        by_stem.update(_csv_boxes(csv_path))
    folders = [root / d for d in IMAGENET_BOX_DIRS[split] if (root / d).is_dir()]
    if not by_stem and not folders:
        return None
    per_image = []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        boxes = by_stem.get(stem)
        if boxes is None:
            wnid = stem.split("_")[0]
            for folder in folders:
                candidate = folder / wnid / f"{stem}.xml" if split == "train" else folder / f"{stem}.xml"
                if candidate.is_file():
                    boxes = _xml_boxes(candidate)
                    break
        per_image.append(boxes or [])
    return ObjectBoxes.from_lists(per_image)
