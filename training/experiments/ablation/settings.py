"""What the ablation compares: the settings (ways to spend the same exemplar memory, and the two bounds), the
class-weight rules, the budgets, the gaps it reports, the original paper's figures, and the presets (sizes of the
ablation, each a bundled config plus overrides)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

__all__ = ["Setting", "SETTINGS", "COMPRESSION_SETTINGS", "RULES", "BUDGETS", "GAPS", "ORIGINAL", "Preset", "PRESETS",
           "COMMON", "LEARNERS"]


@dataclass(frozen=True)
class Setting:
    """One way of storing exemplars: the config overrides that select it."""

    name: str
    label: str
    overrides: tuple
    boxes: bool  # CAM boxes (box area and IoU with the true object box are reported)
    cost_rank: int  # relative run time (higher first when scheduling)
    memory: bool = True  # False: a bound without memory, run once per seed and reported under every budget
    # whether the class-weight rule (class_weight_counts) can change the run: not for uncompressed exemplars (their
    # real counts are the nominal budget) nor for the bounds; such runs are shared by every rule of a preset
    ruled: bool = True


SETTINGS = {
    s.name: s
    for s in (
        Setting("none", "none (uncompressed)", ("compression=none",), False, 0, ruled=False),
        Setting("downsample", "downsample (whole image)", ("compression=downsample",), False, 0),
        Setting("cam", "CAM, threshold 0.6", ("compression=cam", "threshold=0.6"), True, 1),
        Setting("otsu", "CAM, Otsu threshold", ("compression=cam", "threshold=otsu"), True, 1),
        Setting("calibrated", "CAM, threshold calibrated on held-out images",
                ("compression=cam", "threshold=calibrated"), True, 1),
        Setting("cim", "CIM (threshold 0.6)", ("compression=cim", "threshold=0.6"), True, 2),
        Setting("gt", "ground-truth boxes (ceiling)", ("compression=gt",), True, 1),
        Setting("joint", "joint training (upper bound)", ("learner=joint", "compression=none"), False, 1, False,
                False),
        Setting("finetune", "fine-tuning, no memory (lower bound)", ("learner=finetune", "compression=none"), False,
                0, False, False),
    )
}

#: The settings of the synthetic presets: every exemplar-compression setting that needs no held-out images or
#: true boxes of a real-photo source.
COMPRESSION_SETTINGS = ("none", "downsample", "cam", "otsu", "cim")

#: Class-weight rules (``class_weight_counts``) a preset may compare.
RULES = ("nominal", "real")

#: Budget names in report order.
BUDGETS = ("small", "large")

#: Gaps reported (paired by seed): (a, b) means a - b.
GAPS = (("cim", "none"), ("cim", "cam"), ("cim", "otsu"), ("cim", "downsample"), ("cam", "none"),
        ("otsu", "cam"), ("downsample", "none"), ("joint", "none"), ("none", "finetune"), ("gt", "none"),
        ("gt", "downsample"), ("gt", "cim"), ("calibrated", "none"), ("cim", "calibrated"), ("otsu", "none"),
        ("calibrated", "otsu"))

#: The original paper's figures (average incremental top-1 %, CVPR 2023 CIM, Tables 1-2), for the report.
ORIGINAL = {
    "imagenet100_b0_10_phases": {"setting": "ImageNet-100, B0, 10 phases, 2,000 exemplars",
                                 "none": 76.55, "cam": 77.21, "cim": 77.94},
    "imagenet1000_10_phases_5000": {"setting": "ImageNet-1000, 10 phases, 5,000 exemplars",
                                    "none": 54.72, "cim": 59.48},
    "imagenet1000_10_phases_20000": {"setting": "ImageNet-1000, 10 phases, 20,000 exemplars",
                                     "cim_minus_none": 1.2},
}

#: Learners an ablation can run the settings with (``--learner``); the bounds are learners of their own.
LEARNERS = ("foster", "der")


# ---------------------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    """A size of the ablation: overrides of a bundled config shared by every run, the two budgets (exemplars per
    class at the end, i.e. ``memory_size = per_class * num_classes``) and defaults."""

    name: str
    description: str
    num_classes: int
    overrides: tuple
    budgets: dict  # budget name -> image units per class after the last phase
    seeds: int
    device: str = "cpu"
    jobs: Union[int, None] = None  # None: the CPU cores available
    base_config: str = "synthetic"  # the bundled config the runs start from
    settings: tuple = COMPRESSION_SETTINGS  # what runs unless --settings says otherwise
    needs_data_root: bool = False
    rules: tuple = ()  # class-weight rules compared (each ruled setting runs under each); (): the config's own

    def memory_size(self, budget: str) -> int:
        return int(self.budgets[budget] * self.num_classes)


#: Overrides every ablation run gets (quiet, no TensorBoard, checkpoints only between phases).
COMMON = ("progress=false", "tensorboard=false", "checkpoint_every=0", "workers=0", "fixed_memory=false",
          "compress_ratio=4")


def _data(num_classes: int, train: int, test: int, size: int) -> tuple:
    return (f"data_options.num_classes={num_classes}", f"data_options.train_per_class={train}",
            f"data_options.test_per_class={test}", f"data_options.image_size={size}", f"image_size={size}")


PRESETS = {
    p.name: p
    for p in (
        Preset(
            name="quick",
            description="CI smoke run: 6 classes in 3 phases, 1 epoch per stage, one seed (minutes on a CPU)",
            num_classes=6,
            overrides=_data(6, 16, 8, 32) + (
                "init_cls=2", "increment=2", "backbone=resnet32", "init_epochs=1", "incre_epochs=1",
                "compression_epochs=1", "batch_size=32", "cam_batch_size=64", "cam_update_interval=1",
                "num_meta_iters_per_cls=0.5"),
            budgets={"small": 2, "large": 6},
            seeds=1,
        ),
        Preset(
            name="default",
            description="12 classes in 3 phases of 4, 32x32 images, ResNet-32, no student stage, 5 seeds (CPU, "
                        "about 50 minutes on 2 cores)",
            num_classes=12,
            overrides=_data(12, 100, 40, 32) + (
                "init_cls=4", "increment=4", "backbone=resnet32", "init_epochs=12", "incre_epochs=10",
                "compression_epochs=0", "batch_size=64", "cam_batch_size=128", "cam_update_interval=3",
                "num_meta_iters_per_cls=1"),
            budgets={"small": 2, "large": 8},
            seeds=5,
        ),
        Preset(
            name="gpu",
            description="20 classes in 5 phases of 4, 64x64 images, ResNet-32, 5 seeds (one GPU, a few minutes)",
            num_classes=20,
            overrides=_data(20, 100, 50, 64) + (
                "init_cls=4", "increment=4", "backbone=resnet32", "init_epochs=20", "incre_epochs=15",
                "compression_epochs=0", "batch_size=64", "cam_batch_size=256", "cam_update_interval=5",
                "num_meta_iters_per_cls=2"),
            budgets={"small": 2, "large": 8},
            seeds=5,
            device="cuda",
            jobs=8,
        ),
        Preset(
            name="tinyimagenet",
            description="real photos: 20 Tiny ImageNet classes in 4 phases of 5, the first 150 training images per "
                        "class at 32x32, ResNet-20, 3 seeds, with the joint-training and fine-tuning bounds (CPU, "
                        "about 1 hour on 2 cores)",
            num_classes=20,
            overrides=("data_options.num_classes=20", "data_options.train_per_class=150", "image_size=32",
                       "backbone=resnet20", "init_cls=5", "increment=5", "init_epochs=10", "incre_epochs=8",
                       "compression_epochs=4", "batch_size=64", "cam_batch_size=128", "cam_update_interval=3",
                       "num_meta_iters_per_cls=1"),
            budgets={"small": 2, "large": 10},
            seeds=3,
            base_config="tinyimagenet",
            settings=COMPRESSION_SETTINGS + ("joint", "finetune"),
            needs_data_root=True,
        ),
        Preset(
            name="smallobjects",
            description="real photos where boxes can matter: the 20 classes of a Tiny ImageNet root with the smallest "
                        "true boxes, 100 training images per class at 64x64, 4 phases of 5, ResNet-20, the "
                        "ground-truth-box ceiling and a threshold calibrated on 50 held-out images per phase-0 "
                        "class, both class-weight rules, 3 seeds, with the joint-training and fine-tuning bounds",
            num_classes=20,
            overrides=("data_options.num_classes=null", "data_options.classes=smallest_boxes:20",
                       "data_options.train_per_class=100",
                       "data_options.heldout_per_class=50", "image_size=64", "backbone=resnet20", "init_cls=5",
                       "increment=5", "init_epochs=10", "incre_epochs=8", "compression_epochs=4", "batch_size=64",
                       "cam_batch_size=128", "cam_update_interval=3", "num_meta_iters_per_cls=0.5"),
            budgets={"small": 2, "large": 10},
            seeds=3,
            base_config="tinyimagenet",
            settings=("none", "downsample", "otsu", "calibrated", "cim", "gt", "joint", "finetune"),
            needs_data_root=True,
            rules=RULES,
        ),
    )
}
