"""training.config: bundled configs, original key names, --set overrides, validation messages, runtime."""
import json

import pytest
import torch

from training.config import Config, ConfigError, config_names, load_config
from training.runtime import resolve_runtime
from training.optim import theta_optimizer

# Hyper-parameters of the original xfflzl/CIM-CIL exps/cim-*.json files (facts the bundled configs must reproduce).
ORIGINAL_COMMON = {
    "memory_per_class": 20, "fixed_memory": False, "backbone": "resnet18", "seed": 1993, "lambda_okd": 1.0,
    "is_teacher_wa": False, "is_student_wa": False, "wa_value": 1.0, "init_epochs": 200, "init_theta_lr": 0.1,
    "init_phi_lr": 0.01, "init_weight_decay": 5e-4, "incre_epochs": 170, "incre_theta_lr": 0.1, "incre_phi_lr": 0.01,
    "incre_weight_decay": 5e-4, "lr_ratio": 0.1, "max_phi_grad_norm": 1.0, "compression_epochs": 130,
    "momentum": 0.9, "batch_size": 256, "meta_batch_size": 16, "cam_batch_size": 16, "num_meta_iters_per_cls": 0.5,
    "workers": 16, "T": 2.0, "compress_ratio": 4.0, "mask_threshold": 0.6, "cam_update_interval": 40,
    "randombbxblur_prob_incre": 0.1, "div_coef": 0.2, "reg_coef": 0.1, "beta2": 0.97, "compression": "cim",
    # the original's behaviour where this project offers a departure (docs/training.md, Deviations)
    "meta_gradient": "exact", "class_weight_counts": "nominal", "fc_bias": False, "amp": False,
}
ORIGINAL = {
    "imagenet1000": {"memory_size": 20000, "init_cls": 100, "increment": 100, "beta1": 0.97},
    "imagenet100": {"memory_size": 2000, "init_cls": 10, "increment": 10, "beta1": 0.97},
    "food101": {"memory_size": 2020, "init_cls": 11, "increment": 10, "beta1": 0.95},
}


def test_bundled_configs_load():
    assert {"synthetic", "imagenet1000", "imagenet100", "food101"} <= set(config_names())
    for name in config_names():
        cfg = load_config(name)
        assert isinstance(cfg, Config)
        assert cfg.dataset == name


@pytest.mark.parametrize("name", sorted(ORIGINAL))
def test_imagenet_food_configs_match_the_original(name):
    cfg = load_config(name)
    for key, value in {**ORIGINAL_COMMON, **ORIGINAL[name]}.items():
        assert getattr(cfg, key) == value, key
    assert cfg.image_size == 224 and cfg.original_augmentation


def test_default_is_synthetic():
    cfg = load_config()
    assert cfg.dataset == "synthetic" and cfg.backbone == "resnet20" and cfg.image_size == 32
    assert cfg.compression == "cim"


def test_overrides_convert_types():
    cfg = load_config("synthetic", [
        "init_epochs=3", "lr_ratio=0.5", "fixed_memory=true", "threshold=otsu", "compression=cam",
        "data_root=/x", "data_options.train_per_class=7", "T=4", "amp=0",
    ])
    assert cfg.init_epochs == 3 and isinstance(cfg.init_epochs, int)
    assert cfg.lr_ratio == 0.5 and cfg.fixed_memory is True and cfg.amp is False
    assert cfg.threshold == "otsu" and cfg.cam_threshold == "otsu"
    assert cfg.compression == "cam" and cfg.data_root == "/x" and cfg.T == 4.0
    assert cfg.data_options["train_per_class"] == 7
    cfg = load_config("synthetic", ["threshold=0.4"])
    assert cfg.threshold == 0.4 and cfg.cam_threshold == 0.4
    cfg = load_config("synthetic", ["threshold=null"])
    assert cfg.threshold is None and cfg.cam_threshold == cfg.mask_threshold


@pytest.mark.parametrize("override, words", [
    ("no_such_key=1", ["unknown config key 'no_such_key'", "valid keys, nearest first:", "in all)"]),
    ("compression=jpeg", ["compression", "'none'", "'downsample'", "'cam'", "'cim'"]),
    ("backbone=vgg", ["backbone", "'resnet18'", "'resnet32'"]),
    ("theta_optimizer=adam", ["theta_optimizer", "'sgd'", "'adamw'"]),
    ("threshold=high", ["threshold", "'otsu'"]),
    ("init_epochs=1.5", ["init_epochs", "integer"]),
    ("fixed_memory=maybe", ["fixed_memory", "boolean"]),
    ("beta1=1.5", ["beta1", "(0, 1)"]),
    ("batch_size=0", ["batch_size", ">= 1"]),
    ("device=tpu", ["device", "'cpu'", "'cuda'"]),
    ("lr_ratio=nan", ["lr_ratio", "finite"]),
    ("init_cls", ["key=value"]),
])
def test_bad_overrides_are_rejected_with_choices(override, words):
    with pytest.raises(ConfigError) as info:
        load_config("synthetic", [override])
    for word in words:
        assert word in str(info.value)


