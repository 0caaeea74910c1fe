"""Public operators of cim_ext: argument checking, then ``torch.ops.cim_ext``.

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
    "down_size",
]

down_size = reference.down_size

_CPU_FLOATS = (torch.float32, torch.float64)
_CUDA_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _fail(name, expected, got):
    raise ValueError(f"{name}: expected {expected}, got {got}")


def _check_float(name, tensor, ndim=None, *, autocast=False):
    """A float tensor of a dtype the kernels take; with ``autocast`` (ops with an autocast kernel) also half
    precision while autocast is on for its device, since the op then runs in float32."""
    if not isinstance(tensor, torch.Tensor):
        _fail(name, "a torch.Tensor", type(tensor).__name__)
    allowed = _CUDA_FLOATS if tensor.is_cuda else _CPU_FLOATS
    if autocast and torch.is_autocast_enabled(tensor.device.type):
        allowed = tuple(dict.fromkeys(allowed + (torch.float16, torch.bfloat16)))
    if tensor.dtype not in allowed:
        _fail(name, f"dtype in {[str(d) for d in allowed]} on {tensor.device.type}", tensor.dtype)
    if ndim is not None and tensor.dim() != ndim:
        _fail(name, f"a {ndim}-D tensor", f"shape {tuple(tensor.shape)}")


def _check_same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {', '.join(f'{n} on {d}' for n, d in devices.items())}")


def _check_no_nan(name, tensor):
    if tensor.numel() and bool(torch.isnan(tensor).any()):
        raise ValueError(f"{name}: contains NaN")


def _check_ratio(ratio):
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not math.isfinite(ratio) or ratio < 1:
        _fail("ratio", "a finite real number >= 1", repr(ratio))
    return float(ratio)


def _check_labels(labels, batch, classes, device):
    if not isinstance(labels, torch.Tensor):
        _fail("labels", "a torch.Tensor of integer class indices", type(labels).__name__)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        _fail("labels", "an integer tensor", labels.dtype)
    if labels.shape != (batch,):
        _fail("labels", f"shape ({batch},) (one label per sample)", f"shape {tuple(labels.shape)}")
    if labels.device != device:
        _fail("labels", f"a tensor on {device} like fmaps", labels.device)
    if batch and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        _fail("labels", f"values in [0, {classes}) (rows of weight)", f"range [{int(labels.min())}, {int(labels.max())}]")
    return labels.to(torch.int64)


def _autocast_float32(*tensors):
    """Whether autocast is on for the tensors' device with none of them float64: the ops' autocast kernels then run
    them in float32 (like torchvision's roi_align), so mixed floating dtypes are fine."""
    return (torch.is_autocast_enabled(tensors[0].device.type)
            and all(t.dtype != torch.float64 for t in tensors))


def _check_cam_inputs(fmaps, weight, labels):
    _check_float("fmaps", fmaps, 4, autocast=True)
    _check_float("weight", weight, 2, autocast=True)
    _check_same_device(fmaps=fmaps, weight=weight)
    if weight.dtype != fmaps.dtype and not _autocast_float32(fmaps, weight):
        _fail("weight", f"dtype {fmaps.dtype} like fmaps (or both cast by autocast)", weight.dtype)
    if weight.shape[1] != fmaps.shape[1]:
        _fail("weight", f"shape [K, {fmaps.shape[1]}] (C of fmaps)", f"shape {tuple(weight.shape)}")
    return _check_labels(labels, fmaps.shape[0], weight.shape[0], fmaps.device)


def _sizes_tensor(sizes, batch, device):
    """(H, W) or Tensor[B, 2] -> int64 Tensor[B, 2] on ``device``, checked positive."""
    if isinstance(sizes, torch.Tensor):
        if sizes.dtype.is_floating_point or sizes.dtype == torch.bool or sizes.shape != (batch, 2):
            _fail("sizes", f"an integer tensor of shape ({batch}, 2) or a pair (H, W)", f"{sizes.dtype} {tuple(sizes.shape)}")
        out = sizes.to(device=device, dtype=torch.int64)
    else:
        try:
            pair = [_as_int(v) for v in sizes]
        except TypeError:
            pair = None
        if pair is None or len(pair) != 2:
            _fail("sizes", "a pair of ints (H, W) or an integer tensor [B, 2]", repr(sizes))
        out = torch.tensor([pair], dtype=torch.int64, device=device).expand(batch, 2).contiguous()
    if batch and int(out.min()) < 1:
        _fail("sizes", "positive heights and widths", f"minimum {int(out.min())}")
    return out


def _as_int(value):
    """``int(value)`` for genuine integers (Python ints or 0-d integer tensors); TypeError otherwise."""
    if isinstance(value, torch.Tensor):
        if value.dim() or value.dtype.is_floating_point:
            raise TypeError("not an integer")
        return int(value)
    return operator.index(value)


def _thresholds_tensor(threshold, batch, dtype, device):
    if isinstance(threshold, torch.Tensor):
        if not threshold.dtype.is_floating_point or threshold.shape not in ((batch,), ()):
            _fail("threshold", f"a float or a float tensor of shape ({batch},)", f"{threshold.dtype} {tuple(threshold.shape)}")
        _check_no_nan("threshold", threshold)
        return threshold.to(device=device, dtype=dtype).expand(batch).contiguous()
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or math.isnan(threshold):
        _fail("threshold", "a float, a float tensor [B] or 'otsu'", repr(threshold))
    return torch.full((batch,), float(threshold), dtype=dtype, device=device)


_MAX_BINS = 1 << 20  # the kernels' limit: finer bins than float32 maps can resolve would only cost memory


def _check_bins(bins):
    if isinstance(bins, bool) or not isinstance(bins, numbers.Integral) or not 2 <= bins <= _MAX_BINS:
        _fail("bins", f"an int in [2, {_MAX_BINS}]", repr(bins))
    return int(bins)


def _check_cams(cams, batch=None, *, autocast=False):
    _check_float("cams", cams, 3, autocast=autocast)
    if batch is not None and cams.shape[0] != batch:
        _fail("cams", f"batch size {batch} like images", cams.shape[0])
    if cams.shape[1] < 1 or cams.shape[2] < 1:
        _fail("cams", "maps of at least 1x1", f"shape {tuple(cams.shape)}")
    _check_no_nan("cams", cams)


def _check_images(images, allow_uint8, *, autocast=False):
    if not isinstance(images, torch.Tensor):
        _fail("images", "a torch.Tensor", type(images).__name__)
    if not (allow_uint8 and images.dtype == torch.uint8):
        _check_float("images", images, autocast=autocast)
    if images.dim() != 4:
        _fail("images", "a 4-D tensor [B, C, H, W]", f"shape {tuple(images.shape)}")


def _check_boxes(boxes, batch, height, width, device):
    if not isinstance(boxes, torch.Tensor) or boxes.dtype != torch.int64 or boxes.shape != (batch, 4):
        got = f"{boxes.dtype} {tuple(boxes.shape)}" if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        _fail("boxes", f"an int64 tensor of shape ({batch}, 4) = (y0, y1, x0, x1)", got)
    if boxes.device != device:
        _fail("boxes", f"a tensor on {device} like images", boxes.device)
    if batch:
        y0, y1, x0, x1 = boxes.unbind(1)
        bad = (y0 < 0) | (y1 < y0) | (y1 > height) | (x0 < 0) | (x1 < x0) | (x1 > width)
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            _fail("boxes", f"0 <= y0 <= y1 <= {height} and 0 <= x0 <= x1 <= {width}", f"{boxes[row].tolist()} at row {row}")


def cam(fmaps, weight, labels, normalize=True):
    """Class activation maps of the labelled classes.

    Args:
        fmaps (Tensor[B, C, h, w]): last feature maps, float.
        weight (Tensor[K, C]): classifier weight, same dtype and device.
        labels (Tensor[B]): integer class of each sample, in [0, K).
        normalize (bool): min-max scale each map to [0, 1]; a constant map becomes all zeros.

    Returns:
        Tensor[B, h, w]: ``sum_c weight[labels[b], c] * fmaps[b, c]``. Differentiable in fmaps and weight.
    """
    labels = _check_cam_inputs(fmaps, weight, labels)
    return torch.ops.cim_ext.cam(fmaps, weight, labels, bool(normalize))


def cam_boxes(cams, sizes, threshold):
    """Tight boxes of the thresholded, bilinearly upsampled maps, without materialising the upsampled maps.

    Args:
        cams (Tensor[B, h, w]): maps, float, no NaN.
        sizes ((H, W) or Tensor[B, 2]): target size, shared or per sample.
        threshold (float or Tensor[B]): a pixel is in the mask when its upsampled value is > threshold.

    Returns:
        Tensor[B, 4] int64: (y0, y1, x0, x1), half-open; (0, 0, 0, 0) for an empty mask.
    """
    _check_cams(cams)
    batch = cams.shape[0]
    sizes = _sizes_tensor(sizes, batch, cams.device)
    thresholds = _thresholds_tensor(threshold, batch, cams.dtype, cams.device)
    return torch.ops.cim_ext.cam_boxes(cams, sizes, thresholds)


def otsu_threshold(cams, sizes, bins=256):
    """Otsu threshold of each upsampled map over a ``bins``-bin histogram on [0, 1].

    Args:
        cams (Tensor[B, h, w]): maps in [0, 1], float, no NaN.
        sizes ((H, W) or Tensor[B, 2]): upsampling size, shared or per sample.
        bins (int): histogram bins, >= 2.

    Returns:
        Tensor[B] (dtype of cams): ``(k + 1) / bins`` with k the Otsu split (see :func:`cim_ext.reference.otsu_threshold`).
    """
    _check_cams(cams)
    sizes = _sizes_tensor(sizes, cams.shape[0], cams.device)
    return torch.ops.cim_ext.otsu_threshold(cams, sizes, _check_bins(bins))


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
    labels = _check_cam_inputs(fmaps, weight, labels)
    batch = fmaps.shape[0]
    if fmaps.shape[2] < 1 or fmaps.shape[3] < 1:
        _fail("fmaps", "maps of at least 1x1", f"shape {tuple(fmaps.shape)}")
    sizes = _sizes_tensor(sizes, batch, fmaps.device)
    if isinstance(threshold, str):
        if threshold != "otsu":
            _fail("threshold", "a float, a float tensor [B] or 'otsu'", repr(threshold))
        thresholds = fmaps.new_zeros(batch)
        bins = _check_bins(bins)
    else:
        dtype = torch.float32 if _autocast_float32(fmaps, weight) else fmaps.dtype
        thresholds = _thresholds_tensor(threshold, batch, dtype, fmaps.device)
        bins = 0
    return torch.ops.cim_ext.cam_to_boxes(fmaps, weight, labels, sizes, thresholds, bins)


def compress(images, boxes, ratio):
    """Compress images outside their boxes: nearest-exact down by sqrt(ratio) per side and back up.

    Args:
        images (Tensor[B, C, H, W]): uint8 or float.
        boxes (Tensor[B, 4] int64): (y0, y1, x0, x1) kept at full resolution.
        ratio (float): >= 1; the background keeps (int(H / sqrt(ratio)), int(W / sqrt(ratio))) pixels (at least 1).

    Returns:
        Tensor[B, C, H, W]: bit-exact equal to :func:`cim_ext.reference.compress`.
    """
    _check_images(images, allow_uint8=True)
    ratio = _check_ratio(ratio)
    _check_boxes(boxes, images.shape[0], images.shape[2], images.shape[3], images.device)
    return torch.ops.cim_ext.compress(images, boxes, ratio)


def compress_cost(boxes, sizes, ratio):
    """Memory cost of compressed exemplars in image units: ``A + (1 - A) / ratio``, A = box area / image area.

    Args:
        boxes (Tensor[B, 4] int64): exemplar boxes.
        sizes ((H, W) or Tensor[B, 2]): image size of each exemplar.
        ratio (float): compression ratio, >= 1.

    Returns:
        Tensor[B] float64.
    """
    ratio = _check_ratio(ratio)
    if not isinstance(boxes, torch.Tensor) or boxes.dtype != torch.int64 or boxes.dim() != 2 or boxes.shape[1] != 4:
        _fail("boxes", "an int64 tensor of shape (B, 4)", getattr(boxes, "shape", type(boxes).__name__))
    sizes = _sizes_tensor(sizes, boxes.shape[0], boxes.device).to(torch.float64)
    area = ((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])).to(torch.float64)
    fraction = area / (sizes[:, 0] * sizes[:, 1])
    if boxes.shape[0] and bool(((fraction < 0) | (fraction > 1)).any()):
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
    """
    _check_images(images, allow_uint8=True)
    ratio = _check_ratio(ratio)
    _check_boxes(boxes, images.shape[0], images.shape[2], images.shape[3], images.device)
    small = F.interpolate(images, size=down_size(images.shape[2], images.shape[3], ratio), mode="nearest-exact")
    crops = [images[b, :, y0:y1, x0:x1].reshape(-1) for b, (y0, y1, x0, x1) in enumerate(boxes.tolist())]
    flat = torch.cat(crops) if crops else images.new_empty(0)
    return small, flat


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
    """
    _check_images(small, allow_uint8=True)
    if isinstance(crops, (list, tuple)):
        crops = torch.cat([c.reshape(-1) for c in crops]) if crops else small.new_empty(0)
    if not isinstance(crops, torch.Tensor) or crops.dtype != small.dtype or crops.device != small.device:
        _fail("crops", f"a {small.dtype} tensor on {small.device} like small", getattr(crops, "dtype", type(crops).__name__))
    height, width = _sizes_tensor(size, 1, torch.device("cpu"))[0].tolist()
    _check_boxes(boxes, small.shape[0], height, width, small.device)
    needed = int(((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])).sum()) * small.shape[1]
    if crops.numel() != needed:
        _fail("crops", f"{needed} values (C * box area summed over the batch)", crops.numel())
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
    _check_images(images, allow_uint8=False, autocast=True)
    _check_cams(cams, images.shape[0], autocast=True)
    _check_same_device(images=images, cams=cams)
    if cams.dtype != images.dtype and not _autocast_float32(images, cams):
        _fail("cams", f"dtype {images.dtype} like images (or both cast by autocast)", cams.dtype)
    return torch.ops.cim_ext.soft_compress(images, cams, _check_ratio(ratio))


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
    return torch.ops.cim_ext.rational(x, numerator, denominator)
