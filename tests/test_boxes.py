"""cam_boxes, otsu_threshold and cam_to_boxes: kernels equal to cim_ext.reference, registration, bad input.

Boxes and Otsu thresholds must match the reference exactly. A kernel and the reference may round an upsampled value
differently in the last bit, so random tests keep every upsampled value (computed in float64) clear of the threshold
and of histogram bin edges. The "dyadic" tests need no such care: maps of multiples of 2^-k upsampled by powers of
two are computed exactly in every dtype, so exact ties (value == threshold, value on a bin edge) are tested too.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cim_ext
from cim_ext import reference

from conftest import cpu_and_cuda

# How far (in map values) every upsampled value must stay from a threshold or bin edge for exact agreement.
MARGIN = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def size_list(sizes, batch):
    if isinstance(sizes, torch.Tensor):
        return [tuple(row) for row in sizes.tolist()]
    return [tuple(sizes)] * batch


def upsampled64(cams, sizes):
    """Per sample, the upsampled map in float64 (the exact values the kernels round)."""
    cams = cams.detach().double().cpu()
    return [reference.upsample(cams[b : b + 1], size)[0] for b, size in enumerate(size_list(sizes, cams.shape[0]))]


def safe_thresholds(cams, sizes, margin, seed=0, quantiles=(0.4, 0.98)):
    """Per-sample thresholds Tensor[B] (float64) at least `margin` from every upsampled value: the midpoint of a
    randomly chosen wide-enough gap between consecutive values within the given quantiles of the values (so
    masks are neither always empty nor always full), or above the maximum if there is none."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for up in upsampled64(cams, sizes):
        values = up.flatten().unique()
        mids = (values[1:] + values[:-1]) / 2
        low, high = up.flatten().quantile(torch.tensor(quantiles, dtype=torch.float64)).tolist()
        in_range = (mids >= low) & (mids <= high)
        wide = (((values[1:] - values[:-1]) / 2 > 2 * margin) & in_range).nonzero().flatten()
        if wide.numel():
            out.append(float(mids[wide[torch.randint(0, wide.numel(), (1,), generator=gen)]]))
        else:
            out.append(float(values[-1]) + 1.0)
    return torch.tensor(out, dtype=torch.float64)


def bin_safe(cams, sizes, bins, margin):
    """Whether no upsampled value lies within `margin` of a bin edge k / bins. Exact 0 and 1 (the minimum and
    maximum of a normalised map, reproduced exactly where the interpolation only sees them) are fine."""
    for up in upsampled64(cams, sizes):
        scaled = up * bins
        near = (scaled - scaled.round()).abs() < margin * bins
        if bool((near & (up != 0) & (up != 1)).any()):
            return False
    return True


def random_sizes(batch, gen, low=1, high=40):
    return torch.randint(low, high, (batch, 2), generator=gen)


def random_cams(shape, dtype, device, gen):
    return torch.rand(shape, generator=gen, dtype=torch.float64).to(device, dtype)


def blob_cams(shape, dtype, device, gen):
    """Maps in [0, 1] with one bump at a random place plus noise, so thresholded masks give boxes anywhere."""
    batch, height, width = shape
    ys = torch.arange(height, dtype=torch.float64)[:, None]
    xs = torch.arange(width, dtype=torch.float64)[None, :]
    centre = torch.rand(batch, 2, generator=gen, dtype=torch.float64) * torch.tensor([height, width]) - 0.5
    spread = 0.3 + torch.rand(batch, generator=gen, dtype=torch.float64) * max(height, width) / 3
    bump = torch.exp(-((ys - centre[:, 0, None, None]) ** 2 + (xs - centre[:, 1, None, None]) ** 2)
                     / (2 * spread[:, None, None] ** 2))
    maps = bump + 0.1 * torch.rand(shape, generator=gen, dtype=torch.float64)
    return (maps / maps.amax((1, 2), keepdim=True)).to(device, dtype)


