"""The original implementation's per-image paths (github xfflzl/CIM-CIL), rewritten as baselines for the benchmarks.

The original resizes each CAM to its image's size with an image library, thresholds it, takes the tight box of the
mask, and compresses by resizing the PIL image down and up with NEAREST and pasting the box crop back, one image at
a time. Its rational activation stacks the powers of x and sums absolute values for the denominator.
"""
import numpy as np
import torch
from PIL import Image

from cim_ext.reference import down_size


def cam_box_per_image(cam_map, height, width, threshold):
    """One normalised CAM (numpy [h, w]) -> box (y0, y1, x0, x1) at (height, width), via a PIL bilinear resize."""
    up = np.asarray(Image.fromarray(cam_map.astype(np.float32), mode="F").resize((width, height), Image.BILINEAR))
    mask = up > threshold
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return 0, 0, 0, 0
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def compress_per_image(image, box, ratio):
    """One PIL image, compressed outside ``box`` by a NEAREST resize down and up, the box crop pasted back."""
    width, height = image.size
    small_h, small_w = down_size(height, width, ratio)
    out = image.resize((small_w, small_h), Image.NEAREST).resize((width, height), Image.NEAREST)
    y0, y1, x0, x1 = box
    if y1 > y0 and x1 > x0:
        out.paste(image.crop((x0, y0, x1, y1)), (x0, y0))
    return out


def cam_pipeline_per_image(fmaps, weight, labels, images, threshold, ratio):
    """The original's inference-time exemplar compression: CAM, box, compression, one image at a time.

    Args: fmaps Tensor[B, C, h, w] float, weight Tensor[K, C], labels Tensor[B], images list of PIL images.
    Returns: list of compressed PIL images.
    """
    maps = torch.einsum("bchw,bc->bhw", fmaps, weight[labels]).cpu().numpy()
    out = []
    for cam_map, image in zip(maps, images):
        cam_map = cam_map - cam_map.min()
        cam_map = cam_map / cam_map.max()  # unguarded, as in the original
        width, height = image.size
        out.append(compress_per_image(image, cam_box_per_image(cam_map, height, width, threshold), ratio))
    return out


def rational_stacked_powers(x, numerator, denominator):
    """Version-A rational as the original evaluates it: stacked powers of x, abs-sum denominator."""
    degree = max(numerator.numel(), denominator.numel() + 1)
    powers = torch.stack([x**k for k in range(degree)], dim=-1)
    num = (powers[..., : numerator.numel()] * numerator).sum(-1)
    expanded = torch.cat([denominator.new_ones(1), denominator, denominator.new_zeros(degree - 1 - denominator.numel())])
    den = (powers * expanded).abs().sum(-1)
    return num / den
