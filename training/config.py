"""Typed run configuration: one dataclass, JSON files with the original CIM-CIL key names, ``--set`` overrides.

``load_config(path_or_name, overrides)`` reads a JSON file (or a bundled config by name: ``synthetic``,
``imagenet1000``, ``imagenet100``, ``food101``), applies ``key=value`` overrides with type conversion and checks
every value. Unknown keys and bad values raise :class:`ConfigError` naming the valid choices.

The original repository's JSON files load unchanged: its keys ``convnet_type`` and ``num_workers`` are aliases of
``backbone`` and ``workers``; ``seed``/``device`` given as one-element lists are unwrapped; ``prefix``, ``shuffle``,
``model_name`` and ``oofc`` are accepted and checked but have no effect (the class order is always shuffled, the
learner is chosen by ``learner``, ``oofc`` is unused by the original FOSTER+CIM learner).

The module imports no torch, so that a bad key or value is reported before the heavy imports (:mod:`training.runtime`
resolves devices).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from .messages import did_you_mean, listing, nearest_first

__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "config_names",
    "config_path",
    "parse_override",
]

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

COMPRESSION_MODES = ("none", "downsample", "cam", "cim", "gt")
#: Learner names ``learner`` accepts (:func:`training.learners.register_learner` adds one), and those of them that
#: keep exemplars (the bounds keep none).
LEARNER_NAMES = ["foster", "der", "finetune", "joint"]
MEMORY_LEARNERS = ["foster", "der"]
BACKBONES = ("resnet18", "resnet32", "resnet20", "resnet14", "resnet8")
DATASETS = ("synthetic", "imagefolder", "tinyimagenet", "imagenet1000", "imagenet100", "food101")


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the valid choices."""


