"""Fake (meta) kernels and autograd formulas of the compiled cim_ext operators.

Backward ops are private operators with their own CPU and CUDA kernels; they only compute what
``ctx.needs_input_grad`` asks for (the other output is an empty tensor). Double backward is not supported and
raises a clear error.
"""
import torch

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


def _no_double_backward(op):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"double backward through cim_ext.{op} is not supported: its backward is a compiled kernel "
            "without a derivative. Detach its inputs where second-order terms are not needed."
        )

    return backward


for _name, _backward in (("cam", _cam_backward), ("soft_compress", _soft_compress_backward), ("rational", _rational_backward)):
    torch.library.register_autograd(_lib + _name, _backward, setup_context=_save_inputs)
    torch.library.register_autograd(
        _lib + "_" + _name + "_backward", _no_double_backward(_name), setup_context=lambda ctx, inputs, output: None
    )
