"""cam and its backward (_cam_backward): kernels against cim_ext.reference, gradients, registration, bad input."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cim_ext
from cim_ext import reference

from conftest import cpu_and_cuda

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=2e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}

# (B, C, h, w, K): 1-pixel maps, 1 channel, non-square, odd sizes, B=1, maps larger than a CUDA block (>= 256
# pixels) and the 512x7x7 case of ResNet.
SHAPES = [
    (1, 1, 1, 1, 1),
    (2, 3, 7, 7, 4),
    (3, 5, 1, 9, 2),
    (4, 17, 5, 3, 3),
    (1, 6, 2, 1, 5),
    (3, 9, 17, 19, 2),
    (2, 512, 7, 7, 10),
]


def make_inputs(batch, channels, height, width, classes, dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    fmaps = torch.randn(batch, channels, height, width, generator=gen, dtype=torch.float64)
    weight = torch.randn(classes, channels, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    return fmaps.to(device, dtype), weight.to(device, dtype), labels.to(device)


def layouts(fmaps):
    """The same values as NCHW-contiguous, channels_last and a non-contiguous (strided) tensor."""
    strided = torch.empty(fmaps.shape[:-1] + (2 * fmaps.shape[-1],), dtype=fmaps.dtype, device=fmaps.device)[..., ::2]
    strided.copy_(fmaps)
    return {
        "contiguous": fmaps,
        "channels_last": fmaps.contiguous(memory_format=torch.channels_last),
        "strided": strided,
    }


def separated(fmaps, weight, labels, gap=1e-3):
    """Whether every raw map has a unique min and max, clear of the next value by `gap` (for finite differences)."""
    raw = reference.cam(fmaps.double(), weight.double(), labels, normalize=False).flatten(1)
    if raw.shape[1] < 2:
        return True
    ordered = raw.sort(1).values
    return bool(((ordered[:, 1] - ordered[:, 0]) > gap).all() and ((ordered[:, -1] - ordered[:, -2]) > gap).all())


# ------------------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_cam_matches_reference(device, dtype, normalize, shape):
    fmaps, weight, labels = make_inputs(*shape, dtype=dtype, device=device)
    expected = reference.cam(fmaps.double(), weight.double(), labels, normalize).to(dtype)
    for name, f in layouts(fmaps).items():
        out = cim_ext.cam(f, weight, labels, normalize=normalize)
        assert out.shape == (shape[0], shape[2], shape[3]) and out.dtype == dtype and out.is_contiguous(), name
        torch.testing.assert_close(out, expected, **TOL[dtype], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_cam_non_contiguous_weight_and_labels(device):
    fmaps, weight, labels = make_inputs(3, 6, 4, 5, 7, device=device)
    weight_t = weight.t().contiguous().t()
    labels_s = torch.stack([labels, labels], 1)[:, 0]
    torch.testing.assert_close(cim_ext.cam(fmaps, weight_t, labels_s), reference.cam(fmaps, weight, labels))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cam_constant_map_is_zero(device, dtype):
    fmaps, weight, labels = make_inputs(3, 4, 5, 6, 2, dtype=dtype, device=device)
    fmaps[0] = 0.0  # raw map 0: constant zero
    fmaps[1] = torch.arange(4, dtype=dtype, device=device)[:, None, None]  # constant per channel: constant map
    out = cim_ext.cam(fmaps, weight, labels)
    assert torch.isfinite(out).all()
    assert (out[:2] == 0).all()
    assert out[2].min() == 0 and out[2].max() == 1
    one_pixel = cim_ext.cam(fmaps[:, :, :1, :1], weight, labels)
    assert (one_pixel == 0).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_cam_empty(device):
    fmaps, weight, labels = make_inputs(0, 3, 4, 5, 2, device=device)
    assert cim_ext.cam(fmaps, weight, labels).shape == (0, 4, 5)
    fmaps, weight, labels = make_inputs(2, 3, 0, 5, 2, device=device)
    assert cim_ext.cam(fmaps, weight, labels).shape == (2, 0, 5)
    fmaps, weight, labels = make_inputs(2, 0, 3, 5, 2, device=device)
    assert (cim_ext.cam(fmaps, weight, labels) == 0).all()


# ------------------------------------------------------------------------------------------------------ backward
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cam_gradcheck(device, normalize, layout, seed):
    # The third map has more pixels than a CUDA block has threads (another summation path): checked in fast mode.
    shape = [(2, 3, 4, 5, 3), (3, 4, 3, 3, 2), (2, 2, 16, 17, 2)][seed]
    fast = seed == 2
    for attempt in range(20):
        fmaps, weight, labels = make_inputs(*shape, device=device, seed=100 * seed + attempt)
        if separated(fmaps, weight, labels):
            break
    labels[-1] = labels[0]  # a weight row shared by two samples
    fmaps = layouts(fmaps)[layout].requires_grad_(True)
    weight = weight.requires_grad_(True)
    check = lambda fn, inputs: torch.autograd.gradcheck(fn, inputs, fast_mode=fast)  # noqa: E731
    assert check(lambda f, w: cim_ext.cam(f, w, labels, normalize), (fmaps, weight))
    # Each input alone (the backward then computes only one gradient).
    assert check(lambda f: cim_ext.cam(f, weight.detach(), labels, normalize), (fmaps,))
    assert check(lambda w: cim_ext.cam(fmaps.detach(), w, labels, normalize), (weight,))


def _grads(fn, fmaps, weight, labels, grad, normalize):
    fmaps = fmaps.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(True)
    out = fn(fmaps, weight, labels, normalize)
    return torch.autograd.grad(out, (fmaps, weight), grad)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_cam_backward_matches_reference(device, dtype, normalize, shape):
    fmaps, weight, labels = make_inputs(*shape, dtype=dtype, device=device, seed=3)
    labels[0] = labels[-1]
    grad = torch.randn(shape[0], shape[2], shape[3], dtype=dtype, device=device)
    expected = _grads(reference.cam, fmaps.double(), weight.double(), labels, grad.double(), normalize)
    for name, f in layouts(fmaps).items():
        got = _grads(cim_ext.cam, f, weight, labels, grad, normalize)
        for g, e in zip(got, expected):
            assert g.dtype == dtype
            scale = max(1.0, float(e.abs().max()))
            torch.testing.assert_close(g, e.to(dtype), rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * scale,
                                       msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_cam_backward_ties_split_like_amin_amax(device):
    # One channel with weight 1: raw == fmaps exactly, so ties are exact in both implementations.
    fmaps = torch.tensor([[0.0, 0.0, 1.0], [0.5, 1.0, 0.0]], dtype=torch.float64, device=device)[None, None]
    fmaps = torch.cat([fmaps, fmaps.flip(-1) * 2], 0)
    weight = torch.ones(1, 1, dtype=torch.float64, device=device)
    labels = torch.zeros(2, dtype=torch.int64, device=device)
    grad = torch.randn(2, 2, 3, dtype=torch.float64, device=device)
    expected = _grads(reference.cam, fmaps, weight, labels, grad, True)
    got = _grads(cim_ext.cam, fmaps, weight, labels, grad, True)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_cam_backward_constant_map_and_unused_classes(device):
    fmaps, weight, labels = make_inputs(2, 3, 4, 4, 5, device=device)
    fmaps[0] = 1.0
    labels = torch.tensor([1, 3], device=device)
    grad_f, grad_w = _grads(cim_ext.cam, fmaps, weight, labels, torch.ones(2, 4, 4, dtype=torch.float64, device=device), True)
    assert (grad_f[0] == 0).all()
    assert (grad_w[[0, 2, 4]] == 0).all()
    ref_f, ref_w = _grads(reference.cam, fmaps, weight, labels, torch.ones(2, 4, 4, dtype=torch.float64, device=device), True)
    torch.testing.assert_close(grad_f, ref_f)
    torch.testing.assert_close(grad_w, ref_w)


def test_cam_backward_op_outputs_only_what_is_needed():
    fmaps, weight, labels = make_inputs(2, 3, 4, 5, 3)
    grad = torch.randn(2, 4, 5, dtype=torch.float64)
    op = torch.ops.cim_ext._cam_backward
    gf, gw = op(grad, fmaps, weight, labels, True, True, False)
    assert gf.shape == fmaps.shape and gw.numel() == 0
    gf, gw = op(grad, fmaps, weight, labels, True, False, True)
    assert gf.numel() == 0 and gw.shape == weight.shape
    # grad as autograd may hand it over: expanded (stride 0).
    expanded = torch.ones(1, 1, 1, dtype=torch.float64).expand(2, 4, 5)
    gf1, gw1 = op(expanded, fmaps, weight, labels, True, True, True)
    gf2, gw2 = op(expanded.contiguous(), fmaps, weight, labels, True, True, True)
    assert torch.equal(gf1, gf2) and torch.equal(gw1, gw2)


def test_cam_backward_weight_is_deterministic():
    fmaps, weight, labels = make_inputs(64, 33, 7, 7, 3, dtype=torch.float32, seed=5)
    grad = torch.randn(64, 7, 7)
    op = torch.ops.cim_ext._cam_backward
    first = op(grad, fmaps, weight, labels, True, True, True)
    for _ in range(3):
        again = op(grad, fmaps, weight, labels, True, True, True)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 1, 2, 1), (2, 3, 4, 5, 3), (3, 2, 1, 3, 4), (1, 5, 3, 3, 2)])
def test_cam_gradgradcheck(device, normalize, shape):
    """Second derivatives in fmaps and weight (the CIM meta-step differentiates the backward)."""
    for seed in range(20):
        fmaps, weight, labels = make_inputs(*shape, seed=seed)
        if separated(fmaps, weight, labels, gap=1e-2):
            break
    fmaps, weight, labels = fmaps.to(device).requires_grad_(), weight.to(device).requires_grad_(), labels.to(device)
    assert torch.autograd.gradgradcheck(lambda f, w: cim_ext.cam(f, w, labels, normalize), (fmaps, weight))


# --------------------------------------------------------------------------------------------- CUDA against CPU
@pytest.mark.cuda
@pytest.mark.parametrize("device", cpu_and_cuda()[1:])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", SHAPES)
def test_cam_cuda_matches_cpu_kernel(device, layout, shape):
    fmaps, weight, labels = make_inputs(*shape, dtype=torch.float32)
    grad = torch.randn(shape[0], shape[2], shape[3])
    cpu = _grads(cim_ext.cam, layouts(fmaps)[layout], weight, labels, grad, True)
    cuda = _grads(cim_ext.cam, layouts(fmaps.to(device))[layout], weight.to(device), labels.to(device), grad.to(device), True)
    torch.testing.assert_close(cim_ext.cam(fmaps.to(device), weight.to(device), labels.to(device)).cpu(),
                               cim_ext.cam(fmaps, weight, labels), **TOL[torch.float32])
    for c, g in zip(cpu, cuda):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-4, atol=1e-4 * max(1.0, float(c.abs().max())))


@pytest.mark.cuda
@pytest.mark.parametrize("device", cpu_and_cuda()[1:])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cam_cuda_half_types(device, dtype, layout):
    # Maps whose min and max are clear of the next value even after rounding to 16 bits (no ties in the kernel).
    for seed in range(50):
        fmaps, weight, labels = make_inputs(4, 64, 7, 7, 5, dtype=torch.float32, device=device, seed=seed)
        low_f, low_w = (fmaps / 8).to(dtype), (weight / 8).to(dtype)
        if separated(low_f, low_w, labels, gap=0.01):
            break
    expected = reference.cam(low_f.double(), low_w.double(), labels)
    out = cim_ext.cam(layouts(low_f)[layout], low_w, labels)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, **TOL[dtype])
    grad = torch.randn(4, 7, 7, device=device)
    got = _grads(cim_ext.cam, layouts(low_f)[layout], low_w, labels, grad.to(dtype), True)
    ref = _grads(reference.cam, low_f.double(), low_w.double(), labels, grad.to(dtype).double(), True)
    for g, e in zip(got, ref):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), e, rtol=TOL[dtype]["rtol"] * 5, atol=TOL[dtype]["atol"] * max(1.0, float(e.abs().max())) * 5)


@pytest.mark.cuda
@pytest.mark.parametrize("device", cpu_and_cuda()[1:])
def test_cam_mixed_devices_rejected(device):
    fmaps, weight, labels = make_inputs(2, 3, 4, 5, 3)
    with pytest.raises(ValueError, match="weight"):
        cim_ext.cam(fmaps.to(device), weight, labels.to(device))
    with pytest.raises(ValueError, match="labels"):
        cim_ext.cam(fmaps.to(device), weight.to(device), labels)
    with pytest.raises(RuntimeError, match="labels"):
        torch.ops.cim_ext.cam(fmaps.to(device), weight.to(device), labels, True)


# -------------------------------------------------------------------------------------- registration and compile
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_cam_opcheck(device, requires_grad, normalize):
    fmaps, weight, labels = make_inputs(3, 4, 5, 6, 3, device=device)
    fmaps.requires_grad_(requires_grad)
    weight.requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.cim_ext.cam.default, (fmaps, weight, labels, normalize))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_cam_backward_opcheck(device):
    fmaps, weight, labels = make_inputs(3, 4, 5, 6, 3, device=device)
    grad = torch.randn(3, 5, 6, dtype=torch.float64, device=device)
    for need in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(torch.ops.cim_ext._cam_backward.default, (grad, fmaps, weight, labels, True, *need))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_cam_torch_compile(device, backend):
    fmaps, weight, labels = make_inputs(3, 8, 5, 6, 4, dtype=torch.float32, device=device)

    def loss(f, w):
        return (torch.ops.cim_ext.cam(f, w, labels, True) * torch.arange(30.0, device=device).view(5, 6)).sum()

    compiled = torch.compile(loss, backend=backend, fullgraph=True)
    f1, w1 = fmaps.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    f2, w2 = fmaps.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    torch.testing.assert_close(compiled(f1, w1), loss(f2, w2))
    compiled(f1, w1).backward()
    loss(f2, w2).backward()
    torch.testing.assert_close(f1.grad, f2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)
    # The public wrapper (its label check breaks the graph, which is fine).
    public = torch.compile(lambda f, w: cim_ext.cam(f, w, labels), backend=backend)
    torch.testing.assert_close(public(fmaps, weight), cim_ext.cam(fmaps, weight, labels))


# ---------------------------------------------------------------------------------------------------- bad input
def test_cam_bad_input():
    fmaps, weight, labels = make_inputs(2, 3, 4, 5, 3)
    cases = [
        ((fmaps[0], weight, labels), "fmaps"),
        ((fmaps.int(), weight, labels), "fmaps"),
        ((fmaps.tolist(), weight, labels), "fmaps"),
        ((fmaps, weight[:, :2], labels), "weight"),
        ((fmaps, weight[0], labels), "weight"),
        ((fmaps, weight.float(), labels), "weight"),
        ((fmaps, weight, labels.double()), "labels"),
        ((fmaps, weight, labels.bool()), "labels"),
        ((fmaps, weight, labels[:1]), "labels"),
        ((fmaps, weight, labels[:, None]), "labels"),
        ((fmaps, weight, torch.tensor([0, 3])), "labels"),
        ((fmaps, weight, torch.tensor([-1, 0])), "labels"),
        ((fmaps, weight, [0, 1]), "labels"),
    ]
    for args, name in cases:
        with pytest.raises(TypeError if isinstance(args[0], list) or isinstance(args[2], list) else ValueError,
                           match=name):
            cim_ext.cam(*args)


def test_cam_takes_any_integer_labels():
    fmaps, weight, labels = make_inputs(2, 3, 4, 5, 3)
    expected = cim_ext.cam(fmaps, weight, labels)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        torch.testing.assert_close(cim_ext.cam(fmaps, weight, labels.to(dtype)), expected, rtol=0, atol=0)


def test_cam_op_bad_input_names_argument():
    fmaps, weight, labels = make_inputs(2, 3, 4, 5, 3)
    op = torch.ops.cim_ext.cam
    cases = [
        ((fmaps[0], weight, labels, True), "fmaps"),
        ((fmaps.int(), weight, labels, True), "fmaps"),
        ((fmaps, weight[:, :2], labels, True), "weight"),
        ((fmaps, weight.float(), labels, True), "weight"),
        ((fmaps, weight, labels[:1], True), "labels"),
        ((fmaps, weight, torch.tensor([0, 3]), True), "labels"),
    ]
    for args, name in cases:
        with pytest.raises(ValueError, match=name):
            op(*args)
    grad = torch.randn(2, 4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="grad"):
        torch.ops.cim_ext._cam_backward(grad[:, :3], fmaps, weight, labels, True, True, True)
    with pytest.raises(ValueError, match="grad"):
        torch.ops.cim_ext._cam_backward(grad.float(), fmaps, weight, labels, True, True, True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(0, 3),
    channels=st.integers(0, 5),
    height=st.integers(0, 4),
    width=st.integers(0, 4),
    classes=st.integers(0, 4),
    label=st.integers(-2, 5),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64]),
    special=st.sampled_from([None, float("nan"), float("inf"), -float("inf"), 1e38]),
    normalize=st.booleans(),
    rank=st.integers(3, 5),
)
def test_cam_fuzz(batch, channels, height, width, classes, label, dtype, special, normalize, rank):
    shape = (batch, channels, height, width, 1)[:rank]
    fmaps = torch.randn(shape).to(dtype)
    if special is not None and fmaps.numel() and dtype.is_floating_point:
        fmaps.view(-1)[0] = special
    weight = torch.randn(classes, channels).to(dtype)
    labels = torch.full((batch,), label, dtype=torch.int64)
    try:
        out = cim_ext.cam(fmaps, weight, labels, normalize=normalize)
    except (ValueError, RuntimeError):
        return
    assert out.shape == (batch, height, width)
    if special is None and normalize:
        assert torch.isfinite(out).all() and (out >= 0).all() and (out <= 1).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_cam_weight_gradient_under_deterministic_algorithms(device):
    """CPU sums the weight gradient in a fixed order; CUDA adds samples that share a label with atomics, so it
    refuses to run under torch.use_deterministic_algorithms (the fmaps gradient alone is deterministic)."""
    fmaps, weight, labels = make_inputs(4, 3, 4, 5, 2, device=device)
    fmaps.requires_grad_(True)
    weight.requires_grad_(True)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.autograd.grad(cim_ext.cam(fmaps, weight, labels).sum(), fmaps)
        if device == "cuda":
            with pytest.raises(RuntimeError, match="_cam_backward"):
                torch.autograd.grad(cim_ext.cam(fmaps, weight, labels).sum(), weight)
        else:
            first = torch.autograd.grad(cim_ext.cam(fmaps, weight, labels).sum(), weight)[0]
            again = torch.autograd.grad(cim_ext.cam(fmaps, weight, labels).sum(), weight)[0]
            assert torch.equal(first, again)
    finally:
        torch.use_deterministic_algorithms(before)