def bin_safe_cams(shape, sizes, bins, dtype, device, seed, attempts=50):
    """Random cams whose upsampled values all stay clear of the bin edges (resampled until they do)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(attempts):
        cams = random_cams(shape, dtype, device, gen)
        if bin_safe(cams, sizes, bins, MARGIN[dtype]):
            return cams
    pytest.fail("could not draw bin-safe cams; use smaller sizes")


def dyadic_cams(shape, step, dtype, device, seed=0):
    """Maps of multiples of `step` in [0, 1] (upsampled by powers of two, they interpolate exactly)."""
    gen = torch.Generator().manual_seed(seed)
    levels = round(1 / step)
    return (torch.randint(0, levels + 1, shape, generator=gen).double() * step).to(device, dtype)


# Map shapes (B, h, w): 1-pixel, single row/column, non-square, odd, B=1.
MAP_SHAPES = [(1, 1, 1), (3, 7, 7), (2, 1, 9), (4, 5, 3), (1, 6, 2), (3, 14, 10)]


# ---------------------------------------------------------------------------------------------------- cam_boxes
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", MAP_SHAPES)
@pytest.mark.parametrize("shared_size", [False, True])
def test_cam_boxes_matches_reference(device, dtype, shape, shared_size):
    gen = torch.Generator().manual_seed(shape[0] * 100 + shape[1] * 10 + shape[2])
    cams = blob_cams(shape, dtype, device, gen)
    sizes = (23, 37) if shared_size else random_sizes(shape[0], gen)
    thresholds = safe_thresholds(cams, sizes, MARGIN[dtype]).to(device)
    sizes_arg = sizes if shared_size else sizes.to(device)
    expected = reference.cam_boxes(cams, sizes, thresholds)
    out = cim_ext.cam_boxes(cams, sizes_arg, thresholds)
    assert out.dtype == torch.int64 and out.shape == (shape[0], 4) and out.device == cams.device
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cam_boxes_downsampling_and_same_size(device, dtype):
    gen = torch.Generator().manual_seed(7)
    cams = blob_cams((4, 9, 11), dtype, device, gen)
    sizes = torch.tensor([[9, 11], [3, 2], [9, 4], [1, 1]])
    thresholds = safe_thresholds(cams, sizes, MARGIN[dtype]).to(device)
    torch.testing.assert_close(cim_ext.cam_boxes(cams, sizes.to(device), thresholds),
                               reference.cam_boxes(cams, sizes, thresholds), rtol=0, atol=0)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threshold", [0.0, 0.25, 0.5, 0.6, 0.99, 1.0])
def test_cam_boxes_dyadic_exact_at_bench_size(device, dtype, threshold):
    # 7x7 -> 224x224 is a 32x upsampling; values on the threshold exactly must be left out of the mask.
    cams = dyadic_cams((5, 7, 7), 1 / 256, dtype, device)
    cams[0] = 0.5
    cams[1, 3, 3] = 1.0
    expected = reference.cam_boxes(cams, (224, 224), threshold)
    torch.testing.assert_close(cim_ext.cam_boxes(cams, (224, 224), threshold), expected, rtol=0, atol=0)
    per_sample = torch.full((5,), threshold, dtype=dtype, device=device)
    torch.testing.assert_close(cim_ext.cam_boxes(cams, (224, 224), per_sample), expected, rtol=0, atol=0)
    scalar_tensor = torch.tensor(threshold, dtype=torch.float64)
    torch.testing.assert_close(cim_ext.cam_boxes(cams, (224, 224), scalar_tensor), expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_cam_boxes_empty_full_and_edges(device):
    cams = torch.zeros(5, 4, 6, dtype=torch.float64, device=device)
    cams[1] = 1.0  # full mask
    cams[2, 0, 0] = 1.0  # top-left corner
    cams[3, -1, -1] = 1.0  # bottom-right corner
    cams[4, :, 2] = 1.0  # a full-height stripe
    sizes = torch.tensor([[8, 12], [8, 12], [8, 12], [8, 12], [1, 1]], device=device)
    out = cim_ext.cam_boxes(cams, sizes, 0.5)
    assert out[0].tolist() == [0, 0, 0, 0]
    assert out[1].tolist() == [0, 8, 0, 12]
    assert out[2].tolist()[0] == 0 and out[2].tolist()[2] == 0
    assert out[3].tolist()[1] == 8 and out[3].tolist()[3] == 12
    assert out[4].tolist() in ([0, 0, 0, 0], [0, 1, 0, 1])
    torch.testing.assert_close(out, reference.cam_boxes(cams, sizes.cpu(), 0.5), rtol=0, atol=0)
    # Thresholds above the maximum / below the minimum of every map.
    assert (cim_ext.cam_boxes(cams, sizes, 1.0) == 0).all()
    full = cim_ext.cam_boxes(cams, sizes, -1.0)
    assert torch.equal(full, torch.stack([torch.zeros_like(sizes[:, 0]), sizes[:, 0], torch.zeros_like(sizes[:, 1]), sizes[:, 1]], 1))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_cam_boxes_non_contiguous_and_empty_batch(device):
    gen = torch.Generator().manual_seed(3)
    cams = blob_cams((3, 8, 6), torch.float64, device, gen).transpose(1, 2)
    sizes = random_sizes(3, gen)
    thresholds = safe_thresholds(cams, sizes, MARGIN[torch.float64]).to(device)
    torch.testing.assert_close(cim_ext.cam_boxes(cams, sizes.to(device), thresholds),
                               reference.cam_boxes(cams, sizes, thresholds), rtol=0, atol=0)
    empty = cim_ext.cam_boxes(cams[:0], (5, 5), 0.5)
    assert empty.shape == (0, 4) and empty.dtype == torch.int64


# ---------------------------------------------------------------------------------------------- otsu_threshold
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("bins", [2, 3, 16, 256, 1000])
@pytest.mark.parametrize("shape", MAP_SHAPES)
def test_otsu_matches_reference_float64(device, bins, shape):
    gen = torch.Generator().manual_seed(bins + shape[1])
    sizes = random_sizes(shape[0], gen)
    cams = bin_safe_cams(shape, sizes, bins, torch.float64, device, seed=bins)
    out = cim_ext.otsu_threshold(cams, sizes.to(device), bins)
    assert out.dtype == torch.float64 and out.shape == (shape[0],) and out.device == cams.device
    torch.testing.assert_close(out, reference.otsu_threshold(cams, sizes, bins), rtol=0, atol=0)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("bins", [4, 16, 64])
def test_otsu_matches_reference_float32(device, bins):
    gen = torch.Generator().manual_seed(bins)
    sizes = random_sizes(4, gen, 1, 12)
    cams = bin_safe_cams((4, 5, 4), sizes, bins, torch.float32, device, seed=bins)
    out = cim_ext.otsu_threshold(cams, sizes.to(device), bins)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference.otsu_threshold(cams, sizes, bins), rtol=0, atol=0)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bins", [7, 16, 256])
def test_otsu_dyadic_exact_at_bench_size(device, dtype, bins):
    cams = dyadic_cams((4, 7, 7), 1 / 256, dtype, device, seed=bins)
    torch.testing.assert_close(cim_ext.otsu_threshold(cams, (224, 224), bins),
                               reference.otsu_threshold(cams, (224, 224), bins), rtol=0, atol=0)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_otsu_ties_pick_smallest_split(device):
    # Constant maps: every split has zero variance -> k = 0. Two values, half each (no interpolation at the same
    # size): every split between them has the same variance -> the smallest.
    cams = torch.zeros(3, 4, 4, dtype=torch.float64, device=device)
    cams[1] = 0.7
    cams[2, :2] = 1.0
    out = cim_ext.otsu_threshold(cams, (4, 4), 16)
    assert out.tolist() == [1 / 16, 1 / 16, 1 / 16]
    torch.testing.assert_close(out, reference.otsu_threshold(cams, (4, 4), 16), rtol=0, atol=0)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_otsu_out_of_range_values_are_clamped(device):
    gen = torch.Generator().manual_seed(11)
    sizes = random_sizes(3, gen, 1, 10)
    for _ in range(50):
        cams = (random_cams((3, 4, 5), torch.float64, device, gen) * 3 - 1)
        if bin_safe(cams, sizes, 10, 1e-9):
            break
    torch.testing.assert_close(cim_ext.otsu_threshold(cams, sizes.to(device), 10),
                               reference.otsu_threshold(cams, sizes, 10), rtol=0, atol=0)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_otsu_many_bins(device):
    # More bins than the CUDA kernels keep in shared memory.
    cams = dyadic_cams((2, 5, 6), 1 / 256, torch.float64, device)
    torch.testing.assert_close(cim_ext.otsu_threshold(cams, (40, 48), 8192),
                               reference.otsu_threshold(cams, (40, 48), 8192), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- cam_to_boxes
def make_cam_inputs(batch, channels, height, width, classes, dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    fmaps = torch.randn(batch, channels, height, width, generator=gen, dtype=torch.float64).relu()
    weight = torch.randn(classes, channels, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    return fmaps.to(device, dtype), weight.to(device, dtype), labels.to(device)


CAM_SHAPES = [(1, 1, 1, 1, 1), (3, 8, 7, 7, 4), (2, 5, 1, 6, 3), (4, 16, 5, 3, 2), (2, 3, 17, 16, 2)]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", CAM_SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cam_to_boxes_equals_cam_then_boxes(device, dtype, shape, layout):
    # The fused kernel computes the same normalised maps as cam, so this holds bit for bit, ties included.
    fmaps, weight, labels = make_cam_inputs(*shape, dtype=dtype, device=device)
    if layout == "channels_last":
        fmaps = fmaps.contiguous(memory_format=torch.channels_last)
    sizes = random_sizes(shape[0], torch.Generator().manual_seed(1)).to(device)
    cams = cim_ext.cam(fmaps, weight, labels)
    for threshold in [0.5, torch.linspace(0.2, 0.8, shape[0], dtype=dtype, device=device)]:
        torch.testing.assert_close(cim_ext.cam_to_boxes(fmaps, weight, labels, sizes, threshold),
                                   cim_ext.cam_boxes(cams, sizes, threshold), rtol=0, atol=0)
    for bins in [2, 16, 256]:
        otsu = cim_ext.otsu_threshold(cams, sizes, bins)
        torch.testing.assert_close(cim_ext.cam_to_boxes(fmaps, weight, labels, sizes, "otsu", bins),
                                   cim_ext.cam_boxes(cams, sizes, otsu), rtol=0, atol=0)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("shape", CAM_SHAPES)
def test_cam_to_boxes_matches_reference(device, shape):
    for seed in range(50):
        fmaps, weight, labels = make_cam_inputs(*shape, device=device, seed=seed)
        sizes = random_sizes(shape[0], torch.Generator().manual_seed(seed))
        ref_cams = reference.cam(fmaps, weight, labels)
        if bin_safe(ref_cams, sizes, 32, MARGIN[torch.float64]):
            break
    thresholds = safe_thresholds(ref_cams, sizes, MARGIN[torch.float64]).to(device)
    torch.testing.assert_close(cim_ext.cam_to_boxes(fmaps, weight, labels, sizes.to(device), thresholds),
                               reference.cam_to_boxes(fmaps, weight, labels, sizes, thresholds), rtol=0, atol=0)
    torch.testing.assert_close(cim_ext.cam_to_boxes(fmaps, weight, labels, sizes.to(device), "otsu", 32),
                               reference.cam_to_boxes(fmaps, weight, labels, sizes, "otsu", 32), rtol=0, atol=0)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("threshold", [0.6, "otsu"])
def test_cam_to_boxes_bench_shape(device, threshold):
    # 512x7x7 feature maps, 224x224 images (float64, so the reference's own rounding stays far from the threshold).
    for seed in range(20):
        fmaps, weight, labels = make_cam_inputs(3, 512, 7, 7, 10, device=device, seed=seed)
        ref_cams = reference.cam(fmaps, weight, labels)
        if threshold == "otsu" and bin_safe(ref_cams, (224, 224), 256, MARGIN[torch.float64]):
            break
        if threshold != "otsu" and all((up - threshold).abs().min() > 1e-9 for up in upsampled64(ref_cams, (224, 224))):
            break
    out = cim_ext.cam_to_boxes(fmaps, weight, labels, (224, 224), threshold)
    torch.testing.assert_close(out, reference.cam_to_boxes(fmaps, weight, labels, (224, 224), threshold), rtol=0, atol=0)
    cl = cim_ext.cam_to_boxes(fmaps.contiguous(memory_format=torch.channels_last), weight, labels, (224, 224), threshold)
    torch.testing.assert_close(cl, out, rtol=0, atol=0)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_cam_to_boxes_constant_map_and_empty_batch(device):
    fmaps, weight, labels = make_cam_inputs(2, 3, 4, 4, 2, device=device)
    fmaps[0] = 0.0  # constant map -> all zeros -> empty box for any threshold >= 0
    out = cim_ext.cam_to_boxes(fmaps, weight, labels, (10, 10), 0.0)
    assert out[0].tolist() == [0, 0, 0, 0]
    torch.testing.assert_close(out, reference.cam_to_boxes(fmaps, weight, labels, (10, 10), 0.0), rtol=0, atol=0)
    otsu = cim_ext.cam_to_boxes(fmaps, weight, labels, (10, 10), "otsu")
    assert otsu[0].tolist() == [0, 0, 0, 0]
    assert cim_ext.cam_to_boxes(fmaps[:0], weight, labels[:0], (10, 10), "otsu").shape == (0, 4)


# --------------------------------------------------------------------------------------------- CUDA against CPU
CUDA = cpu_and_cuda()[1:]


@pytest.mark.cuda
@pytest.mark.parametrize("device", CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_boxes_cuda_matches_cpu_kernel(device, dtype):
    gen = torch.Generator().manual_seed(5)
    cams = blob_cams((16, 7, 9), dtype, "cpu", gen)
    sizes = random_sizes(16, gen, 1, 300)
    thresholds = safe_thresholds(cams, sizes, MARGIN[dtype]).to(dtype)
    cpu = cim_ext.cam_boxes(cams, sizes, thresholds)
    cuda = cim_ext.cam_boxes(cams.to(device), sizes.to(device), thresholds.to(device))
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=0, atol=0)
    small = random_sizes(16, gen, 1, 8)
    cams = bin_safe_cams((16, 5, 4), small, 32, dtype, "cpu", seed=6)
    torch.testing.assert_close(cim_ext.otsu_threshold(cams.to(device), small.to(device), 32).cpu(),
                               cim_ext.otsu_threshold(cams, small, 32), rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("device", CUDA)
@pytest.mark.parametrize("threshold", [0.6, "otsu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cam_to_boxes_cuda_matches_cpu_kernel(device, threshold, layout):
    fmaps, weight, labels = make_cam_inputs(64, 512, 7, 7, 100, device="cpu", seed=8)
    if layout == "channels_last":
        fmaps = fmaps.contiguous(memory_format=torch.channels_last)
    ref_cams = reference.cam(fmaps, weight, labels)
    keep = torch.tensor([
        bool((up - 0.6).abs().min() > 1e-9) and bin_safe(ref_cams[b : b + 1], (224, 224), 256, 1e-9)
        for b, up in enumerate(upsampled64(ref_cams, (224, 224)))
    ])
    fmaps, labels = fmaps[keep], labels[keep]
    cpu = cim_ext.cam_to_boxes(fmaps, weight, labels, (224, 224), threshold)
    cuda = cim_ext.cam_to_boxes(fmaps.to(device), weight.to(device), labels.to(device), (224, 224), threshold)
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("device", CUDA)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_boxes_cuda_low_precision_dyadic_exact(device, dtype):
    # half: multiples of 1/16 upsampled 4x (and 2x) interpolate to multiples of 1/1024, exact in float16; bfloat16:
    # multiples of 1/4 upsampled 2x give multiples of 1/64, exact in bfloat16.
    step, factor, bins = (1 / 4, 2, 8) if dtype == torch.bfloat16 else (1 / 16, 4, 16)
    cams = dyadic_cams((6, 5, 7), step, dtype, device, seed=9)
    size = (5 * factor, 7 * factor)
    for threshold in [0.0, 0.25, 0.5, 0.75]:
        torch.testing.assert_close(cim_ext.cam_boxes(cams, size, threshold), reference.cam_boxes(cams, size, threshold),
                                   rtol=0, atol=0)
    out = cim_ext.otsu_threshold(cams, size, bins)
    assert out.dtype == dtype
    torch.testing.assert_close(out, reference.otsu_threshold(cams, size, bins), rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("device", CUDA)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_boxes_cuda_low_precision_random(device, dtype):
    gen = torch.Generator().manual_seed(10)
    cams = blob_cams((8, 3, 4), dtype, device, gen)
    sizes = random_sizes(8, gen, 1, 8)
    thresholds = safe_thresholds(cams, sizes, MARGIN[dtype]).to(device)
    torch.testing.assert_close(cim_ext.cam_boxes(cams, sizes.to(device), thresholds),
                               reference.cam_boxes(cams, sizes, thresholds), rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("device", CUDA)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cam_to_boxes_cuda_low_precision(device, dtype, layout):
    fmaps, weight, labels = make_cam_inputs(32, 512, 7, 7, 50, dtype=dtype, device=device, seed=11)
    if layout == "channels_last":
        fmaps = fmaps.contiguous(memory_format=torch.channels_last)
    cams = cim_ext.cam(fmaps, weight, labels)
    torch.testing.assert_close(cim_ext.cam_to_boxes(fmaps, weight, labels, (224, 224), 0.6),
                               cim_ext.cam_boxes(cams, (224, 224), 0.6), rtol=0, atol=0)
    otsu = cim_ext.otsu_threshold(cams, (224, 224), 256)
    torch.testing.assert_close(cim_ext.cam_to_boxes(fmaps, weight, labels, (224, 224), "otsu"),
                               cim_ext.cam_boxes(cams, (224, 224), otsu), rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("device", CUDA)
def test_cam_to_boxes_cuda_large_maps_and_bins(device):
    # A map too large for shared memory (global scratch) and more bins than the shared histogram holds.
    fmaps, weight, labels = make_cam_inputs(3, 4, 50, 60, 2, seed=12)
    sizes = torch.tensor([[100, 120], [50, 60], [7, 300]])
    for threshold, bins in [(0.5, 256), ("otsu", 256), ("otsu", 8192)]:
        cpu = cim_ext.cam_to_boxes(fmaps, weight, labels, sizes, threshold, bins)
        cuda = cim_ext.cam_to_boxes(fmaps.to(device), weight.to(device), labels.to(device), sizes.to(device), threshold, bins)
        torch.testing.assert_close(cuda.cpu(), cpu, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("device", CUDA)
def test_boxes_mixed_devices(device):
    cams = torch.rand(2, 3, 3, device=device)
    # No host-to-device copy in the call path: per-sample sizes and thresholds must be on the maps' device.
    sizes = torch.tensor([[4, 4], [5, 5]], device=device)
    on_device = cim_ext.cam_boxes(cams, sizes, torch.tensor([0.5, 0.5], device=device))
    assert on_device[0].tolist() == cim_ext.cam_boxes(cams[:1], (4, 4), 0.5)[0].tolist()
    assert on_device[1].tolist() == cim_ext.cam_boxes(cams[1:], (5, 5), 0.5)[0].tolist()
    with pytest.raises(ValueError, match="sizes"):
        cim_ext.cam_boxes(cams, sizes.cpu(), 0.5)
    with pytest.raises(ValueError, match="threshold"):
        cim_ext.cam_boxes(cams, sizes, torch.full((2,), 0.5))
    fmaps, weight, labels = make_cam_inputs(2, 3, 4, 4, 2)
    with pytest.raises(ValueError, match="weight"):
        cim_ext.cam_to_boxes(fmaps.to(device), weight, labels.to(device), (8, 8), 0.5)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_boxes_every_kernel_path(device, dtype):
    """The CUDA box scan splits each sample over several blocks, with the column taps in shared memory when they fit
    and the CAM in shared memory when it fits: images shorter than the number of slices, wider than the tap table,
    per-sample sizes and large feature maps all match the reference exactly."""
    cases = [((3, 8, 7, 7), [(2, 3000), (1, 1), (3, 2)]), ((2, 4, 60, 50), [(224, 224), (5, 400)])]
    for shape, sizes in cases:
        fmaps, weight, labels = make_cam_inputs(*shape, 5, dtype=dtype, device=device, seed=shape[2])
        per_sample = torch.tensor(sizes, device=device)
        for threshold in (0.6, "otsu"):
            expected = reference.cam_to_boxes(fmaps, weight, labels, per_sample, threshold)
            got = cim_ext.cam_to_boxes(fmaps, weight, labels, per_sample, threshold)
            assert torch.equal(got, expected), (shape, threshold)
            for b, size in enumerate(sizes):
                one = cim_ext.cam_to_boxes(fmaps[b:b + 1], weight, labels[b:b + 1], size, threshold)
                assert torch.equal(one[0], expected[b]), (shape, size, threshold)
        cams = cim_ext.cam(fmaps, weight, labels)
        assert torch.equal(cim_ext.cam_boxes(cams, per_sample, 0.6), reference.cam_boxes(cams, per_sample, 0.6))


# -------------------------------------------------------------------------------------- registration and compile
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_boxes_opcheck(device):
    gen = torch.Generator().manual_seed(13)
    cams = random_cams((3, 5, 4), torch.float32, device, gen)
    sizes = random_sizes(3, gen).to(device)
    thresholds = torch.tensor([0.3, 0.5, 0.7], device=device)
    ops = torch.ops.cim_ext
    fmaps, weight, labels = make_cam_inputs(3, 4, 5, 4, 3, dtype=torch.float32, device=device)
    for requires_grad in [False, True]:
        fmaps.requires_grad_(requires_grad)
        cams.requires_grad_(requires_grad)
        for size, per_sample in [(None, sizes), ([37, 23], None)]:
            torch.library.opcheck(ops.cam_boxes.default, (cams, size, per_sample, 0.0, thresholds))
            torch.library.opcheck(ops.cam_boxes.default, (cams, size, per_sample, 0.6, None))
            torch.library.opcheck(ops.otsu_threshold.default, (cams, size, per_sample, 16))
            for threshold, per_sample_thresholds, bins in [(0.0, thresholds, 0), (0.6, None, 0), (0.0, None, 64)]:
                torch.library.opcheck(ops.cam_to_boxes.default, (fmaps, weight, labels, size, per_sample, threshold,
                                                                 per_sample_thresholds, bins))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_boxes_torch_compile(device, backend):
    fmaps, weight, labels = make_cam_inputs(4, 8, 7, 7, 3, dtype=torch.float32, device=device)
    sizes = torch.tensor([[224, 224], [100, 50], [7, 7], [1, 30]], device=device)
    thresholds = torch.full((4,), 0.5, device=device)

    def boxes(f, w):
        cams = cim_ext.cam(f, w, labels)
        otsu = cim_ext.otsu_threshold(cams, sizes, 64)
        return (
            cim_ext.cam_boxes(cams, sizes, otsu),
            cim_ext.cam_boxes(cams, (31, 17), 0.6),
            cim_ext.cam_to_boxes(f, w, labels, sizes, thresholds),
            cim_ext.cam_to_boxes(f, w, labels, (31, 17), 0.6),
            cim_ext.cam_to_boxes(f, w, labels, sizes, "otsu", 64),
        )

    compiled = torch.compile(boxes, backend=backend, fullgraph=True)
    for got, expected in zip(compiled(fmaps, weight), boxes(fmaps, weight)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    public = torch.compile(lambda f, w: cim_ext.cam_to_boxes(f, w, labels, sizes, "otsu"), backend=backend)
    torch.testing.assert_close(public(fmaps, weight), cim_ext.cam_to_boxes(fmaps, weight, labels, sizes, "otsu"),
                               rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- bad input
def test_boxes_bad_input():
    cams = torch.rand(2, 3, 4)
    nan = cams.clone()
    nan[1, 2, 3] = float("nan")
    cases = [
        (cim_ext.cam_boxes, (cams[0], (4, 4), 0.5), "cams"),
        (cim_ext.cam_boxes, (cams.int(), (4, 4), 0.5), "cams"),
        (cim_ext.cam_boxes, (nan, (4, 4), 0.5), "cams"),
        (cim_ext.cam_boxes, (cams[:, :0], (4, 4), 0.5), "cams"),
        (cim_ext.cam_boxes, (cams, (4,), 0.5), "sizes"),
        (cim_ext.cam_boxes, (cams, (4, 0), 0.5), "sizes"),
        (cim_ext.cam_boxes, (cams, (4.5, 4), 0.5), "sizes"),
        (cim_ext.cam_boxes, (cams, torch.ones(3, 2, dtype=torch.int64), 0.5), "sizes"),
        (cim_ext.cam_boxes, (cams, torch.ones(2, 2), 0.5), "sizes"),
        (cim_ext.cam_boxes, (cams, (4, 4), float("nan")), "threshold"),
        (cim_ext.cam_boxes, (cams, (4, 4), "otsu"), "threshold"),
        (cim_ext.cam_boxes, (cams, (4, 4), torch.ones(3)), "threshold"),
        (cim_ext.cam_boxes, (cams, (4, 4), torch.ones(2, dtype=torch.int64)), "threshold"),
        (cim_ext.otsu_threshold, (cams, (4, 4), 1), "bins"),
        (cim_ext.otsu_threshold, (cams, (4, 4), 2.5), "bins"),
        (cim_ext.otsu_threshold, (cams, (4, 4), True), "bins"),
        (cim_ext.otsu_threshold, (cams, (4, 4), 1 << 30), "bins"),
        (cim_ext.otsu_threshold, (nan, (4, 4)), "cams"),
    ]
    fmaps, weight, labels = make_cam_inputs(2, 3, 4, 4, 2)
    cases += [
        (cim_ext.cam_to_boxes, (fmaps[0], weight, labels, (8, 8), 0.5), "fmaps"),
        (cim_ext.cam_to_boxes, (fmaps[:, :, :0], weight, labels, (8, 8), 0.5), "fmaps"),
        (cim_ext.cam_to_boxes, (fmaps, weight[:, :2], labels, (8, 8), 0.5), "weight"),
        (cim_ext.cam_to_boxes, (fmaps, weight, labels[:1], (8, 8), 0.5), "labels"),
        (cim_ext.cam_to_boxes, (fmaps, weight, labels + 5, (8, 8), 0.5), "labels"),
        (cim_ext.cam_to_boxes, (fmaps, weight, labels.float(), (8, 8), 0.5), "labels"),
        (cim_ext.cam_to_boxes, (fmaps, weight, labels, (8, -8), 0.5), "sizes"),
        (cim_ext.cam_to_boxes, (fmaps, weight, labels, (8, 8), "mean"), "threshold"),
        (cim_ext.cam_to_boxes, (fmaps, weight, labels, (8, 8), "otsu", 0), "bins"),
    ]
    for fn, args, name in cases:
        with pytest.raises(ValueError, match=name):
            fn(*args)


def test_boxes_take_any_integer_sizes():
    cams = torch.rand(2, 3, 4)
    sizes = torch.tensor([[9, 7], [5, 11]])
    expected = cim_ext.cam_boxes(cams, sizes, 0.5)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        assert torch.equal(cim_ext.cam_boxes(cams, sizes.to(dtype), 0.5), expected)


def test_boxes_op_bad_input_names_argument():
    cams = torch.rand(2, 3, 4)
    sizes = torch.tensor([[4, 4], [5, 5]])
    thresholds = torch.full((2,), 0.5)
    fmaps, weight, labels = make_cam_inputs(2, 3, 4, 4, 2, dtype=torch.float32)
    ops = torch.ops.cim_ext
    cases = [
        (ops.cam_boxes, (cams[0], None, sizes, 0.0, thresholds), "cams"),
        (ops.cam_boxes, (cams.int(), None, sizes, 0.0, thresholds), "cams"),
        (ops.cam_boxes, (cams, None, sizes[:1], 0.0, thresholds), "sizes"),
        (ops.cam_boxes, (cams, None, sizes.float(), 0.0, thresholds), "sizes"),
        (ops.cam_boxes, (cams, None, -sizes, 0.0, thresholds), "sizes"),
        (ops.cam_boxes, (cams, None, None, 0.5, None), "sizes"),
        (ops.cam_boxes, (cams, [4, 4], sizes, 0.5, None), "sizes"),
        (ops.cam_boxes, (cams, [4, 4, 4], None, 0.5, None), "sizes"),
        (ops.cam_boxes, (cams, [4, 0], None, 0.5, None), "sizes"),
        (ops.cam_boxes, (cams, [4, 4], None, float("nan"), None), "threshold"),
        (ops.cam_boxes, (cams, None, sizes, 0.0, thresholds[:1]), "threshold"),
        (ops.cam_boxes, (cams, None, sizes, 0.0, sizes[0]), "threshold"),
        (ops.otsu_threshold, (cams, None, sizes, 0), "bins"),
        (ops.otsu_threshold, (cams, None, sizes, 1 << 30), "bins"),
        (ops.otsu_threshold, (cams, None, sizes.float(), 8), "sizes"),
        (ops.cam_to_boxes, (fmaps, weight, labels + 2, None, sizes, 0.0, thresholds, 0), "labels"),
        (ops.cam_to_boxes, (fmaps, weight.double(), labels, None, sizes, 0.0, thresholds, 0), "weight"),
        (ops.cam_to_boxes, (fmaps, weight, labels, None, sizes[:1], 0.0, thresholds, 0), "sizes"),
        (ops.cam_to_boxes, (fmaps, weight, labels, None, sizes, 0.0, thresholds[:1], 0), "threshold"),
        (ops.cam_to_boxes, (fmaps, weight, labels, [8, 8], None, 0.5, None, 1), "bins"),
        (ops.cam_to_boxes, (fmaps[:, :, :0], weight, labels, None, sizes, 0.0, thresholds, 0), "fmaps"),
    ]
    for op, args, name in cases:
        with pytest.raises(ValueError, match=name):
            op(*args)



def _check_boxes(boxes, batch, sizes):
    assert boxes.shape == (batch, 4) and boxes.dtype == torch.int64
    for (y0, y1, x0, x1), (height, width) in zip(boxes.tolist(), size_list(sizes, batch)):
        assert (y0, y1, x0, x1) == (0, 0, 0, 0) or (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(0, 3),
    height=st.integers(0, 5),
    width=st.integers(0, 5),
    size=st.tuples(st.integers(-1, 40), st.integers(-1, 40)),
    per_sample=st.booleans(),
    threshold=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just("otsu"), st.none()),
    bins=st.one_of(st.integers(-1, 300), st.just(1 << 21)),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64]),
    special=st.sampled_from([None, float("nan"), float("inf"), -float("inf"), -5.0, 5.0]),
)
def test_boxes_fuzz(batch, height, width, size, per_sample, threshold, bins, dtype, special):
    cams = torch.rand(batch, height, width).to(dtype)
    if special is not None and cams.numel() and dtype.is_floating_point:
        cams.view(-1)[-1] = special
    sizes = torch.tensor([size] * batch, dtype=torch.int64) if per_sample else size
    if threshold is None:
        threshold = torch.rand(batch)
    allowed = (ValueError, RuntimeError)
    try:
        if isinstance(threshold, str):
            out = cim_ext.otsu_threshold(cams, sizes, bins)
            assert out.shape == (batch,) and out.dtype == cams.dtype
        else:
            _check_boxes(cim_ext.cam_boxes(cams, sizes, threshold), batch, sizes)
    except allowed:
        pass
    fmaps = torch.rand(batch, 3, height, width).to(dtype)
    try:
        _check_boxes(cim_ext.cam_to_boxes(fmaps, torch.randn(2, 3).to(dtype), torch.zeros(batch, dtype=torch.int64),
                                          sizes, threshold, bins), batch, sizes)
    except allowed:
        pass


@pytest.mark.slow
def test_cam_pipeline_inductor():
    fmaps, weight, labels = make_cam_inputs(4, 16, 7, 7, 3, dtype=torch.float32)
    sizes = torch.tensor([[224, 224], [100, 50], [7, 7], [1, 30]])

    def pipeline(f, w):
        cams = torch.ops.cim_ext.cam(f, w, labels, True)
        otsu = cim_ext.otsu_threshold(cams * 0.5 + 0.25, sizes, 64)
        return cams.square().sum(), cim_ext.cam_to_boxes(f, w, labels, sizes, otsu)

    compiled = torch.compile(pipeline, backend="inductor", fullgraph=True)
    f1, w1 = fmaps.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    f2, w2 = fmaps.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    (loss1, boxes1), (loss2, boxes2) = compiled(f1, w1), pipeline(f2, w2)
    torch.testing.assert_close(boxes1, boxes2, rtol=0, atol=0)
    torch.testing.assert_close(loss1, loss2)
    loss1.backward()
    loss2.backward()
    torch.testing.assert_close(f1.grad, f2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)
