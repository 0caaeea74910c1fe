"""Fake (meta) kernels and autograd formulas of the compiled cim_ext operators.

Backward ops are private operators with their own CPU and CUDA kernels; they only compute what
``ctx.needs_input_grad`` asks for (the other output is an empty tensor). First-order gradients always run those
kernels. The backward ops carry their own autograd, so gradients of any order exist: when a graph is built through a
backward op (``create_graph=True``, as in the CIM meta-step), its derivative is, for ``rational``, an analytic formula
in plain torch ops (:func:`_rational_backward_backward`) and, for ``cam`` and ``soft_compress``, the vector-Jacobian
product of their plain-PyTorch twins in :mod:`cim_ext.reference` taken with ``torch.func.vjp``.
"""
import torch

from . import reference

_lib = "cim_ext::"


def _register_fake(name):
    return torch.library.register_fake(_lib + name)


@_register_fake("cam")
def _cam_fake(fmaps, weight, labels, normalize):
    torch._check(fmaps.dim() == 4, lambda: "fmaps: expected a 4-D tensor")
    torch._check(weight.dim() == 2 and weight.shape[1] == fmaps.shape[1], lambda: "weight: expected [K, C]")
    torch._check(labels.shape == (fmaps.shape[0],), lambda: "labels: expected [B]")
    return fmaps.new_empty(fmaps.shape[0], fmaps.shape[2], fmaps.shape[3])


@_register_fake("_cam_backward")
def _cam_backward_fake(grad, fmaps, weight, labels, normalize, need_fmaps, need_weight):
    return (
        fmaps.new_empty(fmaps.shape) if need_fmaps else fmaps.new_empty(0),
        weight.new_empty(weight.shape) if need_weight else weight.new_empty(0),
    )


def _boxes_fake(batch, like):
    return like.new_empty(batch, 4, dtype=torch.int64)


@_register_fake("cam_boxes")
def _cam_boxes_fake(cams, size, sizes, threshold, thresholds):
    torch._check(cams.dim() == 3, lambda: "cams: expected a 3-D tensor")
    return _boxes_fake(cams.shape[0], cams)


@_register_fake("otsu_threshold")
def _otsu_threshold_fake(cams, size, sizes, bins):
    torch._check(cams.dim() == 3, lambda: "cams: expected a 3-D tensor")
    return cams.new_empty(cams.shape[0])


@_register_fake("cam_to_boxes")
def _cam_to_boxes_fake(fmaps, weight, labels, size, sizes, threshold, thresholds, bins):
    torch._check(fmaps.dim() == 4, lambda: "fmaps: expected a 4-D tensor")
    return _boxes_fake(fmaps.shape[0], fmaps)


@_register_fake("compress")
def _compress_fake(images, boxes, ratio):
    torch._check(images.dim() == 4, lambda: "images: expected a 4-D tensor")
    # As the kernels (compress_output_format): a channels-last input is read in place and keeps its layout.
    channels_last = not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last)
    return torch.empty_like(images, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@_register_fake("uncompress")
def _uncompress_fake(small, crops, boxes, height, width):
    torch._check(small.dim() == 4, lambda: "small: expected a 4-D tensor")
    return small.new_empty(small.shape[0], small.shape[1], height, width)


@_register_fake("soft_compress")
def _soft_compress_fake(images, cams, ratio):
    torch._check(images.dim() == 4, lambda: "images: expected a 4-D tensor")
    torch._check(cams.dim() == 3 and cams.shape[0] == images.shape[0], lambda: "cams: expected [B, h, w]")
    return torch.empty_like(images, memory_format=torch.contiguous_format)


@_register_fake("_soft_compress_backward")
def _soft_compress_backward_fake(grad, images, cams, ratio, need_images, need_cams):
    return (
        torch.empty_like(images, memory_format=torch.contiguous_format) if need_images else images.new_empty(0),
        torch.empty_like(cams, memory_format=torch.contiguous_format) if need_cams else cams.new_empty(0),
    )


# The rational kernels walk a dense x in storage order and return its layout; any other x is first copied into
# torch.empty_like(x): either way the output has the strides of torch.empty_like(x).
@_register_fake("rational")
def _rational_fake(x, numerator, denominator):
    return torch.empty_like(x)


@_register_fake("_rational_backward")
def _rational_backward_fake(grad, x, numerator, denominator, need_x, need_coefficients):
    return (
        torch.empty_like(x) if need_x else x.new_empty(0),
        numerator.new_empty(numerator.shape) if need_coefficients else numerator.new_empty(0),
        denominator.new_empty(denominator.shape) if need_coefficients else denominator.new_empty(0),
    )


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*[t if isinstance(t, torch.Tensor) else None for t in inputs])
    ctx.scalars = [None if isinstance(t, torch.Tensor) else t for t in inputs]


