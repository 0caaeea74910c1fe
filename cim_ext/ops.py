"""Public operators of cim_ext: thin wrappers over ``torch.ops.cim_ext``.

The wrappers only turn Python-level argument forms (a size pair or a tensor, a threshold float, tensor or "otsu")
into the schemas' arguments; every tensor check (shape, dtype, device, values) is done once, in the kernels' host
code (csrc/checks.h, csrc/cam_args.h), and no wrapper waits for the device.

Box convention everywhere: int64 Tensor[B, 4] = (y0, y1, x0, x1), half-open, in pixels of the target image; an
empty mask gives (0, 0, 0, 0). Autograd and fake (meta) kernels of the compiled ops are registered in
:mod:`cim_ext._registrations`.
"""
import math
import numbers
import operator

import torch
import torch.nn.functional as F

from . import reference

__all__ = [
    "cam",
    "cam_boxes",
    "otsu_threshold",
    "cam_to_boxes",
    "compress",
    "compress_cost",
    "compress_parts",
    "uncompress",
    "soft_compress",
    "rational",
    "check_errors",
    "down_size",
]

down_size = reference.down_size

def _fail(name, expected, got):
    raise ValueError(f"{name}: expected {expected}, got {got}")


def _tensors(**named):
    """TypeError naming the first argument that is not a tensor (the dispatcher's own message prints its value)."""
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")


def _size_args(sizes):
    """``sizes`` of the box ops -> the ops' (size, sizes) pair: a shared (H, W) or a per-sample tensor [B, 2].

    Only the Python-level form is checked here; values, dtypes and shapes are checked by the kernels."""
    if isinstance(sizes, torch.Tensor):
        return None, sizes
    try:
        pair = [operator.index(v) for v in sizes]
    except TypeError:
        pair = None
    if pair is None or len(pair) != 2:
        _fail("sizes", "a pair of ints (H, W) or an integer tensor [B, 2]", repr(sizes))
    return pair, None


def _threshold_args(threshold):
    """``threshold`` of the box ops -> the ops' (threshold, thresholds) pair: a float or a per-sample tensor."""
    if isinstance(threshold, torch.Tensor):
        return 0.0, threshold
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        _fail("threshold", "a float, a float tensor [B] or 'otsu'", repr(threshold))
    return float(threshold), None


def _check_int(name, value, lowest, highest):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lowest <= value <= highest:
        _fail(name, f"an int in [{lowest}, {highest}]", repr(value))
    return int(value)


_MAX_BINS = 1 << 20  # the kernels' limit (csrc/cam_args.h): finer bins than float32 maps resolve only cost memory


def _ratio(ratio):
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        _fail("ratio", "a finite real number >= 1", repr(ratio))
    return float(ratio)


def cam(fmaps, weight, labels, normalize=True):
    """Class activation maps of the labelled classes.

    Args:
        fmaps (Tensor[B, C, h, w]): last feature maps, float.
        weight (Tensor[K, C]): classifier weight, same dtype (any float dtypes under autocast, which computes in
            float32) and device.
        labels (Tensor[B]): integer class of each sample, in [0, K).
        normalize (bool): min-max scale each map to [0, 1]; a constant map becomes all zeros.

    Returns:
        Tensor[B, h, w]: ``sum_c weight[labels[b], c] * fmaps[b, c]``. Differentiable in fmaps and weight.

    Bad labels raise ValueError; on CUDA they are found by the kernel and raised at the next cim_ext call (or
    :func:`check_errors`), so no call waits for the device.
    """
    _tensors(fmaps=fmaps, weight=weight, labels=labels)
    return torch.ops.cim_ext.cam(fmaps, weight, labels, bool(normalize))


def cam_boxes(cams, sizes, threshold):
    """Tight boxes of the thresholded, bilinearly upsampled maps, without materialising the upsampled maps.

    Args:
        cams (Tensor[B, h, w]): maps, float, no NaN.
        sizes ((H, W) or Tensor[B, 2]): target size, shared or per sample (int64).
        threshold (float or Tensor[B]): a pixel is in the mask when its upsampled value is > threshold.

    Returns:
        Tensor[B, 4] int64: (y0, y1, x0, x1), half-open; (0, 0, 0, 0) for an empty mask.
    """
    _tensors(cams=cams)
    size, per_sample = _size_args(sizes)
    value, thresholds = _threshold_args(threshold)
    return torch.ops.cim_ext.cam_boxes(cams, size, per_sample, value, thresholds)