@dataclass
class Config:
    """Every hyper-parameter of a run. Field names follow the original CIM-CIL JSON files where one exists;
    docs/training.md has the table of keys and meanings."""

    # data and protocol
    dataset: Literal["synthetic", "imagefolder", "tinyimagenet", "imagenet1000", "imagenet100", "food101"] = "synthetic"
    data_root: Union[str, None] = None
    data_options: dict = field(default_factory=dict)  # extra keyword options for training.data.load_source
    on_bad_image: Literal["skip", "error"] = "skip"
    image_size: Union[int, None] = None  # None: the source's native training size
    augmentation: Literal["auto", "original", "light"] = "auto"  # auto: light for synthetic, original otherwise
    init_cls: int = 10
    increment: int = 10
    class_order_seed: int = 1993
    # exemplar memory (budget in image units)
    memory_size: int = 2000
    memory_per_class: int = 20
    fixed_memory: bool = False
    # the memory's pixels: encoded in shard files of the run directory (training.exemplar_store); png is lossless
    memory_codec: Literal["png", "jpeg", "webp"] = "png"
    memory_quality: int = 90  # jpeg / webp quality
    # model
    backbone: Literal["resnet18", "resnet32", "resnet20", "resnet14", "resnet8"] = "resnet18"
    fc_bias: bool = False  # the original's heads (SimpleLinear) have no bias
    # optimisation (theta: SGD or AdamW + cosine; phi: Adam + cosine)
    theta_optimizer: Literal["sgd", "adamw"] = "sgd"
    init_epochs: int = 200
    init_theta_lr: float = 0.1
    init_phi_lr: float = 0.01
    init_weight_decay: float = 5e-4
    incre_epochs: int = 170
    incre_theta_lr: float = 0.1
    incre_phi_lr: float = 0.01
    incre_weight_decay: float = 5e-4
    compression_epochs: int = 130  # FOSTER student stage; 0 skips it (the network then grows by one backbone/phase)
    momentum: float = 0.9
    max_phi_grad_norm: float = 1.0
    batch_size: int = 256
    # learner: FOSTER or DER with the compression setting's memory, or one of the two usual bounds with no memory
    # (one network, plain CE): "finetune" trains on the new classes only (lower bound), "joint" on every seen
    # class's training images (upper bound)
    learner: str = "foster"  # one of LEARNER_NAMES
    # theta's schedule in the training stage: auto = the learner's own (FOSTER and the bounds: cosine over the
    # stage's epochs; DER: lr_decay at the milestones), or one of them for every learner
    lr_schedule: Literal["auto", "cosine", "multistep"] = "auto"
    init_milestones: list = field(default_factory=lambda: [60, 120, 170])  # epochs (phase 0) of a lr_decay step
    incre_milestones: list = field(default_factory=lambda: [80, 120, 150])  # epochs (later phases)
    lr_decay: float = 0.1
    # FOSTER
    beta1: float = 0.97
    beta2: float = 0.97
    # old classes at the per-class budget (the original) or at their real exemplar counts
    class_weight_counts: Literal["nominal", "real"] = "nominal"
    lambda_okd: float = 1.0
    T: float = 2.0
    is_teacher_wa: bool = False
    is_student_wa: bool = False
    wa_value: float = 1.0
    # CIM
    # gt: the source's own object boxes (the ceiling of any box method; needs a source with boxes)
    compression: Literal["none", "downsample", "cam", "cim", "gt"] = "cim"
    compress_ratio: float = 4.0
    mask_threshold: float = 0.6
    # None: mask_threshold; "otsu": per-image Otsu; "calibrated": the fixed threshold whose boxes best match the true
    # boxes of held-out images of the phase-0 classes (data_options.heldout_per_class), chosen at the end of phase 0
    threshold: Union[float, Literal["otsu", "calibrated"], None] = None
    meta_batch_size: int = 16
    cam_batch_size: int = 16
    num_meta_iters_per_cls: float = 0.5
    num_meta_iters: Union[int, None] = None  # meta-iterations per epoch (the original DER's key); None: per class
    lr_ratio: float = 0.1
    cam_update_interval: int = 40
    randombbxblur_prob_incre: float = 0.1
    div_coef: float = 0.2
    reg_coef: float = 0.1
    der_reg_coef: float = 0.0  # MSE(cam, 0) weight in DER's meta outer loss (0: the original's DER has no such term)
    meta_gradient: Literal["exact", "first_order"] = "exact"  # first_order: theta detached in the rational branch
    # run
    seed: int = 1993
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    workers: int = 4
    amp: bool = False  # bf16 autocast (CUDA only); the original runs fp32
    channels_last: bool = True  # only on CUDA
    deterministic: bool = False
    checkpoint_every: int = 10  # epochs between checkpoints inside a stage (0: none; stage and phase ends always)
    checkpoint_minutes: float = 5.0  # also a checkpoint at the first batch end this long after the last (0: never)
    on_nonfinite_loss: Literal["error", "skip"] = "error"  # a NaN/Inf training loss: stop, or skip that batch
    eval_every: int = 0  # epochs between test evaluations inside a phase, for the progress bar (0: never)
    tensorboard: bool = True
    progress: bool = True
    # data path and processes (training.distributed; docs/scale.md)
    pin_memory: bool = True  # page-locked loader batches (CUDA only)
    persistent_workers: bool = True  # keep loader workers between passes over a loader (workers > 0)
    prefetch_factor: int = 4  # batches prepared ahead by each loader worker (workers > 0)
    sync_bn: bool = True  # under torchrun: batch-norm statistics of the global batch
    decode_on_device: bool = False  # JPEG decoding (nvJPEG), transforms and memory rebuild on the run's device

    # ------------------------------------------------------------------ derived values
    @property
    def original_augmentation(self) -> bool:
        """Whether the transforms are the original ImageNet pipeline (else the light one for small images)."""
        return self.augmentation == "original" or (self.augmentation == "auto" and self.dataset != "synthetic")

    @property
    def cam_threshold(self) -> Union[float, str]:
        """The threshold handed to ``cim_ext.cam_to_boxes``: ``threshold`` if set, else ``mask_threshold``."""
        return self.mask_threshold if self.threshold is None else self.threshold

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        """Build and validate a config from a dict (keys already canonical or aliases)."""
        cfg = cls()
        for key, value in values.items():
            _assign(cfg, key, value, source="dict")
        cfg.validate()
        return cfg

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            setattr(self, f.name, _convert(f.name, getattr(self, f.name), _field_types()[f.name]))
        _check_ranges(self)
        return self


# ---------------------------------------------------------------------------------------------------------- loading
#: Original CIM-CIL key -> canonical field.
ALIASES = {"convnet_type": "backbone", "num_workers": "workers", "model_name": "learner"}
#: Original keys that are accepted, checked, and have no effect here.
_IGNORED = {
    "prefix": None,
    "shuffle": (True,),
    "oofc": ("ft",),
}


def _field_types() -> dict:
    return typing.get_type_hints(Config)


def config_names() -> list[str]:
    """Names of the bundled configs."""
    return sorted(name[:-5] for name in os.listdir(CONFIG_DIR) if name.endswith(".json"))


