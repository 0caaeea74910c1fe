"""The growing networks of the learners: a list of backbones (all but the newest frozen) and heads over their
concatenated features.

:class:`IncrementalNet` holds what every one shares: ``fc`` over the features of all backbones (so that ``fc.weight``
rows make the CAM of the concatenated fmaps), growth by one backbone initialised from the last, freezing of the old
backbones whole (rational coefficients included), weight aligning, and a spec to rebuild it from a checkpoint.
``forward(x, activation)`` returns ``features``, ``fmaps`` (the last stage of every backbone, concatenated along
channels), ``logits`` and the outputs of the learner's own heads:

- :class:`FosterNet` (FOSTER): in boosting phases ``fe_logits`` (``fe_fc`` on the new backbone's features) and
  ``old_logits`` (``old_fc``, the previous phase's frozen ``fc`` over the old features); :meth:`FosterNet.student`;
- :class:`DERNet` (DER, as the original's ``utils/inc_net.py`` DERNet): ``aux_logits`` (``aux_fc`` on the new
  backbone's features, over the new classes plus one "old" class).
"""
from __future__ import annotations

from typing import Callable, Union

import torch
from torch import nn

from .backbones import build_backbone

__all__ = ["IncrementalNet", "FosterNet", "DERNet", "network_from_spec"]


def _linear(in_dim: int, out_dim: int, bias: bool) -> nn.Linear:
    fc = nn.Linear(in_dim, out_dim, bias=bias)
    nn.init.kaiming_uniform_(fc.weight, nonlinearity="linear")
    if bias:
        nn.init.zeros_(fc.bias)
    return fc


class IncrementalNet(nn.Module):
    """Backbones (old ones frozen) and ``fc`` over their concatenated features; subclasses add heads.

    Args:
        backbone: name for :func:`~training.models.build_backbone` or a zero-argument factory.
        backbone_kwargs: keyword arguments of the backbone constructor.
        fc_bias: whether the heads have a bias; the original's heads (SimpleLinear) have none.
    """

    #: The heads, registered (empty) up front so that the parameter order never depends on the growth history:
    #: optimiser states are restored by position.
    HEADS: tuple = ("fc",)
    #: The spec's ``kind`` (:func:`network_from_spec`).
    KIND = "incremental"

    def __init__(self, *, backbone: Union[str, Callable[[], nn.Module]] = "resnet18",
                 backbone_kwargs: Union[dict, None] = None, fc_bias: bool = False):
        super().__init__()
        self.backbone_name = backbone
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.fc_bias = bool(fc_bias)
        self.backbones = nn.ModuleList()
        for head in self.HEADS:
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

    def grow(self, num_classes: int) -> "IncrementalNet":
        """Start a phase with ``num_classes`` seen classes: a new backbone (a copy of the last one, if any), a new
        ``fc`` over all features keeping the old class weights, the subclass's heads (:meth:`_grow_heads`), and the
        old backbones frozen whole, rational coefficients included (as in the original, whose freezing loop skips
        Rational modules but reaches their coefficients through the backbone's recursive ``parameters()``)."""
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
        old_fc, self.fc = self.fc, fc
        self._grow_heads(num_classes, old_fc)
        self.task_sizes.append(num_classes - sum(self.task_sizes))
        self._freeze_old()
        if reference is not None:
            self.to(device=reference.device)
        return self

    def _grow_heads(self, num_classes: int, old_fc: Union[nn.Linear, None]) -> None:
        """Build the subclass's heads for a phase of ``num_classes`` (``old_fc``: the previous phase's fc)."""

    def _freeze_old(self) -> None:
        for old in self.backbones[:-1]:
            old.requires_grad_(False)

    def train(self, mode: bool = True) -> "IncrementalNet":
        """Train mode for the new backbone and heads; frozen old backbones stay in eval mode (BN statistics)."""
        super().train(mode)
        if mode:
            for old in self.backbones[:-1]:
                old.eval()
        return self

    def widened(self, num_classes: int) -> "IncrementalNet":
        """The single network of the no-memory bounds (``learner="finetune"`` / ``"joint"``) in its next phase: this
        one-backbone network with ``fc`` widened to ``num_classes`` (old rows kept, new rows fresh)."""
        if len(self.backbones) != 1:
            raise ValueError(f"widened: expected a one-backbone network, got {len(self.backbones)} backbones")
        if num_classes <= self.num_classes:
            raise ValueError(f"num_classes: expected more than the {self.num_classes} already known, got {num_classes}")
        net = type(self)(backbone=self.backbone_name, backbone_kwargs=self.backbone_kwargs, fc_bias=self.fc_bias)
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

    # ---------------------------------------------------------------- checkpoints
    def spec(self) -> dict:
        """Architecture description (no weights) for :func:`network_from_spec`; the backbone must be given by name."""
        if not isinstance(self.backbone_name, str):
            raise TypeError("spec(): only networks built from a backbone name can be described")
        shape = lambda fc: None if fc is None else [fc.out_features, fc.in_features]  # noqa: E731
        return {
            "kind": self.KIND,
            "backbone": self.backbone_name,
            "backbone_kwargs": dict(self.backbone_kwargs),
            "fc_bias": self.fc_bias,
            "num_backbones": len(self.backbones),
            **{head: shape(getattr(self, head)) for head in self.HEADS},
            "task_sizes": list(self.task_sizes),
        }

    @classmethod
    def from_spec(cls, spec: dict) -> "IncrementalNet":
        """An untrained network of the architecture ``spec`` describes (load a state_dict into it)."""
        net = cls(backbone=spec["backbone"], backbone_kwargs=spec["backbone_kwargs"], fc_bias=spec.get("fc_bias", True))
        for _ in range(spec["num_backbones"]):
            net.backbones.append(net._new_backbone())
        net.out_dim = net.backbones[0].out_dim if len(net.backbones) else 0
        for head in cls.HEADS:
            shape = spec[head]
            setattr(net, head, None if shape is None else _linear(shape[1], shape[0], net.fc_bias))
        net.task_sizes = list(spec["task_sizes"])
        net._freeze_old()
        return net

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, activation: str = "relu") -> dict:
        outs = [backbone(x, activation) for backbone in self.backbones]
        features = torch.cat([o["features"] for o in outs], 1) if len(outs) > 1 else outs[0]["features"]
        fmaps = torch.cat([o["fmaps"] for o in outs], 1) if len(outs) > 1 else outs[0]["fmaps"]
        result = {"features": features, "fmaps": fmaps, "logits": self.fc(features)}
        self._head_outputs(result, features)
        return result

    def _head_outputs(self, result: dict, features: torch.Tensor) -> None:
        """Add the subclass's head outputs to ``result``."""


