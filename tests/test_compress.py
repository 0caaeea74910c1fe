"""cim_ext.compress / uncompress / compress_parts / compress_cost: bit-exact against cim_ext.reference (itself two
F.interpolate(mode="nearest-exact") calls), layouts, edge boxes, opcheck, torch.compile, bad input, fuzz."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cim_ext
from cim_ext import reference

from conftest import cpu_and_cuda, needs_cuda


RATIOS = [1.0, 2.0, 3.7, 4.0, 9.0, 16.0, 100.0]
# Larger sides take ATen's generic CPU kernel (out_h + out_w > 128), which rounds ties differently from the small-
# output kernel; 2 -> 141, 224 -> 74 (ratio 9) and friends hit such ties.
LARGE_SIDES = [100, 129, 141, 150, 200, 224, 255, 300]


def image_dtypes(device):
    return [torch.uint8, torch.float32, torch.float64] + ([torch.float16, torch.bfloat16] if device == "cuda" else [])


def position_probe(height, width, dtype, device, channels=2, batch=1):
    """Images whose pixels spell their own (row, column), so any wrong source index shows.

    Channel 0 holds the row, channel 1 the column (mod 256 for uint8; exact up to 256 in half types), further
    channels a mix of both.
    """
    rows = torch.arange(height, dtype=torch.float64)[:, None].expand(height, width)
    cols = torch.arange(width, dtype=torch.float64)[None, :].expand(height, width)
    planes = [rows, cols] + [(rows * 7 + cols * 3 + c) for c in range(channels - 2)]
    x = torch.stack(planes[:channels])[None].expand(batch, channels, height, width).contiguous()
    if dtype == torch.uint8:
        x = x % 256
    return x.to(device=device, dtype=dtype)


def random_images(shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, shape, generator=gen, dtype=torch.int64)
    x = x.to(torch.uint8) if dtype == torch.uint8 else (x.double() / 255 + torch.rand(shape, generator=gen, dtype=torch.float64))
    return x.to(device=device, dtype=dtype)


def random_boxes(batch, height, width, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    ys = torch.randint(0, height + 1, (batch, 2), generator=gen).sort(1).values
    xs = torch.randint(0, width + 1, (batch, 2), generator=gen).sort(1).values
    return torch.cat([ys, xs], 1).to(device)


def no_boxes(batch, device="cpu"):
    return torch.zeros(batch, 4, dtype=torch.int64, device=device)


def assert_equal(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual, expected), f"{(actual != expected).sum().item()} of {actual.numel()} values differ"


# -------------------------------------------------------------------------------------------------- index maps
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.uint8])
def test_down_up_index_maps_all_small_sizes(device, dtype):
    """Every H, W in 1..40 at every ratio: the composed down/up gather equals two F.interpolate calls exactly."""
    for height in range(1, 41):
        x_all = position_probe(height, 40, dtype, device)
        for width in range(1, 41):
            x = x_all[..., :width].contiguous()
            boxes = no_boxes(1, device)
            for ratio in RATIOS:
                assert_equal(cim_ext.compress(x, boxes, ratio), reference.compress(x, boxes, ratio))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.uint8])
@pytest.mark.parametrize("height", LARGE_SIDES)
def test_down_up_index_maps_large_sizes(device, dtype, height):
    for width in [1, 37, 64, height, 224, 333]:
        x = position_probe(height, width, dtype, device)
        for ratio in RATIOS + [1.01, 5.5, 49.0]:
            assert_equal(cim_ext.compress(x, no_boxes(1, device), ratio), reference.compress(x, no_boxes(1, device), ratio))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("channels", [1, 3, 4, 6])
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "strided"])
def test_layouts_match_reference_on_the_same_tensor(device, channels, layout):
    """On CPU, F.interpolate switches kernels (and tie rounding) with the layout: channels-last inputs with more
    than 3 channels take the small-output kernel at any size. The kernels follow the layout they are given."""
    for height, width, ratio in [(224, 224, 9.0), (141, 2, 1.0), (100, 100, 9.0), (150, 97, 3.7), (33, 17, 4.0)]:
        if layout == "channels_last":
            x = position_probe(height, width, torch.float32, device, channels, 2).contiguous(memory_format=torch.channels_last)
        elif layout == "transposed":
            x = position_probe(width, height, torch.float32, device, channels, 2).transpose(2, 3)
        else:
            x = position_probe(height + 3, width + 3, torch.float32, device, channels, 2)[..., 1 : height + 1, 2 : width + 2]
        boxes = random_boxes(2, height, width, seed=height, device=device)
        out = cim_ext.compress(x, boxes, ratio)
        # Channels-last in, channels-last out (read in place); any other layout gives NCHW.
        expected_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        assert out.is_contiguous(memory_format=expected_format)
        assert_equal(out, reference.compress(x, boxes, ratio))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_channels_last_equals_the_contiguous_call(device, dtype):
    """With at most 3 channels every CPU nearest-exact kernel rounds alike for both layouts, so the values match
    the NCHW call exactly; only the strides differ."""
    for channels, ratio in [(1, 4.0), (3, 4.0), (3, 9.0), (2, 3.7)]:
        x = random_images((4, channels, 224, 224), dtype, device, seed=channels)
        boxes = random_boxes(4, 224, 224, seed=channels, device=device)
        out = cim_ext.compress(x.contiguous(memory_format=torch.channels_last), boxes, ratio)
        assert out.is_contiguous(memory_format=torch.channels_last)
        if channels > 1:
            assert not out.is_contiguous()
        assert_equal(out, cim_ext.compress(x, boxes, ratio))


# -------------------------------------------------------------------------------------------------------- compress
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape", [(1, 1, 1, 1), (1, 3, 1, 9), (2, 3, 9, 1), (3, 3, 17, 31), (1, 1, 64, 65), (4, 2, 224, 224), (2, 5, 129, 7)]
)
def test_compress_matches_reference(device, dtype, shape):
    x = random_images(shape, dtype, device, seed=sum(shape))
    for seed, ratio in enumerate(RATIOS + [1e6]):
        boxes = random_boxes(shape[0], shape[2], shape[3], seed=seed, device=device)
        assert_equal(cim_ext.compress(x, boxes, ratio), reference.compress(x, boxes, ratio))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_compress_edge_boxes(device, dtype):
    height, width = 23, 30
    x = random_images((6, 3, height, width), dtype, device)
    boxes = torch.tensor(
        [
            [0, 0, 0, 0],  # empty mask
            [0, height, 0, width],  # everything kept
            [0, 1, 0, 1],  # one pixel in the corner
            [height - 1, height, width - 1, width],  # one pixel in the other corner
            [5, 5, 3, 20],  # zero height, non-zero width
            [0, height, 7, 7],  # zero width
        ],
        device=device,
    )
    out = cim_ext.compress(x, boxes, 4.0)
    assert_equal(out, reference.compress(x, boxes, 4.0))
    assert_equal(out[1], x[1])
    background = reference.down_up(x, 4.0)
    for b in (0, 4, 5):
        assert_equal(out[b], background[b])


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_compress_ratio_one_is_identity_and_input_untouched(device):
    x = random_images((2, 3, 31, 17), torch.float32, device)
    copy = x.clone()
    assert_equal(cim_ext.compress(x, random_boxes(2, 31, 17, device=device), 1.0), x)
    assert_equal(x, copy)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("shape", [(0, 3, 8, 8), (2, 0, 8, 8), (2, 3, 0, 8), (2, 3, 8, 0)])
def test_compress_empty(device, shape):
    x = torch.zeros(shape, dtype=torch.uint8, device=device)
    out = cim_ext.compress(x, random_boxes(shape[0], shape[2], shape[3], device=device), 4.0)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device


# ------------------------------------------------------------------------------------ compress_parts / uncompress
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 3, 17, 31), (2, 4, 141, 60), (5, 3, 224, 224)])
def test_uncompress_of_parts_is_compress(device, dtype, shape):
    x = random_images(shape, dtype, device)
    for seed, ratio in enumerate([1.0, 2.0, 4.0, 9.0, 100.0]):
        boxes = random_boxes(shape[0], shape[2], shape[3], seed=seed, device=device)
        small, crops = cim_ext.compress_parts(x, boxes, ratio)
        assert small.shape[-2:] == cim_ext.down_size(shape[2], shape[3], ratio)
        rebuilt = cim_ext.uncompress(small, crops, boxes, shape[2:])
        assert_equal(rebuilt, reference.uncompress(small, crops, boxes, *shape[2:]))
        assert_equal(rebuilt, cim_ext.compress(x, boxes, ratio))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_uncompress_matches_reference(device, layout):
    gen = torch.Generator().manual_seed(3)
    for batch, channels, small_hw, size in [(1, 1, (1, 1), (1, 1)), (3, 4, (7, 5), (31, 17)), (2, 5, (20, 90), (141, 200))]:
        small = torch.rand(batch, channels, *small_hw, generator=gen).to(device)
        if layout == "channels_last":
            small = small.contiguous(memory_format=torch.channels_last)
        boxes = random_boxes(batch, *size, seed=batch, device=device)
        areas = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2]) * channels
        crops = torch.rand(int(areas.sum()), generator=gen).to(device)
        out = cim_ext.uncompress(small, crops, boxes, size)
        assert_equal(out, reference.uncompress(small, crops, boxes, *size))
        # the list-of-crops form is the same call
        pieces = list(crops.split(areas.tolist()))
        assert_equal(cim_ext.uncompress(small, pieces, boxes, size), out)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_uncompress_empty_batch(device):
    small = torch.zeros(0, 3, 4, 4, device=device)
    out = cim_ext.uncompress(small, small.new_empty(0), torch.zeros(0, 4, dtype=torch.int64, device=device), (8, 8))
    assert out.shape == (0, 3, 8, 8)


def test_compress_cost():
    boxes = torch.tensor([[0, 0, 0, 0], [0, 10, 0, 20], [2, 7, 3, 13]])
    cost = cim_ext.compress_cost(boxes, (10, 20), 4.0)
    torch.testing.assert_close(cost, torch.tensor([0.25, 1.0, 0.25 + 0.75 * 0.25], dtype=torch.float64))
    sizes = torch.tensor([[10, 10], [10, 20], [5, 10]])
    per_sample = cim_ext.compress_cost(boxes, sizes, 2.0)
    torch.testing.assert_close(per_sample, torch.tensor([0.5, 1.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="boxes"):
        cim_ext.compress_cost(boxes.int(), (10, 20), 2.0)
    with pytest.raises(ValueError, match="ratio"):
        cim_ext.compress_cost(boxes, (10, 20), 0.5)


# ----------------------------------------------------------------------------------------------------------- CUDA
@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_matches_cuda_reference(dtype):
    for shape in [(1, 1, 1, 1), (3, 3, 17, 31), (2, 4, 141, 60), (8, 3, 224, 224), (2, 3, 255, 129)]:
        x = random_images(shape, dtype, "cuda")
        for seed, ratio in enumerate(RATIOS):
            boxes = random_boxes(shape[0], shape[2], shape[3], seed=seed, device="cuda")
            assert_equal(cim_ext.compress(x, boxes, ratio), reference.compress(x, boxes, ratio))
            small, crops = cim_ext.compress_parts(x, boxes, ratio)
            assert_equal(cim_ext.uncompress(small, crops, boxes, shape[2:]), reference.uncompress(small, crops, boxes, *shape[2:]))


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
def test_cuda_matches_cpu_kernel(dtype):
    """CUDA always rounds like ATen's small-output CPU kernel (used here for H + W <= 128); the larger cases have
    power-of-two scales, which every kernel computes exactly."""
    cases = [((2, 3, 31, 40), r) for r in RATIOS] + [((4, 3, 224, 224), 4.0), ((2, 3, 64, 128), 16.0)]
    for (shape, ratio) in cases:
        x = random_images(shape, dtype, "cpu")
        boxes = random_boxes(shape[0], shape[2], shape[3], seed=shape[2])
        expected = cim_ext.compress(x, boxes, ratio)
        assert_equal(cim_ext.compress(x.cuda(), boxes.cuda(), ratio).cpu(), expected)
        small, crops = cim_ext.compress_parts(x, boxes, ratio)
        rebuilt = cim_ext.uncompress(small.cuda(), crops.cuda(), boxes.cuda(), shape[2:])
        assert_equal(rebuilt.cpu(), cim_ext.uncompress(small, crops, boxes, shape[2:]))


@needs_cuda
@pytest.mark.cuda
def test_cuda_vectorised_and_scalar_paths():
    """Widths that allow 4-wide stores and widths that do not, misaligned views, big batch (grid-stride loops)."""
    for width in [4, 5, 6, 8, 12, 13, 224, 225, 1024]:
        for dtype in (torch.uint8, torch.float32, torch.float16):
            shape = (3, 3, 11, width)
            flat = random_images((3 * 3 * 11 * width + 1,), dtype, "cuda")
            x = flat[1:].view(shape)  # contiguous, but its data pointer is misaligned
            boxes = random_boxes(3, 11, width, device="cuda")
            assert_equal(cim_ext.compress(x, boxes, 4.0), reference.compress(x, boxes, 4.0))
            small, crops = cim_ext.compress_parts(x, boxes, 4.0)
            assert_equal(cim_ext.uncompress(small, crops, boxes, (11, width)), reference.uncompress(small, crops, boxes, 11, width))
    # Rows longer than one shared-memory table segment (2048 elements), with and without 16-byte chunks.
    for shape, layout in [((2, 3, 5, 4096), torch.contiguous_format), ((2, 3, 5, 4100), torch.contiguous_format),
                          ((2, 3, 6, 1000), torch.channels_last)]:
        for dtype in (torch.uint8, torch.float32):
            x = random_images(shape, dtype, "cuda").contiguous(memory_format=layout)
            boxes = random_boxes(2, shape[2], shape[3], device="cuda")
            assert_equal(cim_ext.compress(x, boxes, 9.0), reference.compress(x, boxes, 9.0))
    # More planes than blocks in the grid (grid-stride loop).
    x = random_images((70000, 16, 2, 4), torch.uint8, "cuda")
    boxes = random_boxes(70000, 2, 4, device="cuda")
    assert_equal(cim_ext.compress(x, boxes, 4.0), reference.compress(x, boxes, 4.0))


@needs_cuda
@pytest.mark.cuda
def test_cuda_mixed_devices_rejected():
    x = random_images((2, 3, 8, 8), torch.uint8, "cuda")
    with pytest.raises((ValueError, RuntimeError), match="boxes"):
        cim_ext.compress(x, no_boxes(2, "cpu"), 4.0)
    with pytest.raises((ValueError, RuntimeError), match="crops"):
        cim_ext.uncompress(x, torch.zeros(0, dtype=torch.uint8), no_boxes(2, "cuda"), (8, 8))
    with pytest.raises(ValueError, match="^boxes: expected a tensor on cuda"):
        torch.ops.cim_ext.compress(x, no_boxes(2, "cpu"), 4.0)


def clamp_boxes(boxes, height, width):
    """What the CUDA kernels do with a box outside the image: y0 into [0, H], y1 into [y0, H]; x alike."""
    y0 = boxes[:, 0].clamp(0, height)
    x0 = boxes[:, 2].clamp(0, width)
    y1 = torch.maximum(boxes[:, 1].clamp(0, height), y0)
    x1 = torch.maximum(boxes[:, 3].clamp(0, width), x0)
    return torch.stack([y0, y1, x0, x1], 1)


@needs_cuda
@pytest.mark.cuda
def test_cuda_bad_boxes_are_clamped_and_reported_without_host_sync():
    """compress and uncompress never wait for the GPU: the kernels clamp boxes outside the image, record the first
    one as a deferred error (raised by check_errors or the next cim_ext call) and stay inside crops whatever its
    size."""
    height, width = 20, 24
    x = random_images((4, 3, height, width), torch.uint8, "cuda")
    bad = torch.tensor([[-5, 4, 3, 30], [18, 25, -2, -1], [9, 3, 5, 7], [0, 20, 0, 24]], device="cuda")
    small = random_images((4, 3, 5, 6), torch.uint8, "cuda")
    expected = reference.compress(x, clamp_boxes(bad, height, width), 4.0)
    box_error = r"boxes: expected 0 <= y0 <= y1 <= H.*row 0 with a coordinate -5"
    runs = [
        (lambda: cim_ext.compress(x, bad, 4.0), box_error),
        (lambda: cim_ext.compress(x.contiguous(memory_format=torch.channels_last), bad, 4.0), box_error),
        # Both the boxes and the crop count are wrong here; whichever block records first is reported.
        (lambda: cim_ext.uncompress(small, small.new_zeros(7), bad, (height, width)), box_error + "|crops: expected"),
    ]
    outs = []
    for run, error in runs:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            outs.append(run())
        finally:
            torch.cuda.set_sync_debug_mode(0)
        with pytest.raises(ValueError, match=error):
            cim_ext.check_errors()
    assert_equal(outs[0], expected)
    assert_equal(outs[1], expected)
    assert outs[2].shape == (4, 3, height, width)
    cim_ext.check_errors()


@needs_cuda
@pytest.mark.cuda
def test_cuda_wrong_crop_count_is_reported():
    small = random_images((2, 3, 5, 6), torch.uint8, "cuda")
    boxes = torch.tensor([[1, 4, 2, 6], [0, 0, 0, 0]], device="cuda")  # 3 * 3 * 4 = 36 crop values
    out = cim_ext.uncompress(small, small.new_zeros(35), boxes, (20, 24))
    with pytest.raises(ValueError, match="crops: expected 36 values .* got 35"):
        cim_ext.check_errors()
    assert out.shape == (2, 3, 20, 24)
    cim_ext.check_errors()


def test_compress_cost_checks_cpu_boxes():
    with pytest.raises(ValueError, match="boxes"):
        cim_ext.compress_cost(torch.tensor([[0, 12, 0, 20]]), (10, 20), 4.0)


# --------------------------------------------------------------------------------------------- opcheck / compile
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_opcheck(device, dtype):
    x = random_images((2, 3, 13, 9), dtype, device)
    boxes = random_boxes(2, 13, 9, device=device)
    torch.library.opcheck(torch.ops.cim_ext.compress.default, (x, boxes, 4.0))
    channels_last = x.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.cim_ext.compress.default, (channels_last, boxes, 4.0))
    small, crops = cim_ext.compress_parts(x, boxes, 4.0)
    torch.library.opcheck(torch.ops.cim_ext.uncompress.default, (small, crops, boxes, 13, 9))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_torch_compile(device):
    def roundtrip(images, boxes):
        small, crops = cim_ext.compress_parts(images, boxes, 4.0)
        return cim_ext.compress(images, boxes, 4.0).float() - cim_ext.uncompress(small, crops, boxes, (16, 20)).float()

    def compressed(images, boxes):
        return cim_ext.compress(images, boxes, 9.0) * 2

    def raw_ops(images, boxes):
        out = torch.ops.cim_ext.compress(images, boxes, 9.0)
        return torch.ops.cim_ext.uncompress(out[:, :, ::3, ::3].contiguous(), images.new_zeros(0), boxes * 0, 16, 20) + out

    x = random_images((3, 3, 16, 20), torch.uint8, device)
    boxes = random_boxes(3, 16, 20, device=device)
    # compress and uncompress trace into one graph; compress_parts reads box values (a graph break).
    assert_equal(torch.compile(compressed, backend="aot_eager", fullgraph=True)(x, boxes), compressed(x, boxes))
    assert_equal(torch.compile(raw_ops, backend="aot_eager", fullgraph=True)(x, boxes), raw_ops(x, boxes))
    assert_equal(torch.compile(roundtrip, backend="aot_eager")(x, boxes), torch.zeros(3, 3, 16, 20, device=device))


# ------------------------------------------------------------------------------------------------------ bad input
def test_bad_input_names_the_argument():
    x = random_images((2, 3, 8, 8), torch.uint8, "cpu")
    boxes = no_boxes(2)
    cases = [
        (lambda: cim_ext.compress(x[0], boxes, 4.0), "images"),
        (lambda: cim_ext.compress(x.int(), boxes, 4.0), "images"),
        (lambda: cim_ext.compress(x.half(), boxes, 4.0), "images"),
        (lambda: cim_ext.compress(x, boxes.float(), 4.0), "boxes"),
        (lambda: cim_ext.compress(x, boxes[:1], 4.0), "boxes"),
        (lambda: cim_ext.compress(x, boxes[:, :3], 4.0), "boxes"),
        (lambda: cim_ext.compress(x, torch.tensor([[0, 9, 0, 8]] * 2), 4.0), "boxes"),
        (lambda: cim_ext.compress(x, torch.tensor([[-1, 3, 0, 8]] * 2), 4.0), "boxes"),
        (lambda: cim_ext.compress(x, torch.tensor([[5, 3, 0, 8]] * 2), 4.0), "boxes"),
        (lambda: cim_ext.compress(x, boxes, 0.5), "ratio"),
        (lambda: cim_ext.compress(x, boxes, float("nan")), "ratio"),
        (lambda: cim_ext.compress(x, boxes, float("inf")), "ratio"),
        (lambda: cim_ext.compress(x, boxes, True), "ratio"),
        (lambda: cim_ext.compress(x, boxes, "4"), "ratio"),
        (lambda: cim_ext.compress([x], boxes, 4.0), "images"),
        (lambda: cim_ext.uncompress(x, x.new_zeros(1), boxes, (8, 8)), "crops"),
        (lambda: cim_ext.uncompress(x, x.new_zeros(0).float(), boxes, (8, 8)), "crops"),
        (lambda: cim_ext.uncompress(x, x.new_zeros(0), boxes, (0, 8)), "height"),
        (lambda: cim_ext.uncompress(x, x.new_zeros(0), boxes, (8, 8, 8)), "size"),
        (lambda: cim_ext.uncompress(x, x.new_zeros(0), boxes, 8), "size"),
        (lambda: cim_ext.uncompress(x, x.new_zeros(0), [boxes], (8, 8)), "boxes"),
        (lambda: cim_ext.uncompress(x, x.new_zeros(0, dtype=torch.int64), boxes, (8, 8)), "crops"),
        (lambda: cim_ext.uncompress(x[:, :, :0], x.new_zeros(0), boxes, (8, 8)), "small"),
        (lambda: cim_ext.uncompress(x, x.new_zeros(0), torch.tensor([[0, 9, 0, 1]] * 2), (8, 8)), "boxes"),
        (lambda: cim_ext.compress_parts(x, boxes, 0.9), "ratio"),
    ]
    for call, name in cases:
        with pytest.raises((ValueError, TypeError), match=name):
            call()


def test_compiled_op_checks_its_arguments():
    """The kernels check their arguments themselves (the Python wrappers only check Python types), with the same
    ValueError "<argument>: expected ..., got ..." on every device."""
    x = random_images((2, 3, 8, 8), torch.uint8, "cpu")
    boxes = no_boxes(2)
    ops = torch.ops.cim_ext
    cases = [
        (lambda: ops.compress(x[0], boxes, 4.0), "images"),
        (lambda: ops.compress(x.int(), boxes, 4.0), "images"),
        (lambda: ops.compress(x, boxes.int(), 4.0), "boxes"),
        (lambda: ops.compress(x, boxes[:1], 4.0), "boxes"),
        (lambda: ops.compress(x, torch.tensor([[0, 3, 6, 9]] * 2), 4.0), "boxes"),
        (lambda: ops.compress(x, boxes, 0.25), "ratio"),
        (lambda: ops.compress(x, boxes, float("nan")), "ratio"),
        (lambda: ops.uncompress(x, x.new_zeros(5), boxes, 8, 8), "crops"),
        (lambda: ops.uncompress(x, x.new_zeros(0).double(), boxes, 8, 8), "crops"),
        (lambda: ops.uncompress(x, x.new_zeros(0), boxes, 0, 8), "height"),
        (lambda: ops.uncompress(x, x.new_zeros(4), torch.tensor([[2, 1, 2, 1]] * 2), 8, 8), "boxes"),
        (lambda: ops.uncompress(x, x.new_zeros(2, 2), boxes, 8, 8), "crops"),
        (lambda: ops.uncompress(x, x.new_zeros(0), boxes, 8, -1), "width"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=f"^{name}: expected"):
            call()


# ----------------------------------------------------------------------------------------------------------- fuzz
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(st.integers(0, 3), st.integers(0, 4), st.integers(0, 40), st.integers(0, 40)),
    dtype=st.sampled_from([torch.uint8, torch.float32, torch.float64, torch.float16, torch.int32]),
    ratio=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 10**7)),
    box=st.tuples(*[st.integers(-2, 42)] * 4),
)
def test_fuzz_compress(shape, dtype, ratio, box):
    x = torch.zeros(shape, dtype=dtype)
    boxes = torch.tensor([box] * shape[0], dtype=torch.int64).reshape(shape[0], 4)
    try:
        out = cim_ext.compress(x, boxes, ratio)
    except (ValueError, RuntimeError):
        return
    assert out.shape == x.shape
    if x.numel():
        assert_equal(out, reference.compress(x, boxes, ratio))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    small_shape=st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 9), st.integers(0, 9)),
    size=st.tuples(st.integers(-1, 30), st.integers(-1, 30)),
    n_crops=st.integers(0, 50),
    box=st.tuples(*[st.integers(-1, 31)] * 4),
)
def test_fuzz_uncompress(small_shape, size, n_crops, box):
    small = torch.rand(small_shape)
    boxes = torch.tensor([box] * small_shape[0], dtype=torch.int64).reshape(small_shape[0], 4)
    crops = torch.rand(n_crops)
    try:
        out = cim_ext.uncompress(small, crops, boxes, size)
    except (ValueError, RuntimeError):
        return
    assert out.shape == (*small_shape[:2], *size)
    if out.numel():
        assert_equal(out, reference.uncompress(small, crops, boxes, *size))
