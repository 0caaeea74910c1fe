"""Fake (meta) kernels and autograd formulas of the compiled cim_ext operators.

Backward ops are private operators with their own CPU and CUDA kernels; they only compute what
``ctx.needs_input_grad`` asks for (the other output is an empty tensor). First-order gradients always run those
kernels. The backward ops carry their own autograd, so gradients of any order exist: when a graph is built through a
backward op (``create_graph=True``, as in the CIM meta-step), its derivative is the vector-Jacobian product of the
plain-PyTorch twin in :mod:`cim_ext.reference`, recomputed with autograd (exact, at reference speed).
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
def _cam_boxes_fake(cams, sizes, thresholds):
    torch._check(cams.dim() == 3, lambda: "cams: expected a 3-D tensor")
    return _boxes_fake(cams.shape[0], cams)


@_register_fake("otsu_threshold")
def _otsu_threshold_fake(cams, sizes, bins):
    torch._check(cams.dim() == 3, lambda: "cams: expected a 3-D tensor")
    return cams.new_empty(cams.shape[0])


@_register_fake("cam_to_boxes")
def _cam_to_boxes_fake(fmaps, weight, labels, sizes, thresholds, bins):
    torch._check(fmaps.dim() == 4, lambda: "fmaps: expected a 4-D tensor")
    return _boxes_fake(fmaps.shape[0], fmaps)


@_register_fake("compress")
def _compress_fake(images, boxes, ratio):
    torch._check(images.dim() == 4, lambda: "images: expected a 4-D tensor")
    return torch.empty_like(images, memory_format=torch.contiguous_format)


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


@_register_fake("rational")
def _rational_fake(x, numerator, denominator):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_register_fake("_rational_backward")
def _rational_backward_fake(grad, x, numerator, denominator, need_x, need_coefficients):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else x.new_empty(0),
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
        wanted = [i for i, flag in zip(primals, need(values)) if flag]
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
        cotangents = [g for g, flag in zip(out_grads, need(values)) if flag]
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


def _rational_reference(values):
    return reference.rational(*values[1:4])


_BACKWARD_AUTOGRAD = {
    "cam": (_cam_reference, lambda inputs: (inputs[5], inputs[6])),
    "soft_compress": (_soft_compress_reference, lambda inputs: (inputs[4], inputs[5])),
    "rational": (_rational_reference, lambda inputs: (inputs[4], inputs[5], inputs[5])),
}

for _name, _backward in (("cam", _cam_backward), ("soft_compress", _soft_compress_backward), ("rational", _rational_backward)):
    torch.library.register_autograd(_lib + _name, _backward, setup_context=_save_inputs)
    torch.library.register_autograd(
        _lib + "_" + _name + "_backward", _backward_of_backward(*_BACKWARD_AUTOGRAD[_name]), setup_context=_save_inputs
    )