def test_near_miss_keys_get_a_suggestion_and_a_bounded_list():
    from training.config import ALIASES, _IGNORED, _field_types

    count = len(_field_types()) + len(ALIASES) + len(_IGNORED)
    with pytest.raises(ConfigError) as info:
        load_config("synthetic", ["init_epoch=1"])
    message = str(info.value)
    assert message.startswith("unknown config key 'init_epoch' (--set); valid keys, nearest first: init_epochs, "
                              "incre_epochs, ")
    assert message.endswith(f" ... ({count} in all); did you mean 'init_epochs'?") and len(message) < 300
    assert message.split("nearest first: ")[1].count(", ") == 7
    with pytest.raises(ConfigError, match=r"did you mean 'data_options\.num_classes'\?"):
        load_config("synthetic", ["data_option.num_classes=3"])
    with pytest.raises(ConfigError) as info:
        load_config("synthetic", ["zzzz=1"])
    assert "did you mean" not in str(info.value) and "valid keys, nearest first: " in str(info.value)


@pytest.mark.parametrize("override, close", [
    ("threshold=otsuu", "otsu"), ("compression=CIM", "cim"), ("theta_optimizer=adam", "adamw"),
    ("learner=fostr", "foster"), ("dataset=tinyimagnet", "tinyimagenet"), ("backbone=resnet-18", "resnet18"),
    ("meta_gradient=first-order", "first_order"),
])
def test_near_miss_values_get_a_suggestion(override, close):
    with pytest.raises(ConfigError) as info:
        load_config("synthetic", [override])
    assert str(info.value).endswith(f", got {override.split('=')[1]!r}; did you mean {close!r}?")


def test_far_values_and_names_get_no_suggestion_but_near_config_names_do():
    with pytest.raises(ConfigError) as info:
        load_config("synthetic", ["threshold=high"])
    assert "did you mean" not in str(info.value)
    with pytest.raises(ConfigError, match=r"not a bundled config \(one of food101, .*\); did you mean "
                                          r"'tinyimagenet'\?"):
        load_config("tinyimagnet")


def test_message_pieces():
    from training.messages import did_you_mean, listing, nearest_first

    assert listing(["a", "b"]) == "a, b" and listing([]) == ""
    assert listing(range(100)) == "0, 1, 2, 3, 4 ... (100 in all)"
    assert listing(["x"] * 6, 6, quote=True) == ", ".join(["'x'"] * 6)
    assert did_you_mean("GPU", ["cpu", "gpu"]) == "; did you mean 'gpu'?" and did_you_mean(3, ["3"]) == ""
    assert did_you_mean("xyz", ["cpu"]) == ""
    assert nearest_first("lr", ["momentum", "lr_ratio", "lr"]) == ["lr", "lr_ratio", "momentum"]


def test_original_json_loads_unchanged(tmp_path):
    original = {
        "prefix": "reproduce", "dataset": "imagenet100", "memory_size": 2000, "memory_per_class": 20,
        "fixed_memory": False, "shuffle": True, "init_cls": 10, "increment": 10, "model_name": "foster",
        "convnet_type": "resnet18", "device": ["0"], "seed": [1993], "beta1": 0.97, "beta2": 0.97, "oofc": "ft",
        "num_workers": 16, "T": 2, "mask_threshold": 0.6,
    }
    path = tmp_path / "cim-imagenet100.json"
    path.write_text(json.dumps(original))
    cfg = load_config(str(path))
    assert cfg.backbone == "resnet18" and cfg.workers == 16 and cfg.seed == 1993 and cfg.device == "cuda:0"
    original["model_name"] = "icarl"
    path.write_text(json.dumps(original))
    with pytest.raises(ConfigError, match="model_name"):
        load_config(str(path))
    original["model_name"], original["seed"] = "foster", [1, 2]
    path.write_text(json.dumps(original))
    with pytest.raises(ConfigError, match="one seed per run"):
        load_config(str(path))


def test_missing_config_names_the_bundled_ones():
    with pytest.raises(ConfigError, match="synthetic"):
        load_config("no-such-config")


def test_from_dict_round_trip():
    cfg = load_config("imagenet100", ["threshold=otsu"])
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_runtime_cpu():
    runtime = resolve_runtime(load_config("synthetic", ["device=cpu"]))
    assert runtime.device == torch.device("cpu") and runtime.amp_dtype is None and not runtime.channels_last
    assert runtime.is_main and not runtime.distributed
    with runtime.autocast():
        assert not torch.is_autocast_enabled("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_runtime(load_config("synthetic", ["device=cuda"]))


@pytest.mark.parametrize("name, expected", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_theta_optimizer(name, expected):
    cfg = load_config("synthetic", [f"theta_optimizer={name}", "momentum=0.5"])
    weight = torch.nn.Parameter(torch.ones(3))
    opt = theta_optimizer(cfg, [weight], 0.01, 1e-4)
    assert type(opt) is expected
    group = opt.param_groups[0]
    assert group["lr"] == 0.01 and group["weight_decay"] == 1e-4
    if name == "sgd":
        assert group["momentum"] == 0.5


def test_original_configs_keep_sgd():
    for name in ("imagenet1000", "imagenet100", "food101"):
        assert load_config(name).theta_optimizer == "sgd"
    assert load_config("synthetic").theta_optimizer == "adamw"


@pytest.mark.parametrize("key, good, bad", [("meta_gradient", "first_order", "second"),
                                            ("class_weight_counts", "real", "counted")])
def test_departure_keys_are_checked(key, good, bad):
    assert getattr(load_config("imagenet100", [f"{key}={good}"]), key) == good
    with pytest.raises(ConfigError, match=key):
        load_config("imagenet100", [f"{key}={bad}"])