def config_path(path_or_name: str) -> str:
    """Path of a config file, or of the bundled config of that name."""
    if os.path.isfile(path_or_name):
        return path_or_name
    candidate = os.path.join(CONFIG_DIR, f"{path_or_name}.json")
    if os.path.isfile(candidate):
        return candidate
    raise ConfigError(f"config {path_or_name!r}: no such file, and not a bundled config (one of "
                      f"{', '.join(config_names())}){did_you_mean(path_or_name, config_names())}")


def load_config(path_or_name: Union[str, None] = None, overrides: Union[list, tuple] = ()) -> Config:
    """Load a JSON config (file path or bundled name; None -> ``synthetic``) and apply ``key=value`` overrides."""
    cfg = Config()
    path = config_path(path_or_name or "synthetic")
    try:
        with open(path) as handle:
            values = json.load(handle)
    except json.JSONDecodeError as error:
        raise ConfigError(f"config {path}: not valid JSON ({error})") from error
    if not isinstance(values, dict):
        raise ConfigError(f"config {path}: expected a JSON object of key: value pairs")
    for key, value in values.items():
        _assign(cfg, key, value, source=path)
    apply_overrides(cfg, overrides)
    return cfg.validate()


def apply_overrides(cfg: Config, overrides: Union[list, tuple] = ()) -> Config:
    """Apply ``key=value`` overrides (as given to ``--set``) to ``cfg`` in place; not validated yet."""
    for item in overrides or ():
        key, value = parse_override(item)
        _assign(cfg, key, value, source="--set")
    return cfg


