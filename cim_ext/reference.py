"""Plain-PyTorch definitions of every cim_ext operator.

These are the specification the compiled kernels are tested against: slow, per-sample where the semantics are
per-sample, built only from documented torch functions. Argument checking lives in :mod:`cim_ext.ops`; these
functions assume valid input.
"""
import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "down_size",
    "upsample",
    "down_up",
    "down_up_gather",
    "cam",
    "cam_boxes",
    "otsu_threshold",
    "cam_to_boxes",
    "compress",
    "uncompress",
    "soft_compress",
    "rational",
]


def down_size(height, width, ratio):
    """Size of the downsampled background: ``(max(1, int(H / sqrt(ratio))), max(1, int(W / sqrt(ratio))))``."""
    side = math.sqrt(ratio)
    return max(1, int(height / side)), max(1, int(width / side))


def upsample(cams, size):
    """Bilinear (align_corners=False) resize of Tensor[B, h, w] maps to ``size`` = (H, W)."""
    return F.interpolate(cams[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def down_up(images, ratio):
    """Nearest-exact down to :func:`down_size` and back up to the original size. Tensor[B, C, H, W]."""
    height, width = images.shape[-2:]
    small = F.interpolate(images, size=down_size(height, width, ratio), mode="nearest-exact")
    return F.interpolate(small, size=(height, width), mode="nearest-exact")


def _nearest_exact_source(in_size, out_size):
    """Source index of each output pixel of a nearest-exact resize, in PyTorch's float32 arithmetic:
    ``min(floor((dst + 0.5) * float(in / out)), in - 1)``."""
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    return np.minimum(np.floor((dst + np.float32(0.5)) * scale).astype(np.int64), in_size - 1)


@functools.lru_cache(maxsize=64)
def _down_up_source(height, width, ratio):
    # NumPy, not torch: this also runs inside torch.func transforms, whose tensors must not be cached.
    small_h, small_w = down_size(height, width, ratio)
    rows = _nearest_exact_source(height, small_h)[_nearest_exact_source(small_h, height)]
    cols = _nearest_exact_source(width, small_w)[_nearest_exact_source(small_w, width)]
    return (rows[:, None] * width + cols[None, :]).reshape(-1)


def down_up_gather(images, ratio):
    """:func:`down_up` on a CUDA tensor as a gather of the source pixels, with the index map of PyTorch's CUDA
    nearest-exact kernels (float32 scale for every dtype): the same values, and a gradient that is exactly the
    adjoint of the forward. PyTorch's CUDA nearest backward recomputes the map with its own float arithmetic and
    can route a gradient to a neighbour of the pixel read (pytorch/pytorch#97135); its CPU backward reuses the
    forward's map (which, on CPU, depends on the dtype), so CPU tensors keep :func:`down_up`."""
    height, width = images.shape[-2:]
    if not images.is_cuda or height * width == 0:
        return down_up(images, ratio)
    source = torch.from_numpy(_down_up_source(int(height), int(width), float(ratio))).to(images.device)
    return images.flatten(-2).index_select(-1, source).view(images.shape)


def _per_sample_sizes(sizes, batch):
    if isinstance(sizes, torch.Tensor):
        return [tuple(int(v) for v in row) for row in sizes.reshape(batch, 2).tolist()]
    return [tuple(int(v) for v in sizes)] * batch


def _per_sample_thresholds(threshold, batch, dtype):
    if isinstance(threshold, torch.Tensor):
        return threshold.to(dtype).reshape(batch)
    return torch.full((batch,), float(threshold), dtype=dtype)


def cam(fmaps, weight, labels, normalize=True):
    """Class activation maps Tensor[B, h, w] of ``fmaps`` Tensor[B, C, h, w] for class ``labels`` Tensor[B].

    With ``normalize`` each map is min-max scaled to [0, 1]; a constant map becomes all zeros.
    """
    raw = (fmaps * weight[labels][:, :, None, None]).sum(1)
    if not normalize:
        return raw
    low = raw.amin(dim=(1, 2), keepdim=True)
    span = raw.amax(dim=(1, 2), keepdim=True) - low
    positive = span > 0
    safe_span = torch.where(positive, span, torch.ones_like(span))
    return torch.where(positive, (raw - low) / safe_span, torch.zeros_like(raw))


def cam_boxes(cams, sizes, threshold):
    """Tight half-open boxes (y0, y1, x0, x1), Tensor[B, 4] int64, of ``upsample(cams[b], sizes[b]) > threshold``.

    An empty mask gives (0, 0, 0, 0). The threshold is compared in the dtype of ``cams``.
    """
    batch = cams.shape[0]
    thresholds = _per_sample_thresholds(threshold, batch, cams.dtype)
    boxes = torch.zeros(batch, 4, dtype=torch.int64)
    for b, size in enumerate(_per_sample_sizes(sizes, batch)):
        mask = upsample(cams[b : b + 1], size)[0] > thresholds[b]
        rows = mask.any(1).nonzero().flatten()
        cols = mask.any(0).nonzero().flatten()
        if rows.numel():
            boxes[b] = torch.stack([rows[0], rows[-1] + 1, cols[0], cols[-1] + 1])
    return boxes.to(cams.device)


def otsu_threshold(cams, sizes, bins=256):
    """Per-sample Otsu threshold Tensor[B] of the upsampled maps, ``(k + 1) / bins``.

    Histogram bin of value v: ``min(max(floor(v * bins), 0), bins - 1)``. k maximises the between-class variance
    of bins [0..k] vs [k+1..], evaluated as ``(S0 * N - S * n0)^2 / (n0 * n1)`` in float64 from integer bin
    sums (n0, S0: count and index-sum of bins <= k; N, S: totals; n1 = N - n0; 0 where n0 * n1 == 0);
    ties go to the smallest k.
    """
    batch = cams.shape[0]
    index = torch.arange(bins, dtype=torch.int64)
    out = torch.empty(batch, dtype=cams.dtype)
    for b, size in enumerate(_per_sample_sizes(sizes, batch)):
        up = upsample(cams[b : b + 1], size).flatten().cpu()
        bin_of = torch.floor(up * bins).clamp(0, bins - 1).to(torch.int64)
        hist = torch.bincount(bin_of, minlength=bins)
        n0 = hist.cumsum(0)
        s0 = (hist * index).cumsum(0)
        total, total_sum = n0[-1], s0[-1]
        n1 = total - n0
        num = (s0 * total - total_sum * n0).to(torch.float64)
        prod = (n0 * n1).to(torch.float64)
        var = torch.where(prod > 0, num * num / torch.where(prod > 0, prod, torch.ones_like(prod)), 0.0)
        out[b] = (int(torch.argmax(var)) + 1) / bins
    return out.to(cams.device)


def cam_to_boxes(fmaps, weight, labels, sizes, threshold, bins=256):
    """``cam_boxes(cam(fmaps, weight, labels), sizes, threshold)``; ``threshold="otsu"`` uses :func:`otsu_threshold`."""
    cams = cam(fmaps, weight, labels, normalize=True)
    if isinstance(threshold, str):
        threshold = otsu_threshold(cams, sizes, bins)
    return cam_boxes(cams, sizes, threshold)


def compress(images, boxes, ratio):
    """Images Tensor[B, C, H, W] with everything outside each box replaced by :func:`down_up`."""
    out = down_up(images, ratio).clone()
    for b, (y0, y1, x0, x1) in enumerate(boxes.tolist()):
        out[b, :, y0:y1, x0:x1] = images[b, :, y0:y1, x0:x1]
    return out


def uncompress(small, crops, boxes, height, width):
    """Rebuild Tensor[B, C, height, width] from downsampled images and the flat concatenation of box crops."""
    out = F.interpolate(small, size=(height, width), mode="nearest-exact").clone()
    channels = small.shape[1]
    offset = 0
    for b, (y0, y1, x0, x1) in enumerate(boxes.tolist()):
        count = channels * (y1 - y0) * (x1 - x0)
        out[b, :, y0:y1, x0:x1] = crops[offset : offset + count].view(channels, y1 - y0, x1 - x0)
        offset += count
    return out


def soft_compress(images, cams, ratio):
    """``up * x + (1 - up) * down_up(x)`` with ``up`` the bilinear upsampling of ``cams`` to the image size."""
    up = upsample(cams, images.shape[-2:])[:, None]
    return up * images + (1 - up) * down_up_gather(images, ratio)


def rational(x, numerator, denominator):
    """Rational activation, version A: ``(a0 + a1 x + ... + am x^m) / (1 + |b1 x| + ... + |bn x^n|)``."""
    num = torch.zeros_like(x) + numerator[-1]
    for coefficient in numerator.flip(0)[1:]:
        num = num * x + coefficient
    den = torch.ones_like(x)
    power = torch.ones_like(x)
    for coefficient in denominator:
        power = power * x
        den = den + (coefficient * power).abs()
    return num / den
