"""Data-path throughput: images/s of the training loader alone, against what a training step consumes.

    python -m bench.loader [--workers 4,8,16] [--root DIR] [--device cpu|cuda] [--images N] [--steps JSON]
                           [--quick] [--out JSON]

Measures, on an ``imagefolder`` tree (``--root``; by default a generated tree of ImageNet-like JPEG files, sizes
300-500 px per side, about 100 KB each):

``workers=N``   the learner's training dataset (``training.cim.ImageBoxDataset``, the original ImageNet train
                transform: RandomResizedCrop 224, flip, colour jitter, AutoAugment, normalise) through
                ``ProcessRuntime.loader`` with N worker processes (PIL decoding; pin_memory, persistent_workers,
                prefetch_factor as in the config), batches copied to the device
``device``      the same dataset with ``decode_on_device``: files read by threads, JPEG decoded in batches on the
                device (nvJPEG on CUDA), transforms and collation on the device, in the main process
``memory``      compressed exemplars (``training.memory.ExemplarMemory``, mode cam, ratio 4) rebuilt with
                ``cim_ext.uncompress`` on the device, in batches (what ``decode_on_device`` does once per phase)

and prints each against the images/s of the training steps measured by ``python -m bench.steps`` (``--steps``, by
default the newest ``bench/results/steps-<device>-*.json``): a loader slower than the boosting step starves it.
Writes ``bench/results/loader-<device>[-quick]-<date>.json``.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import multiprocessing
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _write_image(args) -> None:
    path, seed, quick = args
    from PIL import Image

    rng = np.random.default_rng(seed)
    if quick:
        height, width = int(rng.integers(48, 80)), int(rng.integers(48, 80))
    else:
        height, width = int(rng.integers(300, 501)), int(rng.integers(350, 501))
    coarse = Image.fromarray(rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
    pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def generate_tree(root: str, images: int, *, classes: int = 10, quick: bool = False, seed: int = 0) -> str:
    """An imagefolder tree (train/ and a val/ of ``max(classes, images // 10)``) of generated JPEG files."""
    jobs = []
    for split, count in (("train", images), ("val", max(classes, images // 10))):
        for k in range(count):
            folder = os.path.join(root, split, f"n{k % classes:08d}")
            os.makedirs(folder, exist_ok=True)
            offset = 0 if split == "train" else 10**7
            jobs.append((os.path.join(folder, f"{split}_{k:06d}.JPEG"), seed * 1_000_003 + offset + k, quick))
    processes = max(1, min(os.cpu_count() or 1, 16))
    if processes > 1 and len(jobs) > 64:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            pool.map(_write_image, jobs, chunksize=16)
    else:
        for job in jobs:
            _write_image(job)
    return root


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_pass(loader, runtime, *, skip: int) -> tuple[int, float]:
    """(images, seconds) of a pass over ``loader``, timed from the arrival of batch ``skip - 1`` (worker start-up
    excluded) to the last batch on the device."""
    _synchronize(runtime.device)
    images, start = 0, time.perf_counter() if skip == 0 else None
    for k, batch in enumerate(loader):
        if batch is None:
            continue
        x = runtime.to_device(batch[0], image=True)
        if k == skip - 1:
            _synchronize(runtime.device)
            start = time.perf_counter()
        elif k >= skip:
            images += x.shape[0]
    _synchronize(runtime.device)
    if start is None or not images:
        return 0, float("nan")
    return images, time.perf_counter() - start


def measure_loader(source, runtime, *, batch: int, workers: int, image_size: int, passes: int, skip: int) -> dict:
    from training.cim import ImageBoxDataset
    from training.data import build_transform, collate_skip_bad

    indices = np.arange(len(source.train))
    label_map = {c: c for c in range(source.num_classes)}
    dataset = ImageBoxDataset(source.train, indices, build_transform("train", image_size, augment=True), label_map)
    generator = torch.Generator().manual_seed(0)
    images = seconds = 0.0
    for _ in range(passes):
        loader = runtime.loader(dataset, batch, shuffle=True, generator=generator, collate_fn=collate_skip_bad,
                                workers=workers)
        n, s = _timed_pass(loader, runtime, skip=skip)
        images, seconds = images + n, seconds + s
        del loader
    return {"images": int(images), "seconds": seconds, "images_per_s": images / seconds if seconds else float("nan")}


def measure_memory(source, device: torch.device, *, count: int, ratio: float = 4.0) -> dict:
    """Images/s of rebuilding ``count`` compressed exemplars on ``device`` (one call, batched by size)."""
    from training.memory import ExemplarMemory, compress_exemplars

    rng = np.random.default_rng(0)
    images, boxes = [], []
    for i in range(min(count, len(source.train))):
        image = source.train.load(i)
        if image is None:
            continue
        height, width = image.shape[-2:]
        y0, x0 = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
        images.append(image)
        boxes.append([y0, y0 + height // 2, x0, x0 + width // 2])
    memory = ExemplarMemory(ratio=ratio, mode="cam")
    memory.add_class(0, compress_exemplars(images, torch.tensor(boxes, dtype=torch.int64), ratio, "cam"))
    memory.images(device=device)  # warm-up
    times = []
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        memory.images(device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    return {"images": len(images), "seconds": seconds, "images_per_s": len(images) / seconds,
            "stored_bytes": memory.bytes_held()}


def measure_paths(root: str, device: torch.device, *, workers, batch: int, image_size: int, passes: int = 1,
                  skip: int = 2, device_decode: bool = True, memory_count: int = 0, log=print) -> dict:
    """Images/s of the data paths over the imagefolder tree at ``root``: ``workers=N`` for each N in ``workers``,
    ``device`` (``decode_on_device``; its failure is recorded, not raised) if ``device_decode``, and ``memory`` (the
    exemplar rebuild of ``memory_count`` images) if ``memory_count``. Returns ``{"train_images", "results"}``."""
    from training.data import load_source
    from training.distributed import ProcessRuntime

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = load_source("imagefolder", root)
    results = {}
    base = dict(device=device, channels_last=device.type == "cuda")
    for n in workers:
        runtime = ProcessRuntime(**base)
        results[f"workers={n}"] = measure_loader(source, runtime, batch=batch, workers=n, image_size=image_size,
                                                 passes=passes, skip=skip)
        log(f"  workers={n:<3d} {results[f'workers={n}']['images_per_s']:9.1f} img/s")
    if device_decode:
        runtime = ProcessRuntime(**base, decode_on_device=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decoded = runtime.prepare_source(load_source("imagefolder", root))
        try:
            results["device"] = measure_loader(decoded, runtime, batch=batch, workers=0, image_size=image_size,
                                               passes=passes, skip=skip)
            log(f"  device     {results['device']['images_per_s']:9.1f} img/s (decode_on_device)")
        except Exception as error:  # e.g. no nvJPEG in this torchvision build: report, keep the rest
            results["device"] = {"error": f"{type(error).__name__}: {error}"}
            log(f"  device     FAILED {type(error).__name__}: {error}")
    if memory_count:
        results["memory"] = measure_memory(source, device, count=memory_count)
        log(f"  memory     {results['memory']['images_per_s']:9.1f} img/s (exemplar rebuild on {device.type})")
    return {"train_images": len(source.train), "results": results}


def step_demand(path, device: str) -> dict:
    """Images/s of the cim_ext training steps in a bench.steps JSON (newest of this device if ``path`` is None)."""
    if path is None:
        found = sorted(glob.glob(os.path.join(HERE, "results", f"steps-{device}-2*.json")), key=os.path.getmtime)
        if not found:
            return {}
        path = found[-1]
    with open(path) as handle:
        report = json.load(handle)
    settings = report.get("settings", {}).get("cim_ext", {})
    demand = {name: settings[name]["images_per_s"] for name in ("train0", "boost", "student")
              if "images_per_s" in settings.get(name, {})}
    return {"source": path, **demand} if demand else {}


def compare_to_demand(results: dict, demand: dict) -> float:
    """Add ``fraction_of_fastest_step`` (images/s over the fastest step's) to every loader path of ``results``
    (``memory`` is a once-per-phase rebuild, not a path); returns the fastest step's images/s."""
    need = max(v for k, v in demand.items() if k != "source")
    for name, entry in results.items():
        if name != "memory" and "images_per_s" in entry:
            entry["fraction_of_fastest_step"] = entry["images_per_s"] / need
    return need


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default=None, help="comma-separated worker counts (default 4,8,<cores>)")
    parser.add_argument("--root", help="an imagefolder root (train/<class>/*); default: a generated JPEG tree")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=None, help="generated training images (default 3072)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 256)")
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--no-device-decode", action="store_true", help="skip the decode_on_device measurement")
    parser.add_argument("--steps", help="bench.steps JSON with the step demand (default: newest for the device)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU/CI smoke run)")
    parser.add_argument("--generate", metavar="DIR",
                        help="only write a generated JPEG tree (--images, --classes) to DIR")
    parser.add_argument("--classes", type=int, default=10, help="classes of a generated tree")
    parser.add_argument("--out", help="output JSON (default bench/results/loader-<device>[-quick]-<date>.json)")
    args = parser.parse_args(argv)

    if args.generate:
        generate_tree(args.generate, args.images or 3072, classes=args.classes, quick=args.quick)
        print(f"wrote {args.images or 3072} training JPEG files in {args.classes} classes under {args.generate}")
        return 0

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    cores = os.cpu_count() or 1
    workers = [int(w) for w in args.workers.split(",")] if args.workers else (
        [0, 2] if args.quick else sorted({4, 8, cores}))
    count = args.images or (48 if args.quick else 3072)
    batch = args.batch or (16 if args.quick else 256)
    image_size = 32 if args.quick else 224
    skip = 1 if args.quick else 2
    report = {"environment": {"device": device.type, "cores": cores, "torch": torch.__version__,
                              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                              "date": datetime.date.today().isoformat(), "quick": args.quick},
              "batch": batch, "image_size": image_size, "results": {}}
    tmp = None
    try:
        root = args.root
        if root is None:
            tmp = tempfile.TemporaryDirectory(prefix="bench-loader-")
            started = time.perf_counter()
            root = generate_tree(tmp.name, count, classes=args.classes, quick=args.quick)
            print(f"generated {count} JPEG files in {time.perf_counter() - started:.1f} s under {root}")
        report["root"] = args.root or "generated"
        report.update(measure_paths(root, device, workers=workers, batch=batch, image_size=image_size,
                                    passes=args.passes, skip=skip, device_decode=not args.no_device_decode,
                                    memory_count=min(count, 1024)))
    finally:
        if tmp is not None:
            tmp.cleanup()
    demand = step_demand(args.steps, device.type)
    report["step_demand"] = demand
    if demand:
        print(f"step demand (bench.steps, {demand['source']}): " +
              ", ".join(f"{k} {v:.0f} img/s" for k, v in demand.items() if k != "source"))
        compare_to_demand(report["results"], demand)
        for name, entry in report["results"].items():
            if "fraction_of_fastest_step" in entry:
                print(f"  {name:10s} feeds {entry['fraction_of_fastest_step']:6.1%} of the fastest step")
    write_report(report, "loader", device, quick=args.quick, out=args.out)
    return 0


def write_report(report: dict, prefix: str, device, *, quick: bool, out=None) -> str:
    """Write ``report`` to ``out``, by default ``bench/results/<prefix>-<device>[-quick]-<date>.json``."""
    name = f"{prefix}-{device.type}{'-quick' if quick else ''}-{report['environment']['date']}.json"
    out = out or os.path.join(HERE, "results", name)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    sys.exit(main())