def otsu_threshold(cams, sizes, bins=256):
    """Otsu threshold of each upsampled map over a ``bins``-bin histogram on [0, 1].

    Args:
        cams (Tensor[B, h, w]): maps in [0, 1], float, no NaN.
        sizes ((H, W) or Tensor[B, 2]): upsampling size, shared or per sample (int64).
        bins (int): histogram bins, >= 2.

    Returns:
        Tensor[B] (dtype of cams): ``(k + 1) / bins`` with k the Otsu split (see :func:`cim_ext.reference.otsu_threshold`).
    """
    _tensors(cams=cams)
    size, per_sample = _size_args(sizes)
    return torch.ops.cim_ext.otsu_threshold(cams, size, per_sample, _check_int("bins", bins, 2, _MAX_BINS))


def cam_to_boxes(fmaps, weight, labels, sizes, threshold, bins=256):
    """Normalised CAM and its tight boxes in one pass, for inference-time exemplar compression.

    Args:
        fmaps, weight, labels: as in :func:`cam`.
        sizes ((H, W) or Tensor[B, 2]): image size of each sample.
        threshold (float, Tensor[B] or "otsu"): fixed threshold(s), or per-sample Otsu thresholds.
        bins (int): histogram bins for "otsu".

    Returns:
        Tensor[B, 4] int64 boxes, equal to ``cam_boxes(cam(fmaps, weight, labels), sizes, threshold)``.
    """
    _tensors(fmaps=fmaps, weight=weight, labels=labels)
    size, per_sample = _size_args(sizes)
    if isinstance(threshold, str):
        if threshold != "otsu":
            _fail("threshold", "a float, a float tensor [B] or 'otsu'", repr(threshold))
        value, thresholds, bins = 0.0, None, _check_int("bins", bins, 2, _MAX_BINS)
    else:
        (value, thresholds), bins = _threshold_args(threshold), 0
    return torch.ops.cim_ext.cam_to_boxes(fmaps, weight, labels, size, per_sample, value, thresholds, bins)


def compress(images, boxes, ratio):
    """Compress images outside their boxes: nearest-exact down by sqrt(ratio) per side and back up.

    Args:
        images (Tensor[B, C, H, W]): uint8 or float, NCHW or channels-last.
        boxes (Tensor[B, 4] int64): (y0, y1, x0, x1) kept at full resolution, same device.
        ratio (float): >= 1; the background keeps (int(H / sqrt(ratio)), int(W / sqrt(ratio))) pixels (at least 1).

    Returns:
        Tensor[B, C, H, W]: bit-exact equal to :func:`cim_ext.reference.compress`; channels-last when ``images`` is.

    Boxes outside the image raise ValueError; on CUDA the kernel clamps them into the image and the error is raised
    at the next cim_ext call (or :func:`check_errors`), so no call waits for the device.
    """
    _tensors(images=images, boxes=boxes)
    return torch.ops.cim_ext.compress(images, boxes, _ratio(ratio))


def _check_cost_ratio(ratio):
    ratio = _ratio(ratio)
    if not math.isfinite(ratio) or ratio < 1:
        _fail("ratio", "a finite real number >= 1", repr(ratio))
    return ratio


def compress_cost(boxes, sizes, ratio):
    """Memory cost of compressed exemplars in image units: ``A + (1 - A) / ratio``, A = box area / image area.

    Args:
        boxes (Tensor[B, 4] int64): exemplar boxes, inside their images (checked on the CPU; on a GPU reading them
            would wait for the device, so there :func:`compress` and :func:`compress_parts` check them).
        sizes ((H, W) or Tensor[B, 2]): image size of each exemplar (a tensor on the device of boxes).
        ratio (float): compression ratio, >= 1.

    Returns:
        Tensor[B] float64.
    """
    _tensors(boxes=boxes)
    ratio = _check_cost_ratio(ratio)
    if boxes.dtype != torch.int64 or boxes.dim() != 2 or boxes.shape[1] != 4:
        _fail("boxes", "an int64 tensor of shape (B, 4)", f"{boxes.dtype} {tuple(boxes.shape)}")
    size, per_sample = _size_args(sizes)
    if per_sample is None:
        image_area = float(size[0] * size[1])
    else:
        image_area = (per_sample[:, 0] * per_sample[:, 1]).to(torch.float64)
    fraction = ((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])).to(torch.float64) / image_area
    checkable = boxes.device.type == "cpu" and not torch.compiler.is_compiling()  # no device wait, no graph break
    if checkable and bool(((fraction < 0) | (fraction > 1)).any()):
        _fail("boxes", "boxes inside their images (area fraction in [0, 1])", fraction.tolist())
    return fraction + (1 - fraction) / ratio


