"""Data-path probe: is the GPU fed, and by which path?

    python -m bench.datapath [--device cpu|cuda] [--steps STEPS_JSON] [--images N] [--root DIR] [--quick]
                             [--out JSON]

On a tree of ImageNet-style JPEG files generated on this machine (``bench.loader.generate_tree``: 300-500 px per
side; 3072 training images, ``--quick`` 48 tiny ones) it measures the images/s of

``workers=N``  the learner's training dataset with the original ImageNet augmentation
               (``training.data.build_transform("train", 224, augment=True)``: PIL decode, RandomResizedCrop, flip,
               colour jitter, AutoAugment, normalise) through a DataLoader with N = 1, 8 and 16 worker processes,
               capped at the cores this process may use, batches copied to the device;
``device``     ``decode_on_device`` (``training.distributed.DeviceDecodedImageSet`` / ``DeviceDecodeLoader``):
               nvJPEG batched decode and the transforms on the GPU, in the main process; CUDA only, skipped on CPU
               with the reason in the JSON,

(``bench.loader.measure_paths``) and sets them beside the step rates of a ``python -m bench.steps`` result
(``--steps``: ``train0``, ``boost``, ``student`` of the cim_ext setting, which should be ResNet-18 at 224, B = 256;
other sizes are flagged). The verdict names the paths that keep up with the fastest of those steps, or says what
fraction of it the best one supplies. Writes ``bench/results/datapath-<device>[-quick]-<date>.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

import torch

from .allocator import OtherLoad
from .loader import compare_to_demand, generate_tree, measure_paths, step_demand, write_report

WORKERS = (1, 8, 16)
#: The step sizes the probe compares with (bench.steps' full sizes).
STEP_SIZES = {"backbone": "resnet18", "image": 224, "batch": 256}
NO_DEVICE_DECODE_ON_CPU = ("decode_on_device decodes the JPEG files with nvJPEG on a CUDA device, and --device cpu "
                           "has none: skipped")


def usable_cores() -> int:
    """Cores this process may run on (its affinity where the platform reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def demand_of(path: str, device: str) -> dict:
    """The step rates of the bench.steps result at ``path``, with ``representative`` false (and ``sizes``) when its
    sizes are not :data:`STEP_SIZES`. ValueError when the file holds no step rate."""
    demand = step_demand(path, device)
    if not demand:
        raise ValueError(f"{path}: no images_per_s of train0, boost or student in its cim_ext setting")
    with open(path) as handle:
        sizes = json.load(handle).get("sizes", {})
    demand["sizes"] = {key: sizes.get(key) for key in STEP_SIZES}
    demand["representative"] = demand["sizes"] == STEP_SIZES
    return demand


def verdict(results: dict, demand: dict) -> dict:
    """Which measured paths keep up with the fastest step of ``demand`` (``fed``: whether any does), or how much of
    it the best path supplies; without ``demand``, the best path alone (``fed`` None)."""
    paths = {name: entry["images_per_s"] for name, entry in results.items() if "images_per_s" in entry}
    if not paths:
        return {"fed": None, "paths": [], "text": "no data path was measured"}
    best = max(paths, key=paths.get)
    if not demand:
        return {"fed": None, "paths": [best],
                "text": f"no step rate (--steps): the fastest path is {best}, {paths[best]:.0f} img/s"}
    rates = {k: v for k, v in demand.items() if k in ("train0", "boost", "student")}
    need = compare_to_demand(results, rates)
    step = max(rates, key=rates.get)
    fed = sorted((name for name, rate in paths.items() if rate >= need), key=paths.get, reverse=True)
    if fed:
        text = (f"fed: {', '.join(f'{n} ({paths[n]:.0f} img/s)' for n in fed)} keep up with the fastest step, "
                f"{step} at {need:.0f} img/s")
    else:
        text = (f"not fed: the fastest path, {best} ({paths[best]:.0f} img/s), supplies {paths[best] / need:.0%} of "
                f"{step}'s {need:.0f} img/s")
    if not demand["representative"]:
        text += f" (step sizes {demand['sizes']}, not {STEP_SIZES}: not representative)"
    return {"fed": bool(fed), "paths": fed or [best], "step": step, "step_images_per_s": need, "text": text}


def main(argv=None) -> int:
    """Measure the data paths, set them beside the step rates, write the JSON; 0 unless nothing was measured."""
    parser = argparse.ArgumentParser(prog="python -m bench.datapath", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", help="a bench.steps result JSON (ResNet-18 224, B = 256) with the step rates")
    parser.add_argument("--images", type=int, default=None, help="generated training images (default 3072)")
    parser.add_argument("--root", help="an imagefolder root (train/<class>/*) instead of a generated tree")
    parser.add_argument("--quick", action="store_true", help="tiny images and batches (CPU/CI smoke run)")
    parser.add_argument("--out", help="output JSON (default bench/results/datapath-<device>[-quick]-<date>.json)")
    args = parser.parse_args(argv)
    if args.images is not None and args.images < 1:
        parser.error(f"--images: expected a positive count, got {args.images}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.root is not None and not os.path.isdir(os.path.join(args.root, "train")):
        parser.error(f"--root: {args.root} has no train/ folder")
    demand = {}
    if args.steps:
        try:
            demand = demand_of(args.steps, device.type)
        except (OSError, json.JSONDecodeError, ValueError) as error:
            parser.error(f"--steps: {error}")

    cores = usable_cores()
    workers = sorted({min(n, cores) for n in WORKERS})
    count = args.images or (48 if args.quick else 3072)
    batch, image_size, skip = (16, 32, 1) if args.quick else (256, 224, 2)
    report = {"environment": {"device": device.type, "cores": cores, "torch": torch.__version__,
                              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                              "date": datetime.date.today().isoformat(), "quick": args.quick},
              "batch": batch, "image_size": image_size, "workers": workers, "root": args.root or "generated"}
    with tempfile.TemporaryDirectory(prefix="bench-datapath-") as tmp, OtherLoad() as load:
        root = args.root
        if root is None:
            started = time.perf_counter()
            root = generate_tree(tmp, count, quick=args.quick)
            report["generate_seconds"] = time.perf_counter() - started
            print(f"generated {count} JPEG files in {report['generate_seconds']:.1f} s")
        report.update(measure_paths(root, device, workers=workers, batch=batch, image_size=image_size, skip=skip,
                                    device_decode=device.type == "cuda"))
    report["environment"]["other_load"] = load.fraction
    if device.type != "cuda":
        report["results"]["device"] = {"skipped": NO_DEVICE_DECODE_ON_CPU}
        print(f"  device     {NO_DEVICE_DECODE_ON_CPU}")
    report["step_demand"] = demand
    report["verdict"] = verdict(report["results"], demand)
    print(report["verdict"]["text"])
    write_report(report, "datapath", device, quick=args.quick, out=args.out)
    return 0 if report["verdict"]["paths"] else 1


if __name__ == "__main__":
    sys.exit(main())
