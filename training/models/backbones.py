"""Backbones with a per-call ReLU / rational activation switch.

Every activation site holds its own :class:`cim_ext.nn.Rational` beside the ReLU; the convolution and batch-norm
weights (theta) are shared by both branches, the rational coefficients (phi) are used only by
``forward(x, activation="rational")``. Backbones return ``{"features": Tensor[B, D], "fmaps": Tensor[B, D, h, w]}``
(fmaps of the last stage).
"""
from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn

from cim_ext.nn import Rational

__all__ = ["ACTIVATIONS", "ActivationSite", "BasicBlock", "ResNet18", "CifarResNet", "build_backbone"]

ACTIVATIONS = ("relu", "rational")


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


class ActivationSite(nn.Module):
    """One activation site: ReLU, or this site's own learnable rational function."""

    def __init__(self):
        super().__init__()
        self.rational = Rational("relu")

    def forward(self, x: torch.Tensor, activation: str = "relu") -> torch.Tensor:
        if activation == "relu":
            return F.relu(x)
        return self.rational(x)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock layout (same parameter names) with two activation sites."""

    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = ActivationSite()
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = ActivationSite()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor, activation: str) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)), activation)
        out = self.bn2(self.conv2(out))
        return self.act2(out + identity, activation)


class _Stage(nn.ModuleList):
    def forward(self, x: torch.Tensor, activation: str) -> torch.Tensor:  # type: ignore[override]
        for block in self:
            x = block(x, activation)
        return x


def _stage(cin: int, cout: int, blocks: int, stride: int) -> _Stage:
    return _Stage([BasicBlock(cin, cout, stride)] + [BasicBlock(cout, cout) for _ in range(blocks - 1)])


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _Backbone(nn.Module):
    out_dim: int

    def _stem(self, x: torch.Tensor, activation: str) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, activation: str = "relu") -> dict:
        _check_activation(activation)
        x = self._stem(x, activation)
        for stage in self.stages:
            x = stage(x, activation)
        return {"features": torch.flatten(F.adaptive_avg_pool2d(x, 1), 1), "fmaps": x}


class ResNet18(_Backbone):
    """ResNet-18 with the ImageNet stem (7x7/2 conv, 3x3/2 max-pool): 17 activation sites, 512-d features."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act = ActivationSite()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.stages = nn.ModuleList(
            [_stage(width if i == 0 else widths[i - 1], w, 2, 1 if i == 0 else 2) for i, w in enumerate(widths)]
        )
        self.out_dim = widths[-1]
        _init_weights(self)

    def _stem(self, x, activation):
        return self.maxpool(self.act(self.bn1(self.conv1(x)), activation))


class CifarResNet(_Backbone):
    """CIFAR-style ResNet (3x3 stem, three stages of n blocks, widths w/2w/4w): depth = 6n + 2; ResNet-32 by default
    (31 activation sites, 64-d features, an 8x8 last feature map at 32x32 input)."""

    def __init__(self, depth: int = 32, width: int = 16):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"depth: expected 6n + 2 with n >= 1 (8, 14, 20, 32, ...), got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = _conv3x3(3, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.act = ActivationSite()
        widths = [width, 2 * width, 4 * width]
        self.stages = nn.ModuleList(
            [_stage(width if i == 0 else widths[i - 1], w, blocks, 1 if i == 0 else 2) for i, w in enumerate(widths)]
        )
        self.out_dim = widths[-1]
        _init_weights(self)

    def _stem(self, x, activation):
        return self.act(self.bn1(self.conv1(x)), activation)


_BACKBONES: dict[str, Callable[..., _Backbone]] = {
    "resnet18": ResNet18,
    "resnet32": lambda **kw: CifarResNet(depth=32, **kw),
    "resnet20": lambda **kw: CifarResNet(depth=20, **kw),
    "resnet14": lambda **kw: CifarResNet(depth=14, **kw),
    "resnet8": lambda **kw: CifarResNet(depth=8, **kw),
}


def build_backbone(name: Union[str, Callable[[], nn.Module]], **kwargs) -> _Backbone:
    """``"resnet18"`` (ImageNet stem), ``"resnet32"`` / ``"resnet20"`` / ``"resnet14"`` / ``"resnet8"`` (CIFAR
    style), or a zero-argument factory."""
    if callable(name):
        return name()
    if name not in _BACKBONES:
        raise ValueError(f"backbone: expected one of {sorted(_BACKBONES)}, got {name!r}")
    return _BACKBONES[name](**kwargs)
