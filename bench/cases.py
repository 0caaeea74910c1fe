"""Benchmark inputs at realistic sizes (ImageNet: B=256, 512x7x7 feature maps, 3x224x224 images).

``CIM_BENCH_QUICK=1`` shrinks the batch so the CPU suite fits in CI; the shapes per sample stay realistic.
"""
import os

import torch

QUICK = os.environ.get("CIM_BENCH_QUICK", "0") == "1"
DEVICE = os.environ.get("CIM_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")


def batch(full=256, quick=8):
    return quick if QUICK else full


def cam_inputs(device=DEVICE, dtype=torch.float32, classes=1000, channels=512, side=7):
    gen = torch.Generator().manual_seed(0)
    b = batch()
    fmaps = torch.rand(b, channels, side, side, generator=gen, dtype=dtype).relu_()
    weight = torch.randn(classes, channels, generator=gen, dtype=dtype) * 0.05
    labels = torch.randint(0, classes, (b,), generator=gen)
    return fmaps.to(device), weight.to(device), labels.to(device)


def image_inputs(device=DEVICE, dtype=torch.uint8, side=224):
    gen = torch.Generator().manual_seed(1)
    b = batch()
    images = torch.randint(0, 256, (b, 3, side, side), generator=gen, dtype=torch.uint8)
    if dtype != torch.uint8:
        images = images.to(dtype) / 255
    y0 = torch.randint(0, side // 2, (b,), generator=gen)
    x0 = torch.randint(0, side // 2, (b,), generator=gen)
    h = torch.randint(1, side // 2, (b,), generator=gen)
    w = torch.randint(1, side // 2, (b,), generator=gen)
    boxes = torch.stack([y0, y0 + h, x0, x0 + w], 1)
    return images.to(device), boxes.to(device)


def normalized_cams(device=DEVICE, dtype=torch.float32, side=7):
    gen = torch.Generator().manual_seed(2)
    cams = torch.rand(batch(), side, side, generator=gen, dtype=dtype)
    flat = cams.flatten(1)
    cams = ((flat - flat.amin(1, keepdim=True)) / (flat.amax(1, keepdim=True) - flat.amin(1, keepdim=True))).view_as(cams)
    return cams.to(device)


def activation_input(device=DEVICE, dtype=torch.float32):
    gen = torch.Generator().manual_seed(3)
    shape = (batch(256, 8), 64, 56, 56)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
