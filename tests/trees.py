"""Generated data trees in each source's on-disk layout, for tests (random JPEG pixels, deterministic per seed)."""
import numpy as np
from PIL import Image


def write_jpeg(path, size=(12, 10), mode="RGB", seed=0):
    """A JPEG of random pixels, ``size`` = (width, height), converted to ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, format="JPEG")


def imagenet_tree(root, wnids, per_class=2, val_per_class=1, size=(12, 10)):
    """The ImageFolder layout of ILSVRC2012 (``train/<wnid>/``, ``val/<wnid>/``); also an ``imagefolder`` root."""
    for c, wnid in enumerate(wnids):
        for k in range(per_class):
            write_jpeg(root / "train" / wnid / f"{wnid}_{k}.JPEG", size, seed=c * 10 + k)
        for k in range(val_per_class):
            write_jpeg(root / "val" / wnid / f"ILSVRC2012_val_{c:05d}{k}.JPEG", size, seed=1000 + c * 10 + k)
    return root


def tinyimagenet_tree(root, wnids=("n01", "n02", "n03"), listed=None, per_class=4, val_per_class=2, size=16):
    """A Tiny ImageNet tree in the official layout; wnids.txt lists ``listed`` (default: all). Box of image k of a
    class: x0 y0 x1 y1 = k, 2k, size - 1, size - 1 - k (inclusive); the first train image is grayscale."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in (listed or wnids)))
    (root / "words.txt").write_text("".join(f"{w}\tthing {w}, another name\n" for w in wnids))
    annotations = []
    for c, wnid in enumerate(wnids):
        lines = []
        for k in range(per_class):
            name = f"{wnid}_{k}.JPEG"
            write_jpeg(root / "train" / wnid / "images" / name, (size, size), "L" if c == k == 0 else "RGB",
                       c * 100 + k)
            lines.append(f"{name}\t{k}\t{2 * k}\t{size - 1}\t{size - 1 - k}\n")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(lines))
        for k in range(val_per_class):
            name = f"val_{c * val_per_class + k}.JPEG"
            write_jpeg(root / "val" / "images" / name, (size, size), seed=1000 + c * 10 + k)
            annotations.append(f"{name}\t{wnid}\t0\t0\t{size - 1}\t{k}\n")
    (root / "val" / "val_annotations.txt").write_text("".join(annotations))
    return root


def food101_tree(root, classes=("apple_pie", "baby_back_ribs", "ramen"), train_per_class=2, test_per_class=1,
                 size=(12, 10)):
    """The official Food-101 layout: ``images/<class>/<id>.jpg`` and ``meta/{train,test}.txt``."""
    lines = {"train": [], "test": []}
    for c, name in enumerate(classes):
        for k in range(train_per_class + test_per_class):
            write_jpeg(root / "images" / name / f"{100 + k}.jpg", size, seed=c * 3 + k)
            lines["train" if k < train_per_class else "test"].append(f"{name}/{100 + k}")
    (root / "meta").mkdir(parents=True, exist_ok=True)
    for split, entries in lines.items():
        (root / "meta" / f"{split}.txt").write_text("\n".join(entries) + "\n")
    return root
