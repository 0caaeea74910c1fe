"""cim_ext.rational: kernels against cim_ext.reference, gradients, determinism, opcheck, torch.compile, bad input."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cim_ext
from cim_ext import reference
from cim_ext.nn import RELU_INIT

from conftest import cpu_and_cuda, needs_cuda


SHAPES = [(), (1,), (7,), (3, 5), (1, 1, 1, 1), (2, 3, 5, 7), (1, 4, 9, 13), (4099,)]
DEGREES = [(6, 4), (1, 1), (2, 1), (3, 2), (4, 7), (7, 3), (16, 16)]
# Forward tolerances against the reference evaluated in the same dtype (same operation order, so the gap is tiny).
TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def coefficients(m, n, dtype=torch.float32, device="cpu", seed=0, relu=False):
    if relu:
        numerator = torch.tensor(RELU_INIT["numerator"], dtype=torch.float64)
        denominator = torch.tensor(RELU_INIT["denominator"], dtype=torch.float64)
    else:
        gen = torch.Generator().manual_seed(seed)
        numerator = torch.randn(m, generator=gen, dtype=torch.float64) * 0.5
        denominator = torch.randn(n, generator=gen, dtype=torch.float64) * 0.5
    return numerator.to(device=device, dtype=dtype), denominator.to(device=device, dtype=dtype)


def activation(shape, dtype=torch.float32, device="cpu", seed=0, scale=1.5, away_from_zero=0.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    if away_from_zero:
        # |b_k x^k| has a kink at x = 0: keep gradcheck points off it.
        x = x.sign() * (x.abs() + away_from_zero) + (x == 0) * away_from_zero
    return x.to(device=device, dtype=dtype)


def coefficient_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_grads(x, numerator, denominator, grad):
    """Reference gradients of (x, numerator, denominator), computed in float64."""
    inputs = [t.detach().double().requires_grad_() for t in (x, numerator, denominator)]
    out = reference.rational(*inputs)
    return out.detach(), torch.autograd.grad(out, inputs, grad.double())


# ------------------------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(device, dtype, shape):
    x = activation(shape, dtype, device)
    numerator, denominator = coefficients(6, 4, dtype, device, relu=True)
    torch.testing.assert_close(
        cim_ext.rational(x, numerator, denominator), reference.rational(x, numerator, denominator), **TOLERANCES[dtype]
    )


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("degrees", DEGREES)
def test_forward_any_degrees(device, dtype, degrees):
    x = activation((5, 67), dtype, device, scale=1.0)
    numerator, denominator = coefficients(*degrees, dtype, device, seed=sum(degrees))
    torch.testing.assert_close(
        cim_ext.rational(x, numerator, denominator), reference.rational(x, numerator, denominator), **TOLERANCES[dtype]
    )


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "strided", "offset", "expanded"])
def test_forward_non_contiguous(device, layout):
    base = activation((2, 5, 6, 7), torch.float32, device)
    x = {
        "channels_last": base.to(memory_format=torch.channels_last),
        "transposed": base.transpose(1, 3),
        "strided": base[:, ::2, 1::2],
        "offset": base.flatten()[1:],  # storage offset of one element: not 16-byte aligned
        "expanded": base[:, :1].expand(2, 5, 6, 7),
    }[layout]
    numerator, denominator = coefficients(6, 4, relu=True, device=device)
    out = cim_ext.rational(x, numerator, denominator)
    # Dense layouts are kept (no copy); other views come back in their suggested memory format.
    assert out.shape == x.shape and out.stride() == torch.empty_like(x).stride()
    torch.testing.assert_close(out, reference.rational(x, numerator, denominator), **TOLERANCES[torch.float32])


def _layouts(device, dtype=torch.float32, seed=0):
    """Dense non-contiguous layouts of one (2, 5, 6, 7) tensor, and the tensor itself."""
    base = activation((2, 5, 6, 7), dtype, device, seed=seed)
    return base, {
        "channels_last": base.to(memory_format=torch.channels_last),
        "permuted": base.permute(2, 0, 3, 1).contiguous().permute(1, 3, 0, 2),
        "offset": torch.cat([base.new_zeros(1), base.flatten()])[1:].view(base.shape),
    }


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["channels_last", "permuted", "offset"])
def test_dense_layouts_are_kept_without_copies(device, dtype, layout):
    base, layouts = _layouts(device, dtype)
    x = layouts[layout].requires_grad_()
    numerator, denominator = (t.requires_grad_() for t in coefficients(6, 4, relu=True, device=device))
    out = cim_ext.rational(x, numerator, denominator)
    assert out.stride() == x.stride()
    expected = cim_ext.rational(base, numerator, denominator)
    if layout == "offset" and device == "cuda":
        # The misaligned view runs the single-element kernel, whose contracted multiply-adds may round differently.
        torch.testing.assert_close(out, expected)
    else:
        assert torch.equal(out, expected)
    grad = activation(x.shape, dtype, device, seed=1)
    grads = torch.autograd.grad(out, (x, numerator, denominator), grad)
    assert grads[0].stride() == x.stride()
    plain = torch.autograd.grad(
        cim_ext.rational(base.detach().requires_grad_(), numerator, denominator), (numerator, denominator), grad
    )
    torch.testing.assert_close(grads[1:], plain)
    # grad in another layout than x: the result keeps x's layout and values.
    swapped = grad.transpose(0, 1).contiguous().transpose(0, 1)
    for other_grad in (grad.contiguous(), grad.to(memory_format=torch.channels_last), swapped):
        other = torch.ops.cim_ext._rational_backward(other_grad, x.detach(), numerator, denominator, True, False)[0]
        assert other.stride() == x.stride()
        assert torch.equal(other, grads[0])


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_non_dense_views(device):
    base, _ = _layouts(device)
    numerator, denominator = coefficients(6, 4, relu=True, device=device)
    for x in (base[..., ::2], base.to(memory_format=torch.channels_last)[:, ::2], base[:, :1].expand(2, 5, 6, 7)):
        out = cim_ext.rational(x, numerator, denominator)
        assert out.stride() == torch.empty_like(x).stride()
        assert torch.equal(out, cim_ext.rational(x.contiguous(), numerator, denominator))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_empty_input(device):
    numerator, denominator = coefficients(6, 4, device=device, relu=True)
    numerator.requires_grad_(True)
    denominator.requires_grad_(True)
    x = torch.empty(0, 3, device=device, requires_grad=True)
    out = cim_ext.rational(x, numerator, denominator)
    assert out.shape == (0, 3)
    grads = torch.autograd.grad(out.sum(), (x, numerator, denominator))
    assert grads[0].shape == (0, 3)
    assert torch.equal(grads[1], torch.zeros_like(numerator)) and torch.equal(grads[2], torch.zeros_like(denominator))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_nan_and_inf_stay_elementwise(device):
    numerator, denominator = coefficients(6, 4, device=device, relu=True)
    x = torch.tensor([1.0, float("nan"), -2.0, float("inf"), 0.5], device=device)
    out = cim_ext.rational(x, numerator, denominator)
    expected = reference.rational(x, numerator, denominator)
    assert torch.isnan(out[1])
    finite = torch.tensor([True, False, True, False, True], device=device)
    torch.testing.assert_close(out[finite], expected[finite])


def test_coefficients_are_cast_to_the_compute_dtype():
    x = activation((4, 9), torch.float32)
    numerator, denominator = coefficients(6, 4, torch.float64, relu=True)
    numerator.requires_grad_(True)
    out = cim_ext.rational(x, numerator, denominator)
    torch.testing.assert_close(out, reference.rational(x, numerator.float(), denominator.float()))
    (grad,) = torch.autograd.grad(out.sum(), numerator)
    assert grad.dtype == torch.float64


# ----------------------------------------------------------------------------------------------------------- backward
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("degrees", [(6, 4), (1, 1), (3, 2), (4, 7), (16, 16)])
@pytest.mark.parametrize("shape", [(1,), (3, 5), (2, 3, 5, 7), (40000,)])
def test_backward_matches_reference(device, dtype, degrees, shape):
    x = activation(shape, dtype, device, seed=1, scale=1.0).requires_grad_()
    numerator, denominator = (t.requires_grad_() for t in coefficients(*degrees, dtype, device, seed=2))
    grad = activation(shape, dtype, device, seed=3)
    out = cim_ext.rational(x, numerator, denominator)
    grads = torch.autograd.grad(out, (x, numerator, denominator), grad)
    _, expected = reference_grads(x, numerator, denominator, grad)
    tight = dtype == torch.float64
    # P' - y Q' cancels for high degrees: float32 gets a little more room than in the forward.
    x_tolerance = TOLERANCES[dtype] if tight else dict(rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(grads[0], expected[0].to(dtype), **x_tolerance)
    for got, want in zip(grads[1:], expected[1:]):
        # Sums over every element: scale the tolerance with the sum of magnitudes, not the (cancelling) sum.
        atol = (1e-12 if tight else 1e-5) * max(1.0, float(want.abs().max()), x.numel() ** 0.5)
        torch.testing.assert_close(got, want.to(dtype), rtol=1e-10 if tight else 1e-5, atol=atol)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("need_x", [True, False])
@pytest.mark.parametrize("need_coefficients", [True, False])
def test_backward_op_outputs_only_what_is_needed(device, need_x, need_coefficients):
    x = activation((3, 7, 5), torch.float64, device)
    grad = activation((3, 7, 5), torch.float64, device, seed=1)
    numerator, denominator = coefficients(6, 4, torch.float64, device, relu=True)
    full = torch.ops.cim_ext._rational_backward(grad, x, numerator, denominator, True, True)
    got = torch.ops.cim_ext._rational_backward(grad, x, numerator, denominator, need_x, need_coefficients)
    if need_x:
        assert torch.equal(got[0], full[0])
    else:
        assert got[0].numel() == 0
    for g, f in zip(got[1:], full[1:]):
        if need_coefficients:
            assert torch.equal(g, f)
        else:
            assert g.numel() == 0


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("wanted", ["x", "numerator", "denominator", "coefficients"])
def test_autograd_partial_requires_grad(device, wanted):
    x = activation((4, 11), torch.float64, device, seed=5)
    numerator, denominator = coefficients(6, 4, torch.float64, device, relu=True)
    inputs = {"x": x, "numerator": numerator, "denominator": denominator}
    names = ["numerator", "denominator"] if wanted == "coefficients" else [wanted]
    for name in names:
        inputs[name].requires_grad_(True)
    grad = activation((4, 11), torch.float64, device, seed=6)
    out = cim_ext.rational(x, numerator, denominator)
    got = torch.autograd.grad(out, [inputs[n] for n in names], grad)
    _, expected = reference_grads(x, numerator, denominator, grad)
    expected = dict(zip(["x", "numerator", "denominator"], expected))
    for name, g in zip(names, got):
        torch.testing.assert_close(g, expected[name])


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("degrees", [(6, 4), (3, 2), (2, 5)])
def test_gradcheck(device, seed, degrees):
    x = activation((2, 3, 4), torch.float64, device, seed=seed, away_from_zero=0.1).requires_grad_()
    numerator, denominator = (t.requires_grad_() for t in coefficients(*degrees, torch.float64, device, seed=seed))
    assert torch.autograd.gradcheck(cim_ext.rational, (x, numerator, denominator))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("layout", ["permuted", "channels_last", "strided"])
def test_gradcheck_non_contiguous(device, layout):
    base = activation((2, 3, 4, 5), torch.float64, device, seed=7, away_from_zero=0.1)
    x = {
        "permuted": base.permute(3, 1, 0, 2),
        "channels_last": base.to(memory_format=torch.channels_last),
        "strided": base[:, ::2, :, 1::2],
    }[layout].requires_grad_()
    numerator, denominator = (t.requires_grad_() for t in coefficients(6, 4, torch.float64, device, relu=True))
    assert torch.autograd.gradcheck(cim_ext.rational, (x, numerator, denominator))


def test_gradcheck_relu_init_with_zero_coefficient():
    # b_k = 0 puts every x on the kink of |b_k x^k|; like torch.abs the kernel uses sign(0) = 0 there.
    x = activation((3, 4), torch.float64, away_from_zero=0.1)
    numerator, denominator = coefficients(6, 4, torch.float64, relu=True)
    denominator[1] = 0
    grads = torch.ops.cim_ext._rational_backward(torch.ones_like(x), x, numerator, denominator, True, True)
    _, expected = reference_grads(x, numerator, denominator, torch.ones_like(x))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("degrees", [(6, 4), (1, 1), (3, 2), (4, 7)])
@pytest.mark.parametrize("shape", [(1,), (3, 5), (2, 3, 1, 7)])
def test_gradgradcheck(device, degrees, shape):
    """Second derivatives in x and both coefficient vectors (the CIM meta-step differentiates the backward)."""
    x = activation(shape, torch.float64, device, seed=sum(shape), away_from_zero=0.1).requires_grad_()
    numerator, denominator = coefficients(*degrees, torch.float64, device, seed=len(shape))
    numerator.requires_grad_()
    denominator.requires_grad_()
    assert torch.autograd.gradgradcheck(cim_ext.rational, (x, numerator, denominator))


def test_double_backward_uses_the_first_order_kernel_and_matches_the_reference():
    """First-order gradients built with create_graph=True still come from the kernel (same values), and a third
    derivative exists too."""
    x = activation((4, 6), torch.float64, away_from_zero=0.1).requires_grad_()
    numerator, denominator = (c.requires_grad_() for c in coefficients(6, 4, torch.float64, relu=True))
    args = (x, numerator, denominator)
    graph = torch.autograd.grad(cim_ext.rational(*args).sum(), args, create_graph=True)
    plain = torch.autograd.grad(cim_ext.rational(*args).sum(), args)
    for a, b in zip(graph, plain):
        assert torch.equal(a, b)
    second = torch.autograd.grad(graph[0].square().sum(), args, create_graph=True)
    expected = torch.autograd.grad(
        torch.autograd.grad(reference.rational(*args).sum(), args, create_graph=True)[0].square().sum(), args,
        create_graph=True)
    for a, b in zip(second, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    third = torch.autograd.grad(second[0].sum(), x)[0]
    third_expected = torch.autograd.grad(expected[0].sum(), x)[0]
    torch.testing.assert_close(third, third_expected, rtol=1e-10, atol=1e-12)


# -------------------------------------------------------------------------------------------------------- determinism
def test_cpu_coefficient_grads_do_not_depend_on_thread_count():
    """The chunking and the final order of the reduction are fixed (csrc/rational.h): bitwise equal for 1, 2 or 3
    threads."""
    x = activation((5 * 16384 + 77,), torch.float32, seed=11)
    grad = activation((5 * 16384 + 77,), torch.float32, seed=12)
    numerator, denominator = coefficients(6, 4, relu=True)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3, 1):
            torch.set_num_threads(count)
            results.append(torch.ops.cim_ext._rational_backward(grad, x, numerator, denominator, True, True))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_backward_is_deterministic(dtype):
    x = activation((3_000_017,), dtype, "cuda", seed=13)
    grad = activation((3_000_017,), dtype, "cuda", seed=14)
    numerator, denominator = coefficients(6, 4, device="cuda", relu=True)
    first = torch.ops.cim_ext._rational_backward(grad, x, numerator, denominator, True, True)
    for _ in range(3):
        again = torch.ops.cim_ext._rational_backward(grad, x, numerator, denominator, True, True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------- CUDA against CPU
@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("degrees", [(6, 4), (3, 2), (16, 16)])
@pytest.mark.parametrize("shape", [(1,), (7,), (2, 3, 5, 7), (1_000_003,)])
def test_cuda_matches_cpu_kernel(degrees, shape):
    x = activation(shape, torch.float64, seed=15, scale=1.0)
    grad = activation(shape, torch.float64, seed=16)
    numerator, denominator = coefficients(*degrees, torch.float64, seed=17)
    cpu = (cim_ext.rational(x, numerator, denominator),) + tuple(
        torch.ops.cim_ext._rational_backward(grad, x, numerator, denominator, True, True)
    )
    cuda_args = [t.cuda() for t in (grad, x, numerator, denominator)]
    gpu = (cim_ext.rational(*cuda_args[1:]),) + tuple(torch.ops.cim_ext._rational_backward(*cuda_args, True, True))
    for c, g in zip(cpu, gpu):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-10, atol=1e-10 * max(1.0, x.numel() ** 0.5))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (9,), (2, 3, 5, 7), (64, 17, 33)])
def test_half_types(device, dtype, shape):
    x = activation(shape, dtype, device, seed=18).requires_grad_()
    grad = activation(shape, dtype, device, seed=19)
    numerator, denominator = (t.requires_grad_() for t in coefficients(6, 4, device=device, relu=True))
    out = cim_ext.rational(x, numerator, denominator)
    assert out.dtype == dtype
    grads = torch.autograd.grad(out, (x, numerator, denominator), grad)
    assert grads[0].dtype == dtype and grads[1].dtype == torch.float32
    # The kernel computes in float32 from the half inputs: compare with the float64 reference on those inputs.
    expected_out, expected = reference_grads(x, numerator, denominator, grad)
    torch.testing.assert_close(out, expected_out.to(dtype), **TOLERANCES[dtype])
    torch.testing.assert_close(grads[0], expected[0].to(dtype), **TOLERANCES[dtype])
    for got, want in zip(grads[1:], expected[1:]):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * max(1.0, x.numel() ** 0.5))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_misaligned_and_tail_sizes(device):
    numerator, denominator = coefficients(6, 4, device=device, relu=True)
    base = activation((4103,), torch.float16, device, seed=20)
    for offset in range(0, 9):
        x = base[offset:].requires_grad_()
        out = cim_ext.rational(x, numerator, denominator)
        expected = reference.rational(x.float(), numerator, denominator).half()
        torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3)
        (grad,) = torch.autograd.grad(out.sum(), x)
        _, expected = reference_grads(x, numerator, denominator, torch.ones_like(x))
        torch.testing.assert_close(grad, expected[0].half(), rtol=2e-3, atol=2e-3)


@needs_cuda
@pytest.mark.cuda
def test_cuda_mixed_devices_raise():
    x = activation((3, 4), device="cuda")
    numerator, denominator = coefficients(6, 4, relu=True)
    with pytest.raises(ValueError, match="numerator"):
        cim_ext.rational(x, numerator, denominator.cuda())
    with pytest.raises(ValueError, match="denominator"):
        torch.ops.cim_ext.rational(x, numerator.cuda(), denominator)
    with pytest.raises(ValueError, match="like x"):
        torch.ops.cim_ext.rational(x.cpu(), numerator.cuda(), denominator.cuda())
    with pytest.raises(ValueError, match="grad"):
        torch.ops.cim_ext._rational_backward(x.cpu(), x, numerator.cuda(), denominator.cuda(), True, True)


# ------------------------------------------------------------------------------------------------ opcheck and compile
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_opcheck(device, requires_grad, layout):
    x = activation((2, 3, 4, 5), torch.float64, device, away_from_zero=0.1)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x.to(memory_format=torch.channels_last)[..., ::2]
    numerator, denominator = coefficients(6, 4, torch.float64, device, relu=True)
    for t in (x, numerator, denominator):
        t.requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.cim_ext.rational.default, (x, numerator, denominator))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("flags", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_backward(device, flags, layout):
    x = activation((2, 3, 4, 5), torch.float32, device)
    grad = activation((2, 3, 4, 5), torch.float32, device, seed=1)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    numerator, denominator = coefficients(6, 4, device=device, relu=True)
    torch.library.opcheck(torch.ops.cim_ext._rational_backward.default, (grad, x, numerator, denominator, *flags))


def _small_function(x, numerator, denominator):
    return cim_ext.rational(x * 1.5 - 0.25, numerator, denominator).square().mean()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_matches_eager(backend):
    torch._dynamo.reset()
    x = activation((2, 3, 5, 7), seed=21).requires_grad_()
    numerator, denominator = (t.requires_grad_() for t in coefficients(6, 4, relu=True))
    compiled = torch.compile(_small_function, backend=backend, fullgraph=True)
    expected = _small_function(x, numerator, denominator)
    got = compiled(x, numerator, denominator)
    torch.testing.assert_close(got, expected)
    inputs = (x, numerator, denominator)
    for g, e in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(expected, inputs)):
        torch.testing.assert_close(g, e)


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    torch._dynamo.reset()
    x = activation((2, 3, 5, 7), seed=22).requires_grad_()
    numerator, denominator = (t.requires_grad_() for t in coefficients(6, 4, relu=True))
    compiled = torch.compile(_small_function, fullgraph=True)
    expected = _small_function(x, numerator, denominator)
    got = compiled(x, numerator, denominator)
    torch.testing.assert_close(got, expected)
    inputs = (x, numerator, denominator)
    for g, e in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(expected, inputs)):
        torch.testing.assert_close(g, e)


# ---------------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("entry", [cim_ext.rational, torch.ops.cim_ext.rational])
def test_bad_inputs_name_the_argument(entry):
    """The checks live in the kernels: the public function and the op raise the same ValueError."""
    x = activation((3, 4))
    numerator, denominator = coefficients(6, 4, relu=True)
    cases = [
        ((x.long(), numerator, denominator), "x"),
        ((x.bool(), numerator, denominator), "x"),
        ((x, numerator[None], denominator), "numerator"),
        ((x, numerator[:0], denominator), "numerator"),
        ((x, numerator.long(), denominator), "numerator"),
        ((x, torch.randn(17), denominator), "numerator"),
        ((x, numerator, denominator[:0]), "denominator"),
        ((x, numerator, denominator[:, None]), "denominator"),
        ((x, numerator, torch.randn(17)), "denominator"),
        ((x, numerator, denominator.int()), "denominator"),
    ]
    for args, name in cases:
        with pytest.raises(ValueError, match=f"^{name}: expected"):
            entry(*args)
    # Not a tensor: the wrapper's TypeError, the dispatcher's RuntimeError; both name the argument.
    for args, name in [((x.numpy(), numerator, denominator), "x"), ((x, numerator, [1.0, 2.0]), "denominator")]:
        with pytest.raises(TypeError if entry is cim_ext.rational else RuntimeError, match=name):
            entry(*args)


def test_bad_inputs_to_the_backward_op():
    x = activation((3, 4))
    numerator, denominator = coefficients(6, 4, relu=True)
    for grad, expected in ((x[:2], "shape"), (x.double(), "dtype"), (x.T, "shape")):
        with pytest.raises(ValueError, match=f"^grad: expected {expected}"):
            torch.ops.cim_ext._rational_backward(grad, x, numerator, denominator, True, True)
    with pytest.raises(ValueError, match="^numerator: expected"):
        torch.ops.cim_ext._rational_backward(x, x, numerator[:0], denominator, True, True)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("coefficient_dtype_", [torch.float16, torch.float32, torch.float64])
def test_any_float_coefficient_dtype(x_dtype, coefficient_dtype_):
    """Coefficients of any float dtype are cast to the compute dtype in the kernel; their gradients come back in their
    own dtype."""
    x = activation((3, 40), x_dtype, seed=4)
    numerator, denominator = (
        t.to(coefficient_dtype_).requires_grad_() for t in coefficients(6, 4, torch.float64, relu=True)
    )
    out = cim_ext.rational(x, numerator, denominator)
    compute = coefficient_dtype(x_dtype)
    expected = reference.rational(x.to(compute), numerator.to(compute), denominator.to(compute)).to(x_dtype)
    torch.testing.assert_close(out, expected, **TOLERANCES[x_dtype])
    grads = torch.autograd.grad(out.float().sum(), (numerator, denominator))
    assert [g.dtype for g in grads] == [coefficient_dtype_] * 2


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.bool]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=4),
    x_dtype=st.sampled_from(_DTYPES),
    numerator_dtype=st.sampled_from(_DTYPES),
    m=st.integers(0, 18),
    n=st.integers(0, 18),
    numerator_dim=st.integers(0, 2),
    scale=st.sampled_from([0.0, 1.0, 1e3, float("inf"), float("nan")]),
)
def test_fuzz_python_entry_point(shape, x_dtype, numerator_dtype, m, n, numerator_dim, scale):
    x = (torch.randn(shape, dtype=torch.float64) * scale).to(x_dtype)
    numerator = torch.randn(m, dtype=torch.float64).to(numerator_dtype)
    if numerator_dim == 0:
        numerator = numerator.sum()
    elif numerator_dim == 2:
        numerator = numerator[None]
    denominator = torch.randn(n, dtype=torch.float64)
    try:
        out = cim_ext.rational(x, numerator, denominator)
    except (ValueError, RuntimeError):
        return
    assert out.shape == x.shape and out.dtype == x.dtype
    compute = coefficient_dtype(x.dtype)
    expected = reference.rational(x.to(compute), numerator.to(compute), denominator.to(compute)).to(x.dtype)
    tolerance = TOLERANCES[torch.float16] if x.dtype == torch.float16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, expected, equal_nan=True, **tolerance)