def compress_parts(images, boxes, ratio):
    """Split images into what a compressed exemplar stores: the downsampled image and the full-resolution crop.

    Args:
        images (Tensor[B, C, H, W]): uint8 or float.
        boxes (Tensor[B, 4] int64): (y0, y1, x0, x1).
        ratio (float): >= 1.

    Returns:
        (Tensor[B, C, h, w], Tensor[N]): ``small`` of size :func:`down_size` and the flattened crops concatenated
        in batch order; :func:`uncompress` of them equals :func:`compress` of the images.

    The size of the crops depends on the box values, so on CUDA this waits for the device once (the crops are one
    masked select). As :func:`compress`, CUDA takes boxes outside the image as clamped into it.
    """
    _tensors(images=images, boxes=boxes)
    ratio = _ratio(ratio)
    # compress's own argument checks, run on no pixels: a zero-channel view of the images.
    torch.ops.cim_ext.compress(images[:, :0] if images.dim() == 4 else images, boxes, ratio)
    small = F.interpolate(images, size=down_size(images.shape[2], images.shape[3], ratio), mode="nearest-exact")
    # Row-major order of [B, C, H, W] visits sample b's crop as C x (y1 - y0) x (x1 - x0), then sample b + 1's.
    rows = torch.arange(images.shape[2], device=images.device)
    cols = torch.arange(images.shape[3], device=images.device)
    in_rows = (boxes[:, :1] <= rows) & (rows < boxes[:, 1:2])
    in_cols = (boxes[:, 2:3] <= cols) & (cols < boxes[:, 3:4])
    return small, images.masked_select(in_rows[:, None, :, None] & in_cols[:, None, None, :])


def uncompress(small, crops, boxes, size):
    """Rebuild images from stored compressed exemplars.

    Args:
        small (Tensor[B, C, h, w]): downsampled images (uint8 or float).
        crops (Tensor[N] or list of Tensor[C, bh, bw]): full-resolution box crops, flattened and concatenated in
            batch order (sample b contributes C * (y1 - y0) * (x1 - x0) values), same dtype as small.
        boxes (Tensor[B, 4] int64): (y0, y1, x0, x1) in the rebuilt image.
        size ((H, W)): size of the rebuilt images.

    Returns:
        Tensor[B, C, H, W]: nearest-exact upsampling of small with each crop pasted into its box.

    Bad boxes and a wrong number of crop values raise ValueError; on CUDA the kernel clamps boxes, stays inside
    ``crops``, and the error is raised at the next cim_ext call (or :func:`check_errors`).
    """
    _tensors(small=small, boxes=boxes)
    if isinstance(crops, (list, tuple)):
        crops = torch.cat([c.reshape(-1) for c in crops]) if crops else small.new_empty(0)
    _tensors(crops=crops)
    try:
        height, width = (operator.index(v) for v in size)
    except (TypeError, ValueError):
        _fail("size", "a pair of ints (H, W)", repr(size))
    return torch.ops.cim_ext.uncompress(small, crops.reshape(-1), boxes, height, width)


def soft_compress(images, cams, ratio):
    """Differentiable soft compression: ``up * x + (1 - up) * down_up(x)``, up = bilinear(cams -> (H, W)).

    Args:
        images (Tensor[B, C, H, W]): float.
        cams (Tensor[B, h, w]): maps in [0, 1], same dtype (any float dtypes under autocast, which computes in
            float32) and device.
        ratio (float): >= 1.

    Returns:
        Tensor[B, C, H, W]. Differentiable (to any order) in images and cams.
    """
    _tensors(images=images, cams=cams)
    return torch.ops.cim_ext.soft_compress(images, cams, _ratio(ratio))


def check_errors():
    """Wait for the device and raise the first bad argument value a CUDA kernel met since the last report.

    CUDA kernels check values (labels, sizes, boxes) themselves instead of making the host wait before each launch;
    an error surfaces as a ValueError at the next cim_ext call on CUDA, or here. A no-op without CUDA.
    """
    torch.ops.cim_ext._raise_deferred_errors(True)


def rational(x, numerator, denominator):
    """Rational (Padé) activation, version A: ``P(x) / (1 + |b1 x| + ... + |bn x^n|)``, elementwise.

    Args:
        x (Tensor[...]): float32, float64, float16 or bfloat16 (half types are computed in float32), any layout.
        numerator (Tensor[m + 1]): a0..am (1 to 16 coefficients), any float dtype, on x's device.
        denominator (Tensor[n]): b1..bn (1 to 16 coefficients), any float dtype, on x's device.

    Returns:
        Tensor like x (``torch.empty_like(x)``: same dtype, and same strides for a dense layout such as
        channels_last). Computed with the coefficients cast to float64 for float64 x, else float32. Differentiable in
        x and both coefficient vectors. Bad arguments raise ValueError naming the argument (checked in the kernels).
    """
    _tensors(x=x, numerator=numerator, denominator=denominator)
    return torch.ops.cim_ext.rational(x, numerator, denominator)