def _saved_inputs(ctx):
    """The op's inputs as :func:`_save_inputs` kept them, tensors and scalars in their places."""
    return [s if t is None else t for t, s in zip(ctx.saved_tensors, ctx.scalars)]


def _cam_backward(ctx, grad):
    fmaps, weight, labels, _ = ctx.saved_tensors
    normalize = ctx.scalars[3]
    need_fmaps, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_fmaps, grad_weight = torch.ops.cim_ext._cam_backward(
        grad, fmaps, weight, labels, normalize, need_fmaps, need_weight
    )
    return (grad_fmaps if need_fmaps else None, grad_weight if need_weight else None, None, None)


def _soft_compress_backward(ctx, grad):
    images, cams, _ = ctx.saved_tensors
    ratio = ctx.scalars[2]
    need_images, need_cams = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_images, grad_cams = torch.ops.cim_ext._soft_compress_backward(
        grad, images, cams, ratio, need_images, need_cams
    )
    return (grad_images if need_images else None, grad_cams if need_cams else None, None)


def _rational_backward(ctx, grad):
    x, numerator, denominator = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    need_coefficients = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    grad_x, grad_numerator, grad_denominator = torch.ops.cim_ext._rational_backward(
        grad, x, numerator, denominator, need_x, need_coefficients
    )
    return (
        grad_x if need_x else None,
        grad_numerator if ctx.needs_input_grad[1] else None,
        grad_denominator if ctx.needs_input_grad[2] else None,
    )


