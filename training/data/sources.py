"""Image sources: one train and one test :class:`ImageSet` per source, and :func:`load_source` to build them.

Sources: ``synthetic`` (in memory, see :mod:`training.data.synthetic`), ``imagefolder`` (``train/`` + ``val/`` class
folders), ``tinyimagenet`` (the official Tiny ImageNet layout, with its object boxes), ``imagenet1000`` (ILSVRC2012
as class folders, or a torchvision ``datasets.ImageNet`` root), ``imagenet100`` (the LUCIR/PODNet/FOSTER/CIM
100-class subset of an ``imagenet1000`` root) and ``food101`` (the official archive layout). File-backed sets
decode lazily with PIL; an unreadable file makes :meth:`ImageSet.load` return ``None`` (warned once per file,
counted in :attr:`ImageSet.bad_count`) or, with ``on_bad_image="error"``, raise :class:`BadImageError` naming the
file.
"""
import os
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from ..messages import did_you_mean, listing
from .boxes import ObjectBoxes, imagenet_boxes, inclusive_box
from .classes import CLASS_RULES, select_classes
from .synthetic import SyntheticSpec, generate

__all__ = [
    "ImageSet",
    "FileImageSet",
    "TensorImageSet",
    "Source",
    "SOURCES",
    "load_source",
    "imagenet100_wnids",
    "decode_image",
    "DataRootError",
    "BadImageError",
    "BadImageWarning",
]

ON_BAD_IMAGE = ("skip", "error")


class DataRootError(ValueError):
    """A data root that is missing or not laid out as the source expects."""


class BadImageError(RuntimeError):
    """An image file that cannot be decoded (raised with ``on_bad_image="error"``)."""


class BadImageWarning(UserWarning):
    """An image file that cannot be decoded was skipped."""