class FosterNet(IncrementalNet):
    """FOSTER's network: in boosting phases (more than one backbone) ``fe_fc`` classifies all seen classes from the
    new backbone alone and ``old_fc`` is the previous phase's frozen ``fc`` over the old features."""

    HEADS = ("fc", "fe_fc", "old_fc")
    KIND = "foster"

    def _grow_heads(self, num_classes, old_fc):
        if old_fc is not None:
            self.old_fc = old_fc
        self.fe_fc = _linear(self.out_dim, num_classes, self.fc_bias) if len(self.backbones) > 1 else None

    def _freeze_old(self) -> None:
        super()._freeze_old()
        if self.old_fc is not None:
            self.old_fc.requires_grad_(False)

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

    def _head_outputs(self, result, features):
        if self.fe_fc is not None:
            result["fe_logits"] = self.fe_fc(features[:, -self.out_dim:])
        if self.old_fc is not None:
            result["old_logits"] = self.old_fc(features[:, : self.old_fc.in_features])


class DERNet(IncrementalNet):
    """DER's network (the original's ``DERNet``): one backbone per phase, all earlier ones frozen, and ``aux_fc``
    over the new backbone's features classifying the new classes plus one "old" class (index 0). With one backbone
    ``aux_fc`` is built (as in the original) but frozen: phase 0 has no old class and its loss does not use it."""

    HEADS = ("fc", "aux_fc")
    KIND = "der"

    def _grow_heads(self, num_classes, old_fc):
        self.aux_fc = _linear(self.out_dim, num_classes - sum(self.task_sizes) + 1, self.fc_bias)

    def _freeze_old(self) -> None:
        super()._freeze_old()
        if self.aux_fc is not None:
            self.aux_fc.requires_grad_(len(self.backbones) > 1)

    def _head_outputs(self, result, features):
        result["aux_logits"] = self.aux_fc(features[:, -self.out_dim:])


_KINDS = {cls.KIND: cls for cls in (IncrementalNet, FosterNet, DERNet)}


def network_from_spec(spec: dict) -> IncrementalNet:
    """The untrained network a :meth:`IncrementalNet.spec` describes (specs written before ``kind`` existed are
    FOSTER networks)."""
    kind = spec.get("kind", FosterNet.KIND)
    if kind not in _KINDS:
        raise ValueError(f"network spec: unknown kind {kind!r} (expected one of {', '.join(_KINDS)})")
    return _KINDS[kind].from_spec(spec)
