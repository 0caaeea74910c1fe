"""Which classes of a source a run uses: ``data_options.classes``, for every source.

A protocol names its classes in one of three ways:

- a list of class keys or ids: keys are what the source names its classes by (wnids for ``tinyimagenet`` and the
  ImageNet sources, folder names for ``imagefolder`` and ``food101``, ``glyph00``... for ``synthetic``), ids are
  0-based positions in the source's own class list;
- a file of them, one per line (``#`` starts a comment): ``data_options.classes=/path/to/classes.txt``;
- a rule over the source's true object boxes: ``smallest_boxes:N`` (``largest_boxes:N``), the N classes whose
  training images have the smallest (largest) mean box area, as a fraction of the image. An image's area is that of
  its largest true box; images without a box are left out; ties go to the lower class id.

The selected classes keep the source's order (so ``class_order_seed`` shuffles them as usual) and are renumbered
0..K-1; :func:`select_classes` records what was chosen in ``source.info["classes"]``.
"""
from __future__ import annotations

import dataclasses
import numbers
import os
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

from ..messages import did_you_mean, listing

__all__ = ["CLASS_RULES", "select_classes", "class_keys", "mean_box_areas", "subset_imageset"]

#: Rules of ``data_options.classes``: name -> whether the smallest areas come first.
CLASS_RULES = {"smallest_boxes": True, "largest_boxes": False}


def class_keys(source) -> list[str]:
    """The names a user gives classes by: wnids where the source has them, else its class names."""
    return list(source.info.get("wnids") or source.class_names)


def _image_size(imageset, index: int) -> tuple[int, int]:
    if hasattr(imageset, "images"):  # in memory
        return tuple(imageset.images.shape[-2:])
    with Image.open(imageset.path(index)) as image:  # reads the header only
        return image.height, image.width


def mean_box_areas(imageset, num_classes: int) -> np.ndarray:
    """Mean true-box area fraction of each class's training images (NaN for a class with no boxed image)."""
    boxes = imageset.object_boxes
    targets = np.asarray(imageset.targets)
    sums, counts = np.zeros(num_classes), np.zeros(num_classes)
    for index in range(len(targets)):
        own = boxes.of(index)
        if not len(own):
            continue
        height, width = _image_size(imageset, index)
        area = float(((own[:, 1] - own[:, 0]) * (own[:, 3] - own[:, 2])).max()) / (height * width)
        sums[targets[index]] += area
        counts[targets[index]] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _read_list(name: str, path: str) -> list:
    try:
        with open(path) as handle:
            lines = [line.split("#", 1)[0].strip() for line in handle]
    except OSError as error:
        raise ValueError(f"{name}: data_options.classes: cannot read the class file {path!r} ({error.strerror})") \
            from None
    entries = [line for line in lines if line]
    if not entries:
        raise ValueError(f"{name}: data_options.classes: the class file {path!r} lists no classes")
    return [int(e) if e.isdigit() else e for e in entries]


def _by_rule(name: str, source, rule: str, text: str) -> tuple[list[int], dict]:
    count_text = text.partition(":")[2].strip()
    if not count_text.isdigit() or not 1 <= int(count_text) <= source.num_classes:
        raise ValueError(f"{name}: data_options.classes: {text!r}: expected {rule}:N with N in "
                         f"[1, {source.num_classes}] (the source's classes)")
    if source.train.object_boxes is None:
        raise ValueError(f"{name}: data_options.classes: {rule} needs true object boxes, and this source has none "
                         "(synthetic, tinyimagenet and ImageNet with its localisation files have them)")
    areas = mean_box_areas(source.train, source.num_classes)
    ranked = [c for c in np.argsort(areas if CLASS_RULES[rule] else -areas, kind="stable") if not np.isnan(areas[c])]
    chosen = sorted(int(c) for c in ranked[: int(count_text)])
    if len(chosen) < int(count_text):
        raise ValueError(f"{name}: data_options.classes: {text!r}: only {len(ranked)} classes have boxed images")
    return chosen, {"rule": text, "mean_box_area": {class_keys(source)[c]: float(areas[c]) for c in chosen}}


def _explicit(name: str, source, entries: Sequence) -> list[int]:
    keys = class_keys(source)
    position = {key: k for k, key in enumerate(keys)}
    chosen = []
    for entry in entries:
        if isinstance(entry, bool) or not isinstance(entry, (numbers.Integral, str)):
            raise ValueError(f"{name}: data_options.classes: expected class names or ids, got {entry!r}")
        if isinstance(entry, numbers.Integral):
            if not 0 <= entry < len(keys):
                raise ValueError(f"{name}: data_options.classes: class id {entry} is not in [0, {len(keys)})")
            chosen.append(int(entry))
        elif entry in position:
            chosen.append(position[entry])
        else:
            raise ValueError(f"{name}: data_options.classes: no class {entry!r} in this source (its classes: "
                             f"{listing(keys)}){did_you_mean(entry, keys)}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"{name}: data_options.classes: a class is listed twice")
    return sorted(chosen)


def subset_imageset(imageset, classes: Sequence[int]):
    """The images of ``classes`` (source class ids) with targets renumbered to positions in ``classes``."""
    from .sources import FileImageSet, TensorImageSet

    renumber = {int(c): k for k, c in enumerate(classes)}
    targets = np.asarray(imageset.targets)
    keep = np.flatnonzero(np.isin(targets, list(renumber)))
    new_targets = [renumber[int(t)] for t in targets[keep]]
    boxes = None if imageset.object_boxes is None else imageset.object_boxes.subset(keep)
    if isinstance(imageset, TensorImageSet):
        return TensorImageSet(imageset.images[torch.as_tensor(keep, dtype=torch.int64)], new_targets, boxes)
    return FileImageSet([imageset.path(i) for i in keep], new_targets, on_bad_image=imageset.on_bad_image,
                        object_boxes=boxes)


def select_classes(source, spec: Union[str, Sequence, None]):
    """The source restricted to the classes ``spec`` names (see the module docstring); ``None``: unchanged."""
    if spec is None:
        return source
    name = source.name
    details: dict = {}
    if isinstance(spec, str):
        rule = spec.partition(":")[0].strip()
        if rule in CLASS_RULES:
            chosen, details = _by_rule(name, source, rule, spec)
        elif os.path.isfile(spec):
            chosen = _explicit(name, source, _read_list(name, spec))
            details = {"file": os.path.abspath(spec)}
        else:
            raise ValueError(f"{name}: data_options.classes: {spec!r} is neither a class file that exists nor a rule "
                             f"({', '.join(f'{r}:N' for r in CLASS_RULES)}); a list of classes is given as JSON, "
                             "e.g. [\"n01443537\", 3]")
    elif isinstance(spec, (list, tuple)) and spec:
        chosen = _explicit(name, source, spec)
    else:
        raise ValueError(f"{name}: data_options.classes: expected a non-empty list of classes, a class file or a rule, "
                         f"got {spec!r}")
    keys = class_keys(source)
    info = dict(source.info)
    if "wnids" in info:
        info["wnids"] = [info["wnids"][c] for c in chosen]
    info["classes"] = {"selected": [keys[c] for c in chosen], "ids_in_source": chosen, **details}
    heldout = getattr(source, "heldout", None)
    return dataclasses.replace(
        source, num_classes=len(chosen), class_names=[source.class_names[c] for c in chosen],
        train=subset_imageset(source.train, chosen), test=subset_imageset(source.test, chosen),
        heldout=None if heldout is None else subset_imageset(heldout, chosen), info=info)
