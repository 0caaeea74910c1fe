"""Kernel benchmarks: each cim_ext op against its eager reference, torch.compile of the reference and, where the
original implementation had one, its per-image / eager path. Run through ``python -m bench`` (see bench/__main__.py),
which turns the timings into ratios and bandwidth-roofline fractions.

Each timed call drops its output before the next call starts. Every case appends its record (``extra_info`` and
the median and fastest round) to the file ``CIM_BENCH_RECORDS`` names, if any, as soon as it finishes.
"""
import functools
import json
import os

import pytest
import torch
from PIL import Image

import cim_ext
from cim_ext import reference

from . import allocator, baselines, cases

DEVICE = cases.DEVICE
ROUNDS = 3 if cases.QUICK else 20


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=None)
def _l2_flush_buffer():
    """A buffer twice the GPU's L2 cache: writing it evicts every input a previous call left in L2."""
    return torch.empty(2 * torch.cuda.get_device_properties(DEVICE).L2_cache_size, dtype=torch.uint8, device=DEVICE)


def _event_times(fn, rounds):
    """Kernel time of each call, from CUDA events around it, with L2 flushed before (outside the timed window)."""
    times = []
    for _ in range(rounds):
        _l2_flush_buffer().zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def _record(benchmark):
    """Append the finished case's record to ``CIM_BENCH_RECORDS`` (one JSON line, flushed at once)."""
    path = os.environ.get("CIM_BENCH_RECORDS")
    if path:
        stats = benchmark.stats.stats
        record = {"extra_info": dict(benchmark.extra_info), "stats": {"median": stats.median, "min": stats.min}}
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def _measure(benchmark, fn, *, op, impl, bytes_moved, rounds=ROUNDS):
    """pytest-benchmark's wall time of a synchronised call; on CUDA also the events time with a cold L2
    (``extra_info["event_median_s"]``), which excludes the host's launch and synchronisation cost. The output is
    dropped inside the timed call (pytest-benchmark would keep it alive into the next one)."""
    def target():
        fn()
        _sync()

    benchmark.group = op
    benchmark.extra_info.update(op=op, impl=impl, device=DEVICE, bytes=int(bytes_moved), batch=cases.batch())
    benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=1)
    if DEVICE == "cuda":
        times = sorted(_event_times(fn, rounds))
        benchmark.extra_info["event_median_s"] = times[len(times) // 2]
    _record(benchmark)


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------------------------------- CAM and boxes
@pytest.mark.parametrize("impl", ["kernel", "reference", "compiled"])
def test_cam(benchmark, impl):
    fmaps, weight, labels = cases.cam_inputs()
    fn = {"kernel": cim_ext.cam, "reference": reference.cam, "compiled": _compiled(reference.cam)}[impl]
    moved = _nbytes(fmaps) + fmaps.shape[0] * fmaps.shape[1] * 4 + _nbytes(fmaps[:, 0])
    _measure(benchmark, lambda: fn(fmaps, weight, labels), op="cam", impl=impl, bytes_moved=moved)


@pytest.mark.parametrize("impl", ["kernel", "reference", "compiled"])
def test_cam_forward_backward(benchmark, impl):
    """Gradients for fmaps and weight (the CIM meta-step's path); the fmaps are read twice and their gradient
    written once."""
    fmaps, weight, labels = cases.cam_inputs()
    fmaps.requires_grad_(True)
    weight.requires_grad_(True)
    fn = {"kernel": cim_ext.cam, "reference": reference.cam, "compiled": _compiled(reference.cam)}[impl]
    grad = torch.ones(fmaps.shape[0], fmaps.shape[2], fmaps.shape[3], device=fmaps.device)
    run = lambda: torch.autograd.grad(fn(fmaps, weight, labels), (fmaps, weight), grad)  # noqa: E731
    _measure(benchmark, run, op="cam[forward_backward]", impl=impl, bytes_moved=3 * _nbytes(fmaps))


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_cam_boxes(benchmark, impl):
    cams = cases.normalized_cams()
    fn = {"kernel": cim_ext.cam_boxes, "reference": reference.cam_boxes}[impl]
    _measure(benchmark, lambda: fn(cams, (224, 224), 0.6), op="cam_boxes", impl=impl, bytes_moved=_nbytes(cams))


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_otsu_threshold(benchmark, impl):
    cams = cases.normalized_cams()
    fn = {"kernel": cim_ext.otsu_threshold, "reference": reference.otsu_threshold}[impl]
    _measure(benchmark, lambda: fn(cams, (224, 224)), op="otsu_threshold", impl=impl, bytes_moved=_nbytes(cams))


@pytest.mark.parametrize("threshold", [0.6, "otsu"])
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_cam_to_boxes(benchmark, impl, threshold):
    fmaps, weight, labels = cases.cam_inputs()
    fn = {"kernel": cim_ext.cam_to_boxes, "reference": reference.cam_to_boxes}[impl]
    _measure(
        benchmark,
        lambda: fn(fmaps, weight, labels, (224, 224), threshold),
        op=f"cam_to_boxes[{threshold}]",
        impl=impl,
        bytes_moved=_nbytes(fmaps),
    )


# ------------------------------------------------------------------------------------------------------ compression
def _pil_images(images):
    return [Image.fromarray(img.permute(1, 2, 0).cpu().numpy()) for img in images]


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
@pytest.mark.parametrize("impl", ["kernel", "reference", "original", "clone"])
def test_compress(benchmark, impl, dtype):
    """"clone" is the floor of any out-of-place op: the batch read once and written once into a new output (on CPU
    from resident memory, like every case here; ``test_fresh_output`` is what a fresh mapping adds)."""
    if impl == "original" and dtype != "uint8":
        pytest.skip("the original compresses PIL (uint8) images")
    images, boxes = cases.image_inputs(dtype=getattr(torch, dtype))
    if impl == "original":
        pil, box_list = _pil_images(images), boxes.tolist()
        fn = lambda: [baselines.compress_per_image(img, box, 4.0) for img, box in zip(pil, box_list)]  # noqa: E731
    elif impl == "clone":
        fn = images.clone
    else:
        op = {"kernel": cim_ext.compress, "reference": reference.compress}[impl]
        fn = lambda: op(images, boxes, 4.0)  # noqa: E731
    _measure(benchmark, fn, op=f"compress[{dtype}]", impl=impl, bytes_moved=2 * _nbytes(images))


@pytest.mark.parametrize("impl", ["resident", "fresh", "fresh_thp"])
def test_fresh_output(benchmark, impl):
    """CPU: one write of an output the size of the uint8 image batch, into memory the process holds ("resident"),
    and into a fresh mapping with 4 KiB pages ("fresh", what glibc gives any allocation above 32 MiB) or with huge
    pages ("fresh_thp", ``THP_MEM_ALLOC_ENABLE=1``): the page faults, zeroing and unmap of a fresh output, which an
    out-of-place op pays outside this benchmark, beside the write (see bench/allocator.py)."""
    if DEVICE != "cpu":
        pytest.skip("page faults of host memory: CPU only")
    images, _ = cases.image_inputs()
    nbytes = _nbytes(images)
    if impl == "resident":
        fn = torch.empty_like(images).fill_
        _measure(benchmark, lambda: fn(1), op="fresh_output[uint8]", impl=impl, bytes_moved=nbytes)
    else:
        huge = impl == "fresh_thp"
        _measure(benchmark, lambda: allocator.fresh_write(nbytes, huge_pages=huge), op="fresh_output[uint8]",
                 impl=impl, bytes_moved=nbytes)


@pytest.mark.parametrize("impl", ["kernel", "original"])
def test_cam_pipeline(benchmark, impl):
    """Inference-time exemplar compression: CAM -> box -> compressed image, for a batch of uint8 images."""
    fmaps, weight, labels = cases.cam_inputs()
    images, _ = cases.image_inputs()
    size = tuple(images.shape[-2:])
    if impl == "original":
        pil = _pil_images(images)
        fn = lambda: baselines.cam_pipeline_per_image(fmaps, weight, labels, pil, 0.6, 4.0)  # noqa: E731
    else:
        fn = lambda: cim_ext.compress(images, cim_ext.cam_to_boxes(fmaps, weight, labels, size, 0.6), 4.0)  # noqa: E731
    moved = _nbytes(fmaps) + 2 * _nbytes(images)
    _measure(benchmark, fn, op="cam_pipeline", impl=impl, bytes_moved=moved, rounds=3 if impl == "original" else ROUNDS)


@pytest.mark.parametrize("pass_", ["forward", "forward_backward"])
@pytest.mark.parametrize("impl", ["kernel", "reference", "compiled"])
def test_soft_compress(benchmark, impl, pass_):
    images, _ = cases.image_inputs(dtype=torch.float32)
    cams = cases.normalized_cams()
    fn = {"kernel": cim_ext.soft_compress, "reference": reference.soft_compress}.get(impl) or _compiled(
        reference.soft_compress
    )
    if pass_ == "forward":
        run = lambda: fn(images, cams, 4.0)  # noqa: E731
        moved = 2 * _nbytes(images)
    else:
        images.requires_grad_(True)
        cams.requires_grad_(True)
        grad = torch.ones_like(images)
        run = lambda: torch.autograd.grad(fn(images, cams, 4.0), (images, cams), grad)  # noqa: E731
        moved = 5 * _nbytes(images)
    _measure(benchmark, run, op=f"soft_compress[{pass_}]", impl=impl, bytes_moved=moved)


# ------------------------------------------------------------------------------------------------------- activation
def _relu(x, numerator, denominator):
    return torch.relu(x)


@pytest.mark.parametrize("pass_", ["forward", "forward_backward"])
@pytest.mark.parametrize("impl", ["kernel", "reference", "compiled", "original", "relu"])
def test_rational(benchmark, impl, pass_):
    x = cases.activation_input()
    rational = cim_ext.nn.Rational().to(DEVICE)
    numerator, denominator = rational.numerator, rational.denominator
    fn = {
        "kernel": cim_ext.rational,
        "reference": reference.rational,
        "compiled": _compiled(reference.rational),
        "original": baselines.rational_stacked_powers,
        "relu": _relu,
    }[impl]
    if pass_ == "forward":
        with torch.no_grad():
            run = lambda: fn(x, numerator, denominator)  # noqa: E731
            moved = 2 * _nbytes(x)
            _measure(benchmark, run, op=f"rational[{pass_}]", impl=impl, bytes_moved=moved)
        return
    x.requires_grad_(True)
    grad = torch.ones_like(x)
    inputs = (x,) if impl == "relu" else (x, numerator, denominator)
    run = lambda: torch.autograd.grad(fn(x, numerator, denominator), inputs, grad)  # noqa: E731
    _measure(benchmark, run, op=f"rational[{pass_}]", impl=impl, bytes_moved=5 * _nbytes(x))


# -------------------------------------------------------------------------------------------------- host overhead
def _host_cases():
    """Tiny inputs (one 3x32x32 image, 8x4x4 feature maps), so a call's time is its host cost: the public wrapper,
    the bare ``torch.ops`` call it makes, and ``torch.add`` as the cost of one eager op."""
    fmaps, weight, labels = cases.cam_inputs(channels=8, side=4, classes=10)
    fmaps, labels = fmaps[:1].contiguous(), labels[:1].contiguous()
    images, boxes = cases.image_inputs(side=32)
    images, boxes = images[:1].contiguous(), boxes[:1].contiguous()
    x = torch.randn(1, 4, 4, 4, device=DEVICE)
    rational = cim_ext.nn.Rational().to(DEVICE)
    numerator, denominator = rational.numerator.detach(), rational.denominator.detach()
    cams = cim_ext.cam(fmaps, weight, labels)
    pixels = images.float()
    ops = torch.ops.cim_ext
    return {
        "cam": (lambda: cim_ext.cam(fmaps, weight, labels), lambda: ops.cam(fmaps, weight, labels, True)),
        "cam_to_boxes": (lambda: cim_ext.cam_to_boxes(fmaps, weight, labels, (32, 32), 0.6),
                         lambda: ops.cam_to_boxes(fmaps, weight, labels, [32, 32], None, 0.6, None, 0)),
        "compress": (lambda: cim_ext.compress(images, boxes, 4.0), lambda: ops.compress(images, boxes, 4.0)),
        "soft_compress": (lambda: cim_ext.soft_compress(pixels, cams, 4.0),
                          lambda: ops.soft_compress(pixels, cams, 4.0)),
        "rational": (lambda: cim_ext.rational(x, numerator, denominator),
                     lambda: ops.rational(x, numerator, denominator)),
    }


@pytest.mark.parametrize("impl", ["kernel", "torch.ops", "torch.add"])
@pytest.mark.parametrize("op", ["cam", "cam_to_boxes", "compress", "soft_compress", "rational"])
def test_host_overhead(benchmark, op, impl):
    wrapper, bare = _host_cases()[op]
    a = torch.ones(4, device=DEVICE)
    fn = {"kernel": wrapper, "torch.ops": bare, "torch.add": lambda: torch.add(a, a)}[impl]
    benchmark.group = f"host[{op}]"
    benchmark.extra_info.update(op=f"host[{op}]", impl=impl, device=DEVICE, bytes=0, batch=1)
    with torch.no_grad():
        benchmark.pedantic(lambda: (fn(), _sync()), rounds=ROUNDS * 20, iterations=20, warmup_rounds=2)
    _record(benchmark)
