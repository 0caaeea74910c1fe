"""Backbones with a per-call ReLU / rational activation switch, and the FOSTER network built from them.

Every activation site holds its own :class:`cim_ext.nn.Rational` beside the ReLU; the convolution and batch-norm
weights (theta) are shared by both branches, the rational coefficients (phi) are used only by
``forward(x, activation="rational")``. Fast weights are applied with :func:`torch.func.functional_call`
(see :func:`functional_forward`), never with a second hand-written module.

Backbones return ``{"features": Tensor[B, D], "fmaps": Tensor[B, D, h, w]}`` (fmaps of the last stage);
:class:`FosterNet` adds ``logits`` (and ``fe_logits`` / ``old_logits`` in boosting phases).
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Union

import torch
import torch.nn.functional as F
from torch import nn

from cim_ext.nn import Rational

__all__ = [
    "ACTIVATIONS",
    "ActivationSite",
    "ResNet18",
    "CifarResNet",
    "FosterNet",
    "build_backbone",
    "functional_forward",
    "split_parameters",
    "rational_modules",
]

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


def _linear(in_dim: int, out_dim: int, bias: bool) -> nn.Linear:
    fc = nn.Linear(in_dim, out_dim, bias=bias)
    nn.init.kaiming_uniform_(fc.weight, nonlinearity="linear")
    if bias:
        nn.init.zeros_(fc.bias)
    return fc


class FosterNet(nn.Module):
    """FOSTER's network: a list of backbones (old ones frozen) and heads over their concatenated features.

    ``fc`` classifies all seen classes from all features; in boosting phases (more than one backbone) ``fe_fc``
    classifies from the new backbone alone and ``old_fc`` is the previous phase's frozen ``fc`` over the old
    features. ``forward(x, activation)`` returns features, fmaps (last stage of every backbone, concatenated along
    channels so that ``fc.weight`` gives the CAM), logits, and fe_logits / old_logits when those heads exist.

    Args:
        backbone: name for :func:`build_backbone` or a zero-argument factory.
        backbone_kwargs: keyword arguments of the backbone constructor.
        fc_bias: whether the heads have a bias; the original's heads (SimpleLinear) have none.
    """

    def __init__(self, *, backbone: Union[str, Callable[[], nn.Module]] = "resnet18",
                 backbone_kwargs: Union[dict, None] = None, fc_bias: bool = False):
        super().__init__()
        self.backbone_name = backbone
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.fc_bias = bool(fc_bias)
        self.backbones = nn.ModuleList()
        # Registered (empty) up front so that the parameter order never depends on the growth history: optimiser
        # states are restored by position.
        for head in ("fc", "fe_fc", "old_fc"):
            self.register_module(head, None)
        self.out_dim = 0
        self.task_sizes: list[int] = []

    # ---------------------------------------------------------------- structure
    @property
    def num_classes(self) -> int:
        return 0 if self.fc is None else self.fc.out_features

    @property
    def feature_dim(self) -> int:
        return self.out_dim * len(self.backbones)

    def _new_backbone(self) -> nn.Module:
        return build_backbone(self.backbone_name, **self.backbone_kwargs)

    def grow(self, num_classes: int) -> "FosterNet":
        """Start a phase with ``num_classes`` seen classes: add a backbone (a copy of the last one, if any), a new
        ``fc`` keeping the old class weights, ``old_fc`` = the previous ``fc`` (frozen), and a fresh ``fe_fc``.
        Old backbones are frozen whole, rational coefficients included (as in the original, whose freezing loop
        skips Rational modules but reaches their coefficients through the backbone's recursive ``parameters()``)."""
        if num_classes <= self.num_classes:
            raise ValueError(f"num_classes: expected more than the {self.num_classes} already known, got {num_classes}")
        reference = next(self.parameters(), None)
        backbone = self._new_backbone()
        if len(self.backbones):
            backbone.load_state_dict(self.backbones[-1].state_dict())
        else:
            self.out_dim = backbone.out_dim
        self.backbones.append(backbone)
        fc = _linear(self.feature_dim, num_classes, self.fc_bias)
        if self.fc is not None:
            with torch.no_grad():
                fc.weight[: self.fc.out_features, : self.fc.in_features] = self.fc.weight
                if self.fc_bias:
                    fc.bias[: self.fc.out_features] = self.fc.bias
            self.old_fc = self.fc
        self.fc = fc
        self.fe_fc = _linear(self.out_dim, num_classes, self.fc_bias) if len(self.backbones) > 1 else None
        self.task_sizes.append(num_classes - sum(self.task_sizes))
        self._freeze_old()
        if reference is not None:
            self.to(device=reference.device)
        return self

    def _freeze_old(self) -> None:
        for old in self.backbones[:-1]:
            old.requires_grad_(False)
        if self.old_fc is not None:
            self.old_fc.requires_grad_(False)

    def train(self, mode: bool = True) -> "FosterNet":
        """Train mode for the new backbone and heads; frozen old backbones stay in eval mode (BN statistics)."""
        super().train(mode)
        if mode:
            for old in self.backbones[:-1]:
                old.eval()
        return self

    def student(self) -> "FosterNet":
        """A one-backbone student for FOSTER's compression stage: backbone initialised from the first (old)
        backbone, ``fc`` over its features with the old classifier weights copied in (as in the original)."""
        student = FosterNet(backbone=self.backbone_name, backbone_kwargs=self.backbone_kwargs, fc_bias=self.fc_bias)
        student.grow(self.num_classes)
        student.backbones[0].load_state_dict(self.backbones[0].state_dict())
        student.task_sizes = list(self.task_sizes)
        if self.old_fc is not None and self.old_fc.in_features == student.fc.in_features:
            with torch.no_grad():
                student.fc.weight[: self.old_fc.out_features] = self.old_fc.weight
        reference = next(self.parameters())
        return student.to(device=reference.device)

    def widened(self, num_classes: int) -> "FosterNet":
        """The single network of the no-memory bounds (``learner="finetune"`` / ``"joint"``) in its next phase: this
        one-backbone network with ``fc`` widened to ``num_classes`` (old rows kept, new rows fresh), no old head."""
        if len(self.backbones) != 1:
            raise ValueError(f"widened: expected a one-backbone network, got {len(self.backbones)} backbones")
        if num_classes <= self.num_classes:
            raise ValueError(f"num_classes: expected more than the {self.num_classes} already known, got {num_classes}")
        net = FosterNet(backbone=self.backbone_name, backbone_kwargs=self.backbone_kwargs, fc_bias=self.fc_bias)
        net.grow(num_classes)
        net.backbones[0].load_state_dict(self.backbones[0].state_dict())
        net.task_sizes = list(self.task_sizes) + [num_classes - self.num_classes]
        with torch.no_grad():
            net.fc.weight[: self.num_classes] = self.fc.weight
            if self.fc_bias:
                net.fc.bias[: self.num_classes] = self.fc.bias
        return net.to(device=next(self.parameters()).device)

    def weight_align(self, known: int, increment: int, value: float = 1.0) -> float:
        """WA (Zhao et al.): rescale the new classes' fc rows to the old rows' mean norm; returns gamma."""
        with torch.no_grad():
            weights = self.fc.weight
            new_norm = weights[-increment:].norm(p=2, dim=1).mean()
            old_norm = weights[:-increment].norm(p=2, dim=1).mean()
            gamma = float(old_norm / new_norm) * value ** (known / increment)
            weights[-increment:] *= gamma
        return gamma

    def spec(self) -> dict:
        """Architecture description (no weights) for :meth:`from_spec`; the backbone must be given by name."""
        if not isinstance(self.backbone_name, str):
            raise TypeError("spec(): only networks built from a backbone name can be described")
        shape = lambda fc: None if fc is None else [fc.out_features, fc.in_features]  # noqa: E731
        return {
            "backbone": self.backbone_name,
            "backbone_kwargs": dict(self.backbone_kwargs),
            "fc_bias": self.fc_bias,
            "num_backbones": len(self.backbones),
            "fc": shape(self.fc),
            "fe_fc": shape(self.fe_fc),
            "old_fc": shape(self.old_fc),
            "task_sizes": list(self.task_sizes),
        }

    @classmethod
    def from_spec(cls, spec: dict) -> "FosterNet":
        """An untrained network of the architecture ``spec`` describes (load a state_dict into it)."""
        net = cls(backbone=spec["backbone"], backbone_kwargs=spec["backbone_kwargs"], fc_bias=spec.get("fc_bias", True))
        for _ in range(spec["num_backbones"]):
            net.backbones.append(net._new_backbone())
        net.out_dim = net.backbones[0].out_dim if len(net.backbones) else 0
        make = lambda shape: None if shape is None else _linear(shape[1], shape[0], net.fc_bias)  # noqa: E731
        net.fc, net.fe_fc, net.old_fc = make(spec["fc"]), make(spec["fe_fc"]), make(spec["old_fc"])
        net.task_sizes = list(spec["task_sizes"])
        net._freeze_old()
        return net

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, activation: str = "relu") -> dict:
        outs = [backbone(x, activation) for backbone in self.backbones]
        features = torch.cat([o["features"] for o in outs], 1) if len(outs) > 1 else outs[0]["features"]
        fmaps = torch.cat([o["fmaps"] for o in outs], 1) if len(outs) > 1 else outs[0]["fmaps"]
        result = {"features": features, "fmaps": fmaps, "logits": self.fc(features)}
        if self.fe_fc is not None:
            result["fe_logits"] = self.fe_fc(features[:, -self.out_dim:])
        if self.old_fc is not None:
            result["old_logits"] = self.old_fc(features[:, : self.old_fc.in_features])
        return result


# -------------------------------------------------------------------------------------------------- parameter groups
def rational_modules(model: nn.Module) -> Iterable[tuple[str, Rational]]:
    return ((name, m) for name, m in model.named_modules() if isinstance(m, Rational))


def split_parameters(model: nn.Module, *, trainable_only: bool = True) -> tuple[dict, dict]:
    """(theta, phi): name -> parameter dicts; phi are the rational coefficients, theta everything else."""
    phi_names = {
        f"{prefix}.{pname}" if prefix else pname
        for prefix, module in rational_modules(model)
        for pname, _ in module.named_parameters(recurse=False)
    }
    theta, phi = {}, {}
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        (phi if name in phi_names else theta)[name] = p
    return theta, phi


def functional_forward(model: nn.Module, params: dict, x: torch.Tensor, activation: str = "relu") -> dict:
    """``model(x, activation)`` with some parameters/buffers replaced by ``params`` (fast weights), via
    :func:`torch.func.functional_call`; names not in ``params`` use the module's own tensors."""
    return torch.func.functional_call(model, params, (x,), {"activation": activation}, strict=False)


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