def _promoted(tensor):
    """float16/bfloat16 -> float32 (the kernels compute half inputs in float32); other dtypes unchanged."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _backward_of_backward(reference_fn, need):
    """Autograd formula of a backward op ``(grad, *primals, *scalars) -> grads of the primals``.

    ``reference_fn(values)`` is the op's forward from :mod:`cim_ext.reference` on the backward op's argument list
    (values[1:] are the forward's arguments); ``need(values)`` says which primal gradients the backward op computed.
    The backward op is the vector-Jacobian product of that forward, so its own derivative is the VJP of a VJP, taken
    with ``torch.func.vjp``: partial derivatives even where a primal depends on another one (a chain of rational
    activations sharing coefficients), and connected to the caller's graph when it builds one (third order).
    """

    def backward(ctx, *out_grads):
        values = _saved_inputs(ctx)
        primals = [i for i, v in enumerate(values) if i > 0 and isinstance(v, torch.Tensor) and v.is_floating_point()]
        flags = need(values)
        wanted = [i for i, flag in zip(primals, flags) if flag]
        varied = [0] + [i for i in primals if i in wanted or ctx.needs_input_grad[i]]

        def first_order(*tensors):
            local = list(values)
            for i, t in zip(varied, tensors):
                local[i] = _promoted(t)

            def forward(*wanted_tensors):
                for i, t in zip(wanted, wanted_tensors):
                    local[i] = t
                return reference_fn(local)

            out, pullback = torch.func.vjp(forward, *[local[i] for i in wanted])
            return pullback(local[0].to(out.dtype))

        computed, pullback = torch.func.vjp(first_order, *[values[i] for i in varied])
        cotangents = [g for g, flag in zip(out_grads, flags) if flag]
        cotangents = tuple(torch.zeros_like(c) if g is None else g.to(c.dtype) for c, g in zip(computed, cotangents))
        by_slot = dict(zip(varied, pullback(cotangents)))
        return tuple(
            by_slot[i].to(v.dtype) if ctx.needs_input_grad[i] and i in by_slot else None for i, v in enumerate(values)
        )

    return backward


def _cam_reference(values):
    return reference.cam(*values[1:5])


def _soft_compress_reference(values):
    return reference.soft_compress(*values[1:4])


def _polynomial(coefficients, powers, order=0):
    """``sum_j c_j d^order/dx^order x^j`` from ``powers[k] = x^k`` (coefficients c_0..c_m)."""
    total = torch.zeros_like(powers[0])
    for j in range(order, coefficients.numel()):
        factor = 1
        for step in range(order):
            factor *= j - step
        total = total + (coefficients[j] * factor) * powers[j - order]
    return total


def _rational_backward_backward(ctx, bar_x, bar_numerator, bar_denominator):
    """Analytic derivative of ``_rational_backward``: with R = P / Q, Q = 1 + sum_k |b_k x^k| and the cotangents
    u (of grad_x), alpha (of grad_numerator) and beta (of grad_denominator), the backward's outputs contract to
    ``sum g * (u R' + A / Q - P B / Q^2)``, A = sum_j alpha_j x^j, B = sum_k beta_k s_k x^k, s_k = sign(b_k x^k);
    this differentiates that expression in g, x, a and b. Plain torch ops, so higher orders follow by autograd.
    Half inputs are evaluated in float32 like the kernels."""
    grad, x, numerator, denominator, need_x, need_coefficients = _saved_inputs(ctx)
    g, x = _promoted(grad), _promoted(x)
    u = bar_x if need_x and bar_x is not None else None
    alpha = bar_numerator if need_coefficients and bar_numerator is not None else None
    beta = bar_denominator if need_coefficients and bar_denominator is not None else None
    degree = max(numerator.numel(), denominator.numel() + 1)
    powers = [torch.ones_like(x)]
    for _ in range(degree):
        powers.append(powers[-1] * x)
    signed = torch.cat([denominator.new_zeros(1), denominator])  # b_0 = 0: Q - 1 as a polynomial in |.|
    signs = [torch.sign(signed[k] * powers[k]) for k in range(signed.numel())]
    sb = [signs[k] * signed[k] for k in range(signed.numel())]  # s_k b_k, per element
    P, P1, P2 = (_polynomial(numerator, powers, order) for order in range(3))
    Q = 1 + sum(sb[k] * powers[k] for k in range(1, signed.numel()))
    Q1 = sum(sb[k] * k * powers[k - 1] for k in range(1, signed.numel()))
    Q2 = sum(sb[k] * (k * (k - 1)) * powers[k - 2] for k in range(2, signed.numel())) if signed.numel() > 2 else 0
    zero = torch.zeros_like(x)
    u = zero if u is None else _promoted(u).to(x.dtype)
    A = zero if alpha is None else _polynomial(alpha.to(x.dtype), powers)
    A1 = zero if alpha is None else _polynomial(alpha.to(x.dtype), powers, 1)
    if beta is None:
        B = B1 = zero
    else:
        beta = torch.cat([beta.new_zeros(1), beta.to(x.dtype)])
        B = sum(signs[k] * beta[k] * powers[k] for k in range(1, beta.numel()))
        B1 = sum(signs[k] * beta[k] * k * powers[k - 1] for k in range(1, beta.numel()))
    inv = 1 / Q
    inv2 = inv * inv
    R1 = P1 * inv - P * Q1 * inv2
    R2 = P2 * inv - (2 * P1 * Q1 + P * Q2) * inv2 + 2 * P * Q1 * Q1 * inv2 * inv
    results = [None] * 6
    needs = ctx.needs_input_grad
    if needs[0]:
        results[0] = (u * R1 + A * inv - P * B * inv2).to(grad.dtype)
    if needs[1]:
        dx = u * R2 + A1 * inv - A * Q1 * inv2 - (P1 * B + P * B1) * inv2 + 2 * P * B * Q1 * inv2 * inv
        results[1] = (g * dx).to(ctx.saved_tensors[1].dtype)
    if needs[2]:
        c1, c2 = g * u * inv, -g * (u * Q1 + B) * inv2
        results[2] = torch.stack([
            (c2 * powers[j]).sum() + ((c1 * (j * powers[j - 1])).sum() if j else 0)
            for j in range(numerator.numel())
        ]).to(numerator.dtype)
    if needs[3]:
        d1 = -g * (u * P1 + A) * inv2 + 2 * g * P * (u * Q1 + B) * inv2 * inv
        d2 = -g * u * P * inv2
        results[3] = torch.stack([
            (signs[k] * (powers[k] * d1 + k * powers[k - 1] * d2)).sum() for k in range(1, signed.numel())
        ]).to(denominator.dtype)
    return tuple(results)


_BACKWARD_AUTOGRAD = {
    "cam": _backward_of_backward(_cam_reference, lambda inputs: (inputs[5], inputs[6])),
    "soft_compress": _backward_of_backward(_soft_compress_reference, lambda inputs: (inputs[4], inputs[5])),
    "rational": _rational_backward_backward,
}

# Under autocast, cam, cam_to_boxes and soft_compress compute in float32 (as torchvision's roi_align): their
# half-precision inputs (bf16 feature maps beside an fp32 classifier weight) are cast up, float64 is left alone.
for _name in ("cam", "cam_to_boxes", "soft_compress"):
    for _device in ("cpu", "cuda"):
        torch.library.register_autocast(_lib + _name, _device, torch.float32)

for _name, _backward in (("cam", _cam_backward), ("soft_compress", _soft_compress_backward), ("rational", _rational_backward)):
    torch.library.register_autograd(_lib + _name, _backward, setup_context=_save_inputs)
    torch.library.register_autograd(_lib + "_" + _name + "_backward", _BACKWARD_AUTOGRAD[_name], setup_context=_save_inputs)