def decode_image(path) -> torch.Tensor:
    """Decode an image file to uint8 Tensor[3, H, W] RGB (grayscale, palette, CMYK, alpha converted) with PIL."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


class ImageSet(torch.utils.data.Dataset):
    """One split of a source.

    Attributes:
        targets (np.ndarray): int64 class id of every image, length N.
        object_boxes (ObjectBoxes | None): true object boxes (y0, y1, x0, x1), half-open, in pixels of the image at
            its original size (:class:`training.data.boxes.ObjectBoxes`): synthetic data, Tiny ImageNet, and
            ImageNet where its localisation annotations are under the root.
    """

    targets: np.ndarray
    object_boxes: ObjectBoxes | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, i) -> torch.Tensor | None:
        """Image ``i`` as uint8 Tensor[3, H, W] at its original resolution, or ``None`` if it cannot be read."""
        raise NotImplementedError

    @property
    def bad_count(self) -> int:
        """Number of distinct images found unreadable so far."""
        return 0

    def __getitem__(self, i):
        return self.load(i), int(self.targets[i])


def _as_object_boxes(boxes):
    """None, an :class:`ObjectBoxes`, or Tensor[N, 4] (one box per image) -> ObjectBoxes | None."""
    if boxes is None or isinstance(boxes, ObjectBoxes):
        return boxes
    return ObjectBoxes.one_per_image(boxes)


class TensorImageSet(ImageSet):
    """Images held in memory as one uint8 Tensor[N, 3, H, W]."""

    def __init__(self, images, targets, object_boxes=None):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        if len(self.targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(self.targets)} targets")
        self.object_boxes = _as_object_boxes(object_boxes)

    def load(self, i):
        return self.images[int(i)].clone()


class FileImageSet(ImageSet):
    """Images decoded from files on demand.

    Unreadable files are remembered in a shared-memory mask, so that DataLoader workers agree on ``bad_count`` and
    each file is decoded, warned about and counted once.
    """

    def __init__(self, paths, targets, *, on_bad_image="skip", object_boxes=None):
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
        paths = [os.fspath(p) for p in paths]
        # The common directory once, then the relative paths as one numpy bytes array: about 40 bytes per
        # ImageNet image, and no per-object refcounts for forked DataLoader workers to copy.
        prefix = os.path.commonprefix([min(paths), max(paths)]) if paths else ""
        self.directory = prefix[: prefix.rfind(os.sep) + 1]
        self._relative = np.array([os.fsencode(p[len(self.directory):]) for p in paths], dtype=np.bytes_)
        self.targets = np.asarray(targets, dtype=np.int64)
        if len(self._relative) != len(self.targets):
            raise ValueError(f"{len(self._relative)} paths but {len(self.targets)} targets")
        self.on_bad_image = on_bad_image
        self._bad = torch.zeros(len(self.targets), dtype=torch.bool).share_memory_()
        self.object_boxes = _as_object_boxes(object_boxes)

    def path(self, i) -> str:
        return self.directory + os.fsdecode(self._relative[int(i)])

    @property
    def bad_count(self) -> int:
        return int(self._bad.sum())

    @property
    def bad_paths(self) -> list[str]:
        return [self.path(i) for i in self._bad.nonzero().flatten().tolist()]

    def load(self, i):
        i = int(i)
        path = self.path(i)
        if self._bad[i] and self.on_bad_image == "skip":
            return None
        try:
            return decode_image(path)
        except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, EOFError... for broken files
            if self.on_bad_image == "error":
                raise BadImageError(f"cannot read image {path}: {error}") from error
            if not self._bad[i]:
                self._bad[i] = True
                warnings.warn(f"skipping unreadable image {path}: {error}", BadImageWarning, stacklevel=2)
            return None


@dataclass
class Source:
    """A dataset: class names (index = class id) and its train and test :class:`ImageSet`."""

    name: str
    num_classes: int
    class_names: list[str]
    train: ImageSet
    test: ImageSet
    image_size: int  # the training resolution this source is meant for
    root: str | None = None
    info: dict = field(default_factory=dict)
    heldout: ImageSet | None = None  # training-split images kept out of training (``heldout_per_class``)

    @property
    def bad_count(self) -> int:
        return self.train.bad_count + self.test.bad_count


# ---------------------------------------------------------------------------------------------------------- layouts

_IMAGEFOLDER_LAYOUT = "<root>/train/<class>/<image> and <root>/val/<class>/<image> (or <root>/test/<class>/<image>)"
_IMAGENET_LAYOUT = (
    "either the ImageFolder layout <root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG, or a torchvision "
    "datasets.ImageNet root holding ILSVRC2012_devkit_t12.tar.gz (or its parsed meta.bin) next to "
    "ILSVRC2012_img_train.tar / ILSVRC2012_img_val.tar or their extracted train/<wnid>/ and val/<wnid>/ folders"
)
_FOOD101_LAYOUT = (
    "the official Food-101 archive layout <root>/images/<class>/<id>.jpg, <root>/meta/train.txt and "
    "<root>/meta/test.txt (lines '<class>/<id>'); <root> may also be the folder that contains food-101/"
)
_DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
_TINYIMAGENET_LAYOUT = (
    "the official Tiny ImageNet layout: <root>/wnids.txt, <root>/train/<wnid>/images/*.JPEG with "
    "<root>/train/<wnid>/<wnid>_boxes.txt, <root>/val/images/*.JPEG with <root>/val/val_annotations.txt "
    "(and optionally <root>/words.txt)"
)


def _root_error(name, root, layout, problem):
    return DataRootError(f"{name}: cannot use data root {str(root)!r}: {problem}. Expected {layout}.")


def _path_problem(path, *, directory):
    """What keeps ``path`` from being the directory (or the regular file) a layout needs, or None."""
    if not path.exists():
        return "does not exist"
    if directory and not path.is_dir():
        return "is not a directory"
    if not directory and not path.is_file():
        return "is a directory, not a file" if path.is_dir() else "is not a regular file"
    return None


def _check_root(name, root, layout):
    if root is None:
        raise DataRootError(f"{name}: needs a data root (--data-root PATH). Expected {layout}.")
    root = Path(root).expanduser()
    problem = _path_problem(root, directory=True)
    if problem:
        raise _root_error(name, root, layout, f"it {problem}")
    return root


def _require(name, root, layout, path, *, directory=False):
    """DataRootError unless ``path`` is a directory (``directory``) or a regular file."""
    problem = _path_problem(path, directory=directory)
    if problem:
        raise _root_error(name, root, layout, f"{path} {problem}")


def _class_folders_problem(directory):
    """Why ``directory`` is not a folder of class folders ("<path> does not exist", ...), or None."""
    problem = _path_problem(directory, directory=True) or (None if _has_class_dirs(directory) else
                                                          "has no class folders")
    return None if problem is None else f"{directory} {problem}"


def _has_class_dirs(directory):
    try:
        with os.scandir(directory) as entries:
            return any(entry.is_dir() for entry in entries)
    except OSError:
        return False


def _has_files(directory):
    try:
        with os.scandir(directory) as entries:
            return any(entry.is_file() for entry in entries)
    except OSError:
        return False


def _scan(name, root, layout, directory, class_to_idx, allow_empty):
    """make_dataset over the given classes, with layout errors turned into one DataRootError (a bounded list of the
    classes without images)."""
    samples = make_dataset(directory, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    found = {target for _, target in samples}
    empty = [c for c, index in sorted(class_to_idx.items()) if index not in found]
    if empty and not allow_empty:
        raise _root_error(name, root, layout, f"in {directory}, {len(empty)} of the {len(class_to_idx)} classes have "
                          f"no image files (extensions {', '.join(IMG_EXTENSIONS)}): {listing(empty)}")
    if not samples:
        raise _root_error(name, root, layout, f"no image files (extensions {', '.join(IMG_EXTENSIONS)}) under "
                          f"{directory}")
    paths, targets = zip(*samples)
    return list(paths), list(targets)


def _imagefolder(name, root, on_bad_image, *, val_dirs=("val", "test"), strict_val=False, layout=_IMAGEFOLDER_LAYOUT,
                 classes=None):
    train_dir = root / "train"
    problem = _class_folders_problem(train_dir)
    if problem:
        raise _root_error(name, root, layout, problem)
    val_dir = next((root / d for d in val_dirs if _has_class_dirs(root / d)), None)
    if val_dir is None:
        raise _root_error(name, root, layout, " and ".join(_class_folders_problem(root / d) for d in val_dirs))
    if classes is None:  # all classes of train/; val/ may not add any
        classes, _ = find_classes(train_dir)
        extra = sorted(set(find_classes(val_dir)[0]) - set(classes))
    else:  # a subset: other class folders are ignored
        extra = []
    class_to_idx = {c: i for i, c in enumerate(classes)}
    if extra:
        raise _root_error(name, root, layout, f"{val_dir} has class folders missing from {train_dir}: "
                          f"{listing(extra)}")
    train = FileImageSet(*_scan(name, root, layout, train_dir, class_to_idx, False), on_bad_image=on_bad_image)
    test = FileImageSet(*_scan(name, root, layout, val_dir, class_to_idx, not strict_val), on_bad_image=on_bad_image)
    return list(classes), train, test


def _torchvision_imagenet(name, root, on_bad_image, classes=None):
    from torchvision.datasets import ImageNet

    splits = {}
    for split in ("train", "val"):
        try:
            dataset = ImageNet(str(root), split=split)
        except Exception as error:  # missing archive, failed checksum, scipy missing for the devkit, ...
            hint = " (torchvision parses the devkit archive with scipy: pip install scipy)" if isinstance(
                error, ImportError) else ""
            raise _root_error(name, root, _IMAGENET_LAYOUT, f"torchvision datasets.ImageNet(split={split!r}) "
                              f"failed: {type(error).__name__}: {error}{hint}") from None
        splits[split] = ([p for p, _ in dataset.samples], [dataset.wnids[t] for _, t in dataset.samples])
    if classes is None:
        classes = sorted(set(splits["train"][1]))
    class_to_idx = {c: i for i, c in enumerate(classes)}
    missing = [c for c in classes if c not in set(splits["train"][1])]
    if missing:
        raise _root_error(name, root, _IMAGENET_LAYOUT, f"{len(missing)} expected classes have no training images "
                          f"({listing(missing)})")
    sets = []
    for split in ("train", "val"):
        paths, wnids = splits[split]
        keep = [k for k, w in enumerate(wnids) if w in class_to_idx]
        sets.append(FileImageSet([paths[k] for k in keep], [class_to_idx[wnids[k]] for k in keep],
                                 on_bad_image=on_bad_image))
    return list(classes), sets[0], sets[1]


def _imagenet(name, root, on_bad_image, classes=None):
    """(classes, train, test, layout) of an ImageNet root, ``classes`` (wnids) selecting a subset."""
    if (root / _DEVKIT).is_file() or (root / "meta.bin").is_file():
        return (*_torchvision_imagenet(name, root, on_bad_image, classes), "torchvision")
    val = root / "val"
    if not _has_class_dirs(val) and _has_files(val):
        raise _root_error(name, root, _IMAGENET_LAYOUT, f"{val} holds files but no <wnid>/ folders (the raw "
                          f"ILSVRC2012 validation layout); put {_DEVKIT} in the root so that torchvision sorts them, "
                          "or sort them into val/<wnid>/ folders")
    found = _imagefolder(name, root, on_bad_image, val_dirs=("val",), strict_val=True, layout=_IMAGENET_LAYOUT,
                         classes=classes)
    return (*found, "imagefolder")


def _checked_box(name, root, where, fields):
    """``x0 y0 x1 y1`` inclusive pixel coordinates (Tiny ImageNet) -> half-open (y0, y1, x0, x1)."""
    try:
        x0, y0, x1, y1 = (int(v) for v in fields)
    except ValueError:
        raise _root_error(name, root, _TINYIMAGENET_LAYOUT, f"{where}: expected four integer box coordinates "
                          f"x0 y0 x1 y1, got {' '.join(fields)!r}") from None
    if not (0 <= x0 <= x1 and 0 <= y0 <= y1):
        raise _root_error(name, root, _TINYIMAGENET_LAYOUT, f"{where}: box x0 y0 x1 y1 = {x0} {y0} {x1} {y1} is "
                          "not 0 <= x0 <= x1, 0 <= y0 <= y1")
    return inclusive_box(x0, y0, x1, y1)


def _annotation_lines(name, root, path, columns):
    """Tab- or space-separated lines of an annotation file, each with ``columns`` fields."""
    _require(name, root, _TINYIMAGENET_LAYOUT, path)
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != columns:
            raise _root_error(name, root, _TINYIMAGENET_LAYOUT, f"{path} line {number}: expected {columns} fields, "
                              f"got {len(fields)}")
        rows.append((f"{path} line {number}", fields))
    return rows


def _tinyimagenet(name, root, on_bad_image, num_classes=None, train_per_class=None, heldout_per_class=None):
    """(classes, class names, train, test, heldout) of a Tiny ImageNet root; the classes are those wnids.txt lists
    (the first ``num_classes`` of them in sorted order, if given), each with its first ``train_per_class`` training
    images (in box-file order; all if None) and, with ``heldout_per_class``, the next that many as held-out images
    (None without it)."""
    wnids_file = root / "wnids.txt"
    _require(name, root, _TINYIMAGENET_LAYOUT, wnids_file)
    classes = sorted({line.strip() for line in wnids_file.read_text().splitlines() if line.strip()})
    if not classes:
        raise _root_error(name, root, _TINYIMAGENET_LAYOUT, f"{wnids_file} lists no classes")
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= len(classes):
            raise ValueError(f"{name}: num_classes must be an int in [1, {len(classes)}] (the classes {wnids_file} "
                             f"lists), got {num_classes!r}")
        classes = classes[:num_classes]
    for key, value in (("train_per_class", train_per_class), ("heldout_per_class", heldout_per_class)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}: {key} must be an int >= 1, got {value!r}")
    if heldout_per_class is not None and train_per_class is None:
        raise ValueError(f"{name}: heldout_per_class needs train_per_class (held-out images are those after the "
                         "first train_per_class of each class)")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    words = {}
    if (root / "words.txt").is_file():
        for line in (root / "words.txt").read_text().splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid.strip()] = text.strip()
    splits = {"train": ([], [], []), "heldout": ([], [], [])}
    for wnid in classes:
        folder = root / "train" / wnid
        lines = _annotation_lines(name, root, folder / f"{wnid}_boxes.txt", 5)
        parts = {"train": lines[:train_per_class]}
        if heldout_per_class is not None:
            parts["heldout"] = lines[train_per_class:train_per_class + heldout_per_class]
            if len(parts["heldout"]) < heldout_per_class:
                raise ValueError(f"{name}: class {wnid} has {len(lines)} training images, fewer than train_per_class "
                                 f"+ heldout_per_class = {train_per_class + heldout_per_class}")
        for split, rows in parts.items():
            for where, fields in rows:
                paths, targets, boxes = splits[split]
                paths.append(folder / "images" / fields[0])
                targets.append(class_to_idx[wnid])
                boxes.append(_checked_box(name, root, where, fields[1:]))
    train_paths, train_targets, train_boxes = splits["train"]
    test_paths, test_targets, test_boxes = [], [], []
    for where, fields in _annotation_lines(name, root, root / "val" / "val_annotations.txt", 6):
        if fields[1] not in class_to_idx:
            continue  # a class that wnids.txt does not list (a subset of the full download)
        test_paths.append(root / "val" / "images" / fields[0])
        test_targets.append(class_to_idx[fields[1]])
        test_boxes.append(_checked_box(name, root, where, fields[2:]))
    missing = [str(p) for p in train_paths[:1] + test_paths[:1] if not p.is_file()]
    if missing or not test_paths:
        problem = f"{missing[0]} does not exist" if missing else "val/val_annotations.txt lists none of its classes"
        raise _root_error(name, root, _TINYIMAGENET_LAYOUT, problem)
    as_boxes = lambda rows: torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)  # noqa: E731
    train = FileImageSet(train_paths, train_targets, on_bad_image=on_bad_image, object_boxes=as_boxes(train_boxes))
    test = FileImageSet(test_paths, test_targets, on_bad_image=on_bad_image, object_boxes=as_boxes(test_boxes))
    heldout = None
    if heldout_per_class is not None:
        paths, targets, boxes = splits["heldout"]
        heldout = FileImageSet(paths, targets, on_bad_image=on_bad_image, object_boxes=as_boxes(boxes))
    return classes, [words.get(c, c) for c in classes], train, test, heldout


def imagenet100_wnids() -> list[str]:
    """The 100 ImageNet class ids (wnids, sorted) of the LUCIR ImageNet-100 subset; class id = position."""
    text = resources.files(__package__).joinpath("imagenet100.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _food101(name, root, on_bad_image):
    if not (root / "meta").is_dir() and (root / "food-101" / "meta").is_dir():
        root = root / "food-101"
    images, meta = root / "images", root / "meta"
    _require(name, root, _FOOD101_LAYOUT, images, directory=True)
    for required in (meta / "train.txt", meta / "test.txt"):
        _require(name, root, _FOOD101_LAYOUT, required)
    splits = {}
    for split in ("train", "test"):
        entries = []
        for number, line in enumerate((meta / f"{split}.txt").read_text().splitlines(), start=1):
            line = line.strip()
            if not line:
                continue
            cls, _, stem = line.partition("/")
            if not cls or not stem or "/" in stem:
                raise _root_error(name, root, _FOOD101_LAYOUT, f"meta/{split}.txt line {number} is {line!r}, not "
                                  "'<class>/<id>'")
            entries.append((cls, images / cls / f"{stem}.jpg"))
        if not entries:
            raise _root_error(name, root, _FOOD101_LAYOUT, f"meta/{split}.txt lists no images")
        splits[split] = entries
    classes_file = meta / "classes.txt"
    if classes_file.is_file():
        classes = [c.strip() for c in classes_file.read_text().splitlines() if c.strip()]
    else:
        classes = sorted({c for c, _ in splits["train"]})
    class_to_idx = {c: i for i, c in enumerate(classes)}
    sets = []
    for split in ("train", "test"):
        unknown = sorted({c for c, _ in splits[split]} - set(class_to_idx))
        if unknown:
            raise _root_error(name, root, _FOOD101_LAYOUT, f"meta/{split}.txt names classes not in the class list: "
                              f"{listing(unknown)}")
        sets.append(FileImageSet([p for _, p in splits[split]], [class_to_idx[c] for c, _ in splits[split]],
                                 on_bad_image=on_bad_image))
    return classes, sets[0], sets[1], root


# ---------------------------------------------------------------------------------------------------------- loaders

_SYNTHETIC_OPTIONS = ("num_classes", "image_size", "train_per_class", "test_per_class", "heldout_per_class", "cell",
                      "decoys", "blobs", "lines", "noise", "tiles")
_FILE_OPTIONS = ("image_size",)
_PER_CLASS_OPTIONS = ("train_per_class", "heldout_per_class")


def _check_options(name, options, allowed):
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"{name}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(allowed) or 'none'}"
                        f"{did_you_mean(unknown[0], allowed)}")


def _load_synthetic(root, seed, on_bad_image, options):
    _check_options("synthetic", options, _SYNTHETIC_OPTIONS)
    spec = SyntheticSpec(seed=seed, **options)
    train, test = generate(spec, "train"), generate(spec, "test")
    heldout = generate(spec, "heldout") if spec.heldout_per_class else None
    return Source(
        name="synthetic",
        num_classes=spec.num_classes,
        class_names=[f"glyph{c:02d}" for c in range(spec.num_classes)],
        train=TensorImageSet(train.images, train.targets.numpy(), train.boxes),
        test=TensorImageSet(test.images, test.targets.numpy(), test.boxes),
        image_size=spec.image_size,
        info={"spec": spec},
        heldout=None if heldout is None else TensorImageSet(heldout.images, heldout.targets.numpy(), heldout.boxes),
    )


def _file_source(name, classes, train, test, root, options, **info):
    return Source(name=name, num_classes=len(classes), class_names=list(classes), train=train, test=test,
                  image_size=int(options.get("image_size", 224)), root=str(root), info=info)


def _load_imagefolder(root, seed, on_bad_image, options):
    _check_options("imagefolder", options, _FILE_OPTIONS)
    root = _check_root("imagefolder", root, _IMAGEFOLDER_LAYOUT)
    classes, train, test = _imagefolder("imagefolder", root, on_bad_image)
    return _file_source("imagefolder", classes, train, test, root, options, layout="imagefolder")


def _load_tinyimagenet(root, seed, on_bad_image, options):
    _check_options("tinyimagenet", options, _FILE_OPTIONS + ("num_classes", "train_per_class", "heldout_per_class"))
    root = _check_root("tinyimagenet", root, _TINYIMAGENET_LAYOUT)
    classes, names, train, test, heldout = _tinyimagenet(
        "tinyimagenet", root, on_bad_image, options.get("num_classes"), options.get("train_per_class"),
        options.get("heldout_per_class"))
    return Source(name="tinyimagenet", num_classes=len(classes), class_names=names, train=train, test=test,
                  image_size=int(options.get("image_size", 64)), root=str(root),
                  info={"layout": "tinyimagenet", "wnids": classes}, heldout=heldout)


def _imagenet_source(name, root, on_bad_image, options, classes=None):
    _check_options(name, options, _FILE_OPTIONS)
    root = _check_root(name, root, _IMAGENET_LAYOUT)
    classes, train, test, layout = _imagenet(name, root, on_bad_image, classes)
    for split, images in (("train", train), ("val", test)):
        images.object_boxes = imagenet_boxes(root, split, [images.path(i) for i in range(len(images))])
    annotated = {split: None if images.object_boxes is None else images.object_boxes.annotated()
                 for split, images in (("train", train), ("val", test))}
    return _file_source(name, classes, train, test, root, options, layout=layout, annotated_images=annotated)


def _load_imagenet1000(root, seed, on_bad_image, options):
    return _imagenet_source("imagenet1000", root, on_bad_image, options)


def _load_imagenet100(root, seed, on_bad_image, options):
    return _imagenet_source("imagenet100", root, on_bad_image, options, classes=imagenet100_wnids())


def _load_food101(root, seed, on_bad_image, options):
    _check_options("food101", options, _FILE_OPTIONS)
    root = _check_root("food101", root, _FOOD101_LAYOUT)
    classes, train, test, root = _food101("food101", root, on_bad_image)
    return _file_source("food101", classes, train, test, root, options, layout="food101")


SOURCES = {
    "synthetic": _load_synthetic,
    "imagefolder": _load_imagefolder,
    "tinyimagenet": _load_tinyimagenet,
    "imagenet1000": _load_imagenet1000,
    "imagenet100": _load_imagenet100,
    "food101": _load_food101,
}


def load_source(name, root=None, *, seed=0, on_bad_image="skip", **options) -> Source:
    """Build a :class:`Source`.

    Args:
        name: one of ``synthetic``, ``imagefolder``, ``tinyimagenet``, ``imagenet1000``, ``imagenet100``,
            ``food101``.
        root: data root (ignored by ``synthetic``).
        seed: seed of the synthetic generator (file sources ignore it).
        on_bad_image: ``"skip"`` (unreadable images load as ``None``, warned once, counted) or ``"error"``.
        **options: ``synthetic``: num_classes, image_size, train_per_class, test_per_class, cell, decoys, blobs,
            lines, noise, heldout_per_class (see :class:`training.data.synthetic.SyntheticSpec`); file sources:
            image_size (the training resolution recorded in the Source, default 224; 64 for tinyimagenet);
            tinyimagenet also num_classes (the first N of the classes wnids.txt lists, in sorted order),
            train_per_class (the first N training images of each class) and heldout_per_class (the next N, as
            ``Source.heldout``). Every source: classes (which classes to use, see :mod:`training.data.classes`).

    Raises:
        ValueError: unknown name or on_bad_image. DataRootError (a ValueError): missing or malformed root; the
        message names the expected layout. TypeError: unknown option.
    """
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(SOURCES)}{did_you_mean(name, SOURCES)}")
    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image must be one of {', '.join(ON_BAD_IMAGE)}, got {on_bad_image!r}")
    classes = options.pop("classes", None)
    if classes is not None and name == "tinyimagenet" and options.get("num_classes") is not None:
        raise ValueError("tinyimagenet: give data_options.num_classes (the first N classes) or data_options.classes, "
                         "not both")
    load = SOURCES[name]
    if isinstance(classes, str) and classes.partition(":")[0].strip() in CLASS_RULES and name != "synthetic":
        # a rule ranks the classes on all their training images: train_per_class does not change what it picks
        whole = {k: v for k, v in options.items() if k not in _PER_CLASS_OPTIONS}
        ranked = select_classes(load(root, seed, on_bad_image, whole), classes).info["classes"]
        source = select_classes(load(root, seed, on_bad_image, options), ranked["selected"])
        source.info["classes"].update({k: v for k, v in ranked.items() if k not in source.info["classes"]})
        return source
    return select_classes(load(root, seed, on_bad_image, options), classes)
