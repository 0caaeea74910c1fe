"""cim_ext.soft_compress and its backward: forward against cim_ext.reference, gradients (gradcheck in float64 and
against the reference's autograd), determinism, opcheck, torch.compile, bad input, fuzz."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cim_ext
from cim_ext import reference

from conftest import cpu_and_cuda, needs_cuda


# The forward repeats the reference's arithmetic (on CPU bit for bit, FMAs included); the bound allows for the
# last bit where a platform fuses differently. Gradients sum in a different order than autograd does.
FORWARD_TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
GRAD_TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=2e-2, atol=2e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}
# (B, C, H, W, h, w): odd, 1-pixel, non-square, cams larger than / equal to the image, both CPU bilinear kernels
# (H + W <= 128 and > 128).
SHAPES = [
    (1, 1, 1, 1, 1, 1),
    (2, 3, 1, 9, 3, 2),
    (1, 2, 9, 1, 1, 1),
    (3, 3, 17, 31, 7, 7),
    (2, 1, 12, 12, 12, 12),
    (2, 4, 9, 13, 20, 30),
    (2, 3, 64, 90, 7, 5),
    (2, 3, 224, 224, 7, 7),
]
RATIOS = [1.0, 2.0, 4.0, 9.5, 100.0]


def inputs(shape, dtype=torch.float32, device="cpu", seed=0, requires_grad=False):
    batch, channels, height, width, cam_h, cam_w = shape
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, channels, height, width, generator=gen, dtype=torch.float64)
    cams = torch.rand(batch, cam_h, cam_w, generator=gen, dtype=torch.float64)
    images, cams = images.to(device=device, dtype=dtype), cams.to(device=device, dtype=dtype)
    return images.requires_grad_(requires_grad), cams.requires_grad_(requires_grad)


def reference_grads(images, cams, ratio, grad):
    images = images.detach().requires_grad_()
    cams = cams.detach().requires_grad_()
    out = reference.soft_compress(images, cams, ratio)
    return out.detach(), torch.autograd.grad(out, (images, cams), grad)


# ----------------------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(device, dtype, shape):
    images, cams = inputs(shape, dtype, device, seed=sum(shape))
    for ratio in RATIOS:
        torch.testing.assert_close(
            cim_ext.soft_compress(images, cams, ratio), reference.soft_compress(images, cams, ratio), **FORWARD_TOL[dtype]
        )


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_forward_limits(device):
    """cams == 0 gives down_up exactly; cams == 1 and ratio 1 give the image back (up to the rounding of the
    bilinear weights, which need not sum to exactly 1)."""
    images, _ = inputs((2, 3, 31, 17, 4, 4), torch.float32, device)
    ones = torch.ones(2, 4, 4, device=device)
    torch.testing.assert_close(cim_ext.soft_compress(images, ones * 0, 9.0), reference.down_up(images, 9.0), rtol=0, atol=0)
    torch.testing.assert_close(cim_ext.soft_compress(images, ones, 9.0), images, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cim_ext.soft_compress(images, ones * 0.3, 1.0), images, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "strided"])
def test_forward_layouts(device, layout):
    for shape in [(2, 4, 224, 224, 7, 7), (2, 3, 40, 30, 5, 6), (2, 6, 150, 97, 7, 7)]:
        images, cams = inputs(shape, torch.float32, device)
        if layout == "channels_last":
            images = images.contiguous(memory_format=torch.channels_last)
        elif layout == "transposed":
            images = images.transpose(2, 3).contiguous().transpose(2, 3)
            cams = cams.transpose(1, 2).contiguous().transpose(1, 2)
        else:
            images = torch.cat([images, images], 3)[..., ::2]
            cams = torch.cat([cams, cams], 1)[:, ::2]
        out = cim_ext.soft_compress(images, cams, 9.0)
        assert out.is_contiguous()
        torch.testing.assert_close(out, reference.soft_compress(images, cams, 9.0), **FORWARD_TOL[torch.float32])


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_forward_empty(device):
    for shape in [(0, 3, 8, 8, 2, 2), (2, 0, 8, 8, 2, 2), (2, 3, 0, 8, 2, 2)]:
        images, cams = inputs(shape, torch.float32, device)
        out = cim_ext.soft_compress(images, cams, 4.0)
        assert out.shape == images.shape


# ---------------------------------------------------------------------------------------------------------- backward
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_reference_autograd(device, dtype, shape):
    """The reference gradient is taken on CPU: PyTorch's CUDA nearest-neighbour backward inverts the index map with
    its own float arithmetic and, at some non-integer scales, routes a gradient to a neighbour of the pixel the
    forward read (pytorch/pytorch#97135), whereas the CPU backward reuses the forward's index map."""
    images, cams = inputs(shape, dtype, device, seed=1, requires_grad=True)
    grad = torch.randn(images.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device, dtype)
    for ratio in RATIOS:
        _, expected = reference_grads(images.cpu(), cams.cpu(), ratio, grad.cpu())
        actual = torch.autograd.grad(cim_ext.soft_compress(images, cams, ratio), (images, cams), grad)
        scale = max(1.0, float(expected[1].abs().max()))  # grad_cams sums up to H * W / (h * w) terms
        torch.testing.assert_close(actual[0].cpu(), expected[0], **GRAD_TOL[dtype])
        tol = GRAD_TOL[dtype]
        torch.testing.assert_close(actual[1].cpu(), expected[1], rtol=tol["rtol"], atol=tol["atol"] * scale)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("shape", SHAPES)
def test_images_backward_is_adjoint(device, shape):
    """soft_compress is linear in the images, so its images-gradient is the adjoint: <f(x), g> == <x, f^T(g)>."""
    images, cams = inputs(shape, torch.float64, device, seed=3)
    grad = torch.randn(images.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(device)
    for ratio in RATIOS:
        grad_images = torch.ops.cim_ext._soft_compress_backward(grad, images, cams, ratio, True, False)[0]
        lhs = (cim_ext.soft_compress(images, cams, ratio) * grad).sum()
        torch.testing.assert_close(lhs, (images * grad_images).sum(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "shape, ratio",
    [((1, 1, 1, 1, 1, 1), 4.0), ((2, 2, 5, 7, 3, 4), 4.0), ((1, 2, 11, 6, 11, 6), 9.5), ((2, 1, 5, 9, 8, 2), 2.0),
     ((1, 1, 12, 10, 1, 1), 100.0), ((1, 1, 8, 9, 4, 3), 1.0)],
)
def test_gradcheck(seed, shape, ratio):
    images, cams = inputs(shape, torch.float64, seed=seed, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, c: cim_ext.soft_compress(x, c, ratio), (images, cams))


@pytest.mark.parametrize("layout", ["channels_last", "permuted"])
def test_gradcheck_non_contiguous(layout):
    images, cams = inputs((1, 4, 7, 6, 3, 5), torch.float64, seed=5)
    if layout == "channels_last":
        images = images.contiguous(memory_format=torch.channels_last)
    else:
        images = images.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
        cams = cams.transpose(1, 2).contiguous().transpose(1, 2)
    images.requires_grad_()
    cams.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, c: cim_ext.soft_compress(x, c, 4.0), (images, cams))


def test_backward_only_what_is_needed():
    images, cams = inputs((2, 3, 17, 13, 4, 4), torch.float64, seed=3)
    grad = torch.randn_like(images)
    both = torch.ops.cim_ext._soft_compress_backward(grad, images, cams, 4.0, True, True)
    only_images = torch.ops.cim_ext._soft_compress_backward(grad, images, cams, 4.0, True, False)
    only_cams = torch.ops.cim_ext._soft_compress_backward(grad, images, cams, 4.0, False, True)
    assert only_images[1].numel() == 0 and only_cams[0].numel() == 0
    torch.testing.assert_close(only_images[0], both[0], rtol=0, atol=0)
    torch.testing.assert_close(only_cams[1], both[1], rtol=0, atol=0)
    cams.requires_grad_()
    (grad_cams,) = torch.autograd.grad(cim_ext.soft_compress(images, cams, 4.0), (cams,), grad)
    torch.testing.assert_close(grad_cams, both[1], rtol=0, atol=0)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_backward_deterministic(device):
    images, cams = inputs((4, 3, 96, 80, 7, 7), torch.float32, device, seed=4, requires_grad=True)
    grad = torch.randn(images.shape, generator=torch.Generator().manual_seed(0)).to(device)
    first = torch.autograd.grad(cim_ext.soft_compress(images, cams, 4.0), (images, cams), grad)
    for _ in range(3):
        again = torch.autograd.grad(cim_ext.soft_compress(images, cams, 4.0), (images, cams), grad)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize(
    "shape, ratio",
    [((1, 1, 1, 1, 1, 1), 4.0), ((2, 2, 5, 7, 3, 4), 4.0), ((1, 2, 11, 6, 11, 6), 9.5), ((1, 1, 12, 10, 1, 1), 100.0),
     ((1, 1, 8, 9, 4, 3), 1.0)],
)
def test_gradgradcheck(device, shape, ratio):
    """Second derivatives in images and cams (the CIM meta-step differentiates the backward)."""
    images, cams = inputs(shape, torch.float64, device, seed=sum(shape), requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, c: cim_ext.soft_compress(x, c, ratio), (images, cams))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("ratio", RATIOS + [2.7, 3.0])
def test_down_up_gather_is_down_up(device, ratio):
    """The gather that reference.soft_compress uses on CUDA selects the very pixels F.interpolate does (float32 on
    CPU shares the CUDA kernels' index arithmetic, so the CUDA map is checked on every machine)."""
    for height, width in [(1, 1), (37, 224), (97, 33), (224, 224), (5, 300), (64, 90)]:
        x = torch.arange(height * width, dtype=torch.float32).view(1, 1, height, width).to(device)
        source = torch.from_numpy(reference._down_up_source(height, width, ratio)).to(device)
        assert torch.equal(x.flatten()[source].view_as(x), reference.down_up(x, ratio)), (height, width)
        assert torch.equal(reference.down_up_gather(x, ratio), reference.down_up(x, ratio))


# ----------------------------------------------------------------------------------------------------------- CUDA
@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_types(dtype):
    for shape in [(2, 3, 17, 31, 7, 7), (4, 3, 224, 224, 7, 7)]:
        images, cams = inputs(shape, dtype, "cuda", requires_grad=True)
        grad = torch.randn(images.shape, device="cuda", dtype=dtype)
        out = cim_ext.soft_compress(images, cams, 4.0)
        assert out.dtype == dtype
        expected_out, expected = reference_grads(images.float(), cams.float(), 4.0, grad.float())
        torch.testing.assert_close(out.float(), expected_out, **FORWARD_TOL[dtype])
        actual = torch.autograd.grad(out, (images, cams), grad)
        assert actual[0].dtype == dtype and actual[1].dtype == dtype
        torch.testing.assert_close(actual[0].float(), expected[0], **GRAD_TOL[dtype])
        scale = float(expected[1].abs().max())
        torch.testing.assert_close(actual[1].float(), expected[1], rtol=GRAD_TOL[dtype]["rtol"], atol=2e-2 * scale)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu_kernel(dtype):
    for shape in SHAPES:
        images, cams = inputs(shape, dtype, "cpu", seed=7, requires_grad=True)
        grad = torch.randn(images.shape, generator=torch.Generator().manual_seed(8), dtype=dtype)
        # At these sizes and ratios ATen's CPU kernels round the nearest-exact indices like CUDA (no ties, exact
        # scales, or the small-output kernel), so CPU and CUDA gather the same pixels.
        for ratio in [1.0, 4.0, 16.0]:
            out = cim_ext.soft_compress(images, cams, ratio)
            grads = torch.autograd.grad(out, (images, cams), grad)
            images_d = images.detach().cuda().requires_grad_()
            cams_d = cams.detach().cuda().requires_grad_()
            out_d = cim_ext.soft_compress(images_d, cams_d, ratio)
            grads_d = torch.autograd.grad(out_d, (images_d, cams_d), grad.cuda())
            torch.testing.assert_close(out_d.cpu(), out, **FORWARD_TOL[dtype])
            torch.testing.assert_close(grads_d[0].cpu(), grads[0], **GRAD_TOL[dtype])
            scale = max(1.0, float(grads[1].abs().max()))
            torch.testing.assert_close(grads_d[1].cpu(), grads[1], rtol=GRAD_TOL[dtype]["rtol"], atol=GRAD_TOL[dtype]["atol"] * scale)


@needs_cuda
@pytest.mark.cuda
def test_cuda_gradcheck():
    images, cams = inputs((2, 2, 7, 9, 3, 4), torch.float64, "cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, c: cim_ext.soft_compress(x, c, 4.0), (images, cams))


@needs_cuda
@pytest.mark.cuda
def test_cuda_mixed_devices_rejected():
    images, cams = inputs((2, 3, 8, 8, 2, 2), torch.float32, "cuda")
    with pytest.raises((ValueError, RuntimeError), match="device"):
        cim_ext.soft_compress(images, cams.cpu(), 4.0)
    with pytest.raises(RuntimeError, match="cams"):
        torch.ops.cim_ext.soft_compress(images, cams.cpu(), 4.0)


# --------------------------------------------------------------------------------------------- opcheck / compile
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    images, cams = inputs((2, 3, 13, 9, 4, 3), torch.float64, device, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.cim_ext.soft_compress.default, (images, cams, 4.0))
    grad = torch.randn_like(images)
    torch.library.opcheck(
        torch.ops.cim_ext._soft_compress_backward.default, (grad, images.detach(), cams.detach(), 4.0, True, True)
    )
    torch.library.opcheck(
        torch.ops.cim_ext._soft_compress_backward.default, (grad, images.detach(), cams.detach(), 4.0, False, True)
    )


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_torch_compile(device):
    def loss(images, cams):
        return (cim_ext.soft_compress(images, cams, 4.0) * images).sum()

    images, cams = inputs((2, 3, 20, 16, 5, 4), torch.float32, device, requires_grad=True)
    compiled = torch.compile(loss, backend="aot_eager")
    expected = loss(images, cams)
    actual = compiled(images, cams)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(
        torch.autograd.grad(actual, (images, cams)), torch.autograd.grad(expected, (images, cams)), rtol=1e-5, atol=1e-5
    )

    def raw(images, cams):
        return torch.ops.cim_ext.soft_compress(images, cams, 9.0) + 1

    with torch.no_grad():
        torch.testing.assert_close(torch.compile(raw, backend="aot_eager", fullgraph=True)(images, cams), raw(images, cams))


# ------------------------------------------------------------------------------------------------------ bad input
def test_bad_input_names_the_argument():
    images, cams = inputs((2, 3, 8, 8, 2, 2))
    cases = [
        (lambda: cim_ext.soft_compress(images[0], cams, 4.0), "images"),
        (lambda: cim_ext.soft_compress((images * 255).to(torch.uint8), cams, 4.0), "images"),
        (lambda: cim_ext.soft_compress(images.half(), cams.half(), 4.0), "images"),
        (lambda: cim_ext.soft_compress(images, cams[0], 4.0), "cams"),
        (lambda: cim_ext.soft_compress(images, cams[:1], 4.0), "cams"),
        (lambda: cim_ext.soft_compress(images, cams.double(), 4.0), "cams"),
        (lambda: cim_ext.soft_compress(images, cams.int(), 4.0), "cams"),
        (lambda: cim_ext.soft_compress(images, cams * float("nan"), 4.0), "cams"),
        (lambda: cim_ext.soft_compress(images, cams[:, :0], 4.0), "cams"),
        (lambda: cim_ext.soft_compress(images, cams, 0.99), "ratio"),
        (lambda: cim_ext.soft_compress(images, cams, float("nan")), "ratio"),
        (lambda: cim_ext.soft_compress(images, cams, None), "ratio"),
    ]
    for call, name in cases:
        with pytest.raises((ValueError, RuntimeError), match=name):
            call()


def test_compiled_op_checks_its_arguments():
    images, cams = inputs((2, 3, 8, 8, 2, 2))
    ops = torch.ops.cim_ext
    cases = [
        (lambda: ops.soft_compress(images[0], cams, 4.0), "images"),
        (lambda: ops.soft_compress(images.int(), cams, 4.0), "images"),
        (lambda: ops.soft_compress(images, cams[0], 4.0), "cams"),
        (lambda: ops.soft_compress(images, cams[:1], 4.0), "cams"),
        (lambda: ops.soft_compress(images, cams.double(), 4.0), "cams"),
        (lambda: ops.soft_compress(images, cams[:, :0], 4.0), "cams"),
        (lambda: ops.soft_compress(images, cams, 0.5), "ratio"),
        (lambda: ops._soft_compress_backward(images[:1], images, cams, 4.0, True, True), "grad"),
        (lambda: ops._soft_compress_backward(images.double(), images, cams, 4.0, True, True), "grad"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()


# ----------------------------------------------------------------------------------------------------------- fuzz
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(*[st.integers(0, 3), st.integers(0, 3), st.integers(0, 24), st.integers(0, 24)]),
    cam_shape=st.tuples(st.integers(0, 4), st.integers(0, 9), st.integers(0, 9)),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.uint8]),
    ratio=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 1000)),
)
def test_fuzz(shape, cam_shape, dtype, ratio):
    images = torch.rand(shape).to(dtype)
    cams = torch.rand(cam_shape).to(dtype)
    try:
        out = cim_ext.soft_compress(images, cams, ratio)
    except (ValueError, RuntimeError):
        return
    assert out.shape == images.shape
    if out.numel():
        torch.testing.assert_close(out, reference.soft_compress(images, cams, ratio), **FORWARD_TOL[dtype])