def parse_override(item: str) -> tuple[str, str]:
    """``"key=value"`` -> (key, value-string)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, value = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    return key, value


def _assign(cfg: Config, key: str, value: Any, *, source: str) -> None:
    types = _field_types()
    if key.startswith("data_options."):
        sub = key.split(".", 1)[1]
        cfg.data_options = {**cfg.data_options, sub: _loose(value)}
        return
    if key in _IGNORED:
        allowed = _IGNORED[key]
        got = _convert(key, value, bool) if key == "shuffle" else value
        if allowed is not None and got not in allowed:
            raise ConfigError(f"{key} ({source}): only {list(allowed)} is supported here, got {value!r}")
        return
    given, key = key, ALIASES.get(key, key)
    if key not in types:
        raise ConfigError(_unknown_key(key, source))
    if key == "seed" and isinstance(value, list):
        if len(value) != 1:
            raise ConfigError(f"seed ({source}): one seed per run, got the list {value!r}; run one config per seed")
        value = value[0]
    if key == "device" and isinstance(value, list):
        if len(value) != 1:
            raise ConfigError(f"device ({source}): one device per process (use torchrun for several), got {value!r}")
        value = "cpu" if str(value[0]) == "-1" else f"cuda:{value[0]}"
    name = key if given == key else f"{given} (alias of {key})"
    value = _convert(name, value, types[key])
    if key == "learner" and value not in LEARNER_NAMES:
        raise ConfigError(_not_one_of(name, LEARNER_NAMES, value))
    setattr(cfg, key, value)


def _unknown_key(key: str, source: str) -> str:
    """The message for an unknown key: the closest valid key, and the valid keys nearest first (a bounded list)."""
    valid = sorted(list(_field_types()) + list(ALIASES) + list(_IGNORED))
    dotted = [f"data_options.{key.split('.', 1)[1]}"] if "." in key else []  # data_option.x, data_opts.x, ...
    return (f"unknown config key {key!r} ({source}); valid keys, nearest first: "
            f"{listing(nearest_first(key, valid), 8)}{did_you_mean(key, valid + dotted)}")


def _not_one_of(key: str, choices, value) -> str:
    """``key: expected one of 'a', 'b', got 'x'``, with the closest choice when ``value`` is a near miss."""
    hint = did_you_mean(value.strip() if isinstance(value, str) else value, choices)
    return f"{key}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}{hint}"


def _loose(value: Any) -> Any:
    """A --set string for a free-form option: JSON if it parses (numbers, true/false, null, lists), else the string."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (JSON value or --set string) to type ``tp``; ConfigError naming the choices otherwise."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("null", "none"))):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(key, value, arg)
            except ConfigError:
                continue
        words = [c for a in args if typing.get_origin(a) is Literal for c in typing.get_args(a)]
        hint = did_you_mean(value.strip(), words) if isinstance(value, str) else ""
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}{hint}")
    if origin is Literal:
        choices = typing.get_args(tp)
        text = value.strip() if isinstance(value, str) else value
        if text in choices:
            return text
        raise ConfigError(_not_one_of(key, choices, value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected a boolean (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            result = float(value)
        elif isinstance(value, str):
            try:
                result = float(value.strip())
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        else:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(result):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return result
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp in (list, dict):
        wanted = "a JSON list, e.g. [60, 120]" if tp is list else "a JSON object"
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ConfigError(f"{key}: expected {wanted}, got {value!r}") from None
        if isinstance(value, (list, tuple) if tp is list else dict):
            return tp(value)
        raise ConfigError(f"{key}: expected {wanted}, got {value!r}")
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # pragma: no cover


def _check_ranges(cfg: Config) -> None:
    def need(cond, key, expected):
        if not cond:
            raise ConfigError(f"{key}: expected {expected}, got {getattr(cfg, key)!r}")

    for key in ("init_cls", "increment", "batch_size", "meta_batch_size", "cam_batch_size", "cam_update_interval",
                "prefetch_factor"):
        need(getattr(cfg, key) >= 1, key, "an integer >= 1")
    for key in ("init_epochs", "incre_epochs", "compression_epochs", "memory_size", "memory_per_class", "workers",
                "checkpoint_every", "eval_every"):
        need(getattr(cfg, key) >= 0, key, "an integer >= 0")
    for key in ("init_theta_lr", "init_phi_lr", "incre_theta_lr", "incre_phi_lr", "init_weight_decay",
                "incre_weight_decay", "lr_ratio", "num_meta_iters_per_cls", "div_coef", "reg_coef", "der_reg_coef",
                "lambda_okd", "randombbxblur_prob_incre", "wa_value"):
        need(getattr(cfg, key) >= 0, key, "a number >= 0")
    need(0 <= cfg.momentum < 1, "momentum", "a number in [0, 1)")
    need(1 <= cfg.memory_quality <= 100, "memory_quality", "an integer in [1, 100]")
    need(cfg.max_phi_grad_norm > 0, "max_phi_grad_norm", "a number > 0")
    need(cfg.T > 0, "T", "a number > 0")
    for key in ("beta1", "beta2"):
        need(0 < getattr(cfg, key) < 1, key, "a number in (0, 1)")
    need(cfg.compress_ratio >= 1, "compress_ratio", "a number >= 1")
    need(cfg.learner in LEARNER_NAMES, "learner", "one of " + ", ".join(repr(name) for name in LEARNER_NAMES))
    need(cfg.checkpoint_minutes >= 0, "checkpoint_minutes", "a number >= 0 (0: no checkpoints by wall time)")
    if cfg.learner in MEMORY_LEARNERS:
        budget = cfg.memory_per_class if cfg.fixed_memory else cfg.memory_size
        need(budget > 0, "memory_per_class" if cfg.fixed_memory else "memory_size",
             f"an integer > 0 for learner={cfg.learner!r}, which keeps exemplars (for a run without memory use "
             "learner=finetune)")
    need(cfg.learner in MEMORY_LEARNERS or cfg.compression == "none", "compression",
         f"'none' with learner={cfg.learner!r} (the bounds keep no exemplars)")
    for key in ("init_milestones", "incre_milestones"):
        values = getattr(cfg, key)
        need(all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
             and values == sorted(set(values)), key, "increasing positive epoch numbers, e.g. [60, 120, 170]")
    need(0 < cfg.lr_decay <= 1, "lr_decay", "a number in (0, 1]")
    if cfg.num_meta_iters is not None:
        need(cfg.num_meta_iters >= 0, "num_meta_iters", "an integer >= 0 (or null: num_meta_iters_per_cls)")
    need(0 <= cfg.mask_threshold <= 1, "mask_threshold", "a number in [0, 1]")
    if isinstance(cfg.threshold, float):
        need(0 <= cfg.threshold <= 1, "threshold", "a number in [0, 1], 'otsu' or 'calibrated'")
    if cfg.image_size is not None:
        need(cfg.image_size >= 8, "image_size", "an integer >= 8 (or null for the dataset's size)")
    device = cfg.device
    valid_device = device in ("auto", "cpu", "cuda") or (
        device.startswith("cuda:") and device[5:].isdigit()
    )
    need(valid_device, "device", "one of 'auto', 'cpu', 'cuda', 'cuda:N'")
