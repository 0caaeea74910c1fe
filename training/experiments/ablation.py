"""CIM ablation: compressed vs uncompressed exemplars at equal memory, on the embedded synthetic data or on real
photos (Tiny ImageNet).

    python -m training.experiments.ablation [--quick | --gpu | --preset NAME] [--data-root DIR] [--seeds N]
                                            [--out DIR] [--runs DIR] [--device cpu|cuda|auto] [--jobs N]
                                            [--threads N] [--settings a,b] [--budgets small,large]
                                            [--set key=value ...] [--report-only] [--dry-run]

Every (budget, setting, seed) is one ordinary ``training.run`` run (the preset's bundled config, ``synthetic`` or
``tinyimagenet``, plus the preset's and the setting's ``--set`` overrides) in its own run directory under ``--runs``.
Settings, all at the same memory budget in image units (``memory_size``, shared by the seen classes as in the
original protocol):

``none``        plain FOSTER, uncompressed exemplars (cost 1 each);
``downsample``  every exemplar downsampled as a whole (no box), cost 1 / ratio;
``cam``         CAM boxes with the fixed threshold 0.6, box kept at full resolution, the rest downsampled;
``otsu``        the same with a per-image Otsu threshold;
``cim``         the full method: boxes from the rational-branch CAM learnt by the bilevel meta-step (threshold 0.6).

and the two usual bounds, which keep no memory and so run once per seed for all budgets:

``joint``       one network trained on every seen class's images each phase (upper bound);
``finetune``    one network fine-tuned on the new classes' images only (lower bound).

Runs are resumable: a run directory whose ``summary.json`` says ``finished`` is reused (after checking that its
config is the one this command would run), one with a checkpoint is continued with ``--resume``, anything else
starts over. Results go to ``--out`` (default ``results``): ``ablation.json`` (every number), ``ablation.md`` (tables,
the measured gaps, the original paper's figures beside ours) and ``ablation.png``; presets other than ``default``
write ``ablation-<preset>.*``. See docs/ablation.md.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Sequence, Union

__all__ = [
    "SETTINGS",
    "PRESETS",
    "BUDGETS",
    "ORIGINAL",
    "Setting",
    "Preset",
    "Job",
    "plan",
    "run_jobs",
    "collect",
    "aggregate",
    "write_outputs",
    "render_markdown",
    "plot_results",
    "main",
]

TIMING_NAME = "ablation_timing.json"  # wall and CPU seconds of the run, written by the runner
FIRST_SEED = 1993


# ---------------------------------------------------------------------------------------------------- settings
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


# ---------------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Job:
    """One run of the ablation (``budget`` None: a bound without memory, shared by every budget)."""

    preset: str
    budget: Union[str, None]
    setting: str
    seed: int
    overrides: tuple
    run_dir: str
    base_config: str = "synthetic"
    rule: Union[str, None] = None  # the class-weight rule, where the preset compares rules and it matters

    @property
    def key(self) -> str:
        rule = f"-{self.rule}" if self.rule else ""
        return f"{self.budget or 'bound'}{rule}-{self.setting}-seed{self.seed}"


def seeds_of(count: int) -> list[int]:
    return [FIRST_SEED + k for k in range(count)]


def plan(preset: Preset, *, runs_dir: str, seeds: int, settings: Union[Sequence[str], None] = None,
         budgets: Sequence[str] = BUDGETS, device: str = "cpu", extra: Sequence[str] = ()) -> list[Job]:
    """Every run of the ablation, in report order (``settings`` default: the preset's); the bounds run once per
    seed, at no memory; a setting the class-weight rule can change runs under each of the preset's ``rules``."""
    jobs = []
    for name in preset.settings if settings is None else settings:
        setting = SETTINGS[name]
        for budget in budgets if setting.memory else (None,):
            for rule in preset.rules if preset.rules and setting.ruled else (None,):
                for seed in seeds_of(seeds):
                    memory = f"memory_size={preset.memory_size(budget) if budget else 0}"
                    ruling = (f"class_weight_counts={rule}",) if rule else ()
                    overrides = (*preset.overrides, *COMMON, memory, *ruling, *setting.overrides, f"seed={seed}",
                                 f"device={device}", *extra)
                    job = Job(preset.name, budget, name, seed, overrides, "", preset.base_config, rule)
                    jobs.append(dataclasses.replace(job, run_dir=os.path.join(runs_dir, job.key)))
    return sorted(jobs, key=lambda j: (j.budget is None, BUDGETS.index(j.budget) if j.budget else 0))


def job_config(job: Job):
    """The validated :class:`~training.config.Config` of a job (a fresh copy)."""
    return copy.deepcopy(_load_config(job.base_config, job.overrides))


@functools.lru_cache(maxsize=256)
def _load_config(base: str, overrides: tuple):
    from ..config import load_config

    return load_config(base, list(overrides))


# ---------------------------------------------------------------------------------------------------- running
def _read_json(path: str):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None


def _with_defaults(config: dict) -> dict:
    """A stored config with the keys added since it was written at their defaults (which keep the old behaviour)."""
    from ..config import Config, ConfigError

    try:
        return Config.from_dict(config).to_dict() if config else config
    except ConfigError:
        return config  # compared as stored: the differing keys are then named


def _comparable(config: dict) -> dict:
    from ..run import RESUMABLE_KEYS

    return {k: v for k, v in json.loads(json.dumps(config)).items() if k not in RESUMABLE_KEYS}


def job_state(job: Job) -> str:
    """``done`` (finished summary with this job's config), ``resume`` (a checkpoint), ``new``; raises
    ``ValueError`` if a finished run there was made with another config."""
    from ..checkpoint import CHECKPOINT_NAME

    summary = _read_json(os.path.join(job.run_dir, "summary.json"))
    if summary and summary.get("finished"):
        expected = _comparable(job_config(job).to_dict())
        stored = _comparable(_with_defaults(summary.get("config") or {}))
        changed = sorted(k for k in set(expected) | set(stored) if expected.get(k) != stored.get(k))
        if changed:
            raise ValueError(f"{job.run_dir} holds a finished run with another config ({', '.join(changed)}); "
                             "use another --runs directory or delete it")
        return "done"
    if os.path.isfile(os.path.join(job.run_dir, CHECKPOINT_NAME)):
        return "resume"
    return "new"


def _clear_partial(run_dir: str) -> None:
    """Remove the files of a run that never reached its first checkpoint, so that it can start over."""
    for name in ("summary.json", "metrics.jsonl", "config.json", "accuracy.png", TIMING_NAME):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            os.remove(path)


def _command(job: Job, state: str) -> list[str]:
    if state == "resume":
        device = next(o for o in job.overrides if o.startswith("device="))
        return [sys.executable, "-m", "training.run", "--out", job.run_dir, "--resume", "--set", device,
                "progress=false"]
    return [sys.executable, "-m", "training.run", "--config", job.base_config, "--out", job.run_dir, "--set",
            *job.overrides]


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_subprocess(job: Job, state: str, threads: int) -> None:
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
    os.makedirs(job.run_dir, exist_ok=True)
    with open(os.path.join(job.run_dir, "ablation.log"), "a") as log:
        log.write(f"$ {' '.join(_command(job, state))}\n")
        log.flush()
        proc = subprocess.Popen(_command(job, state), stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = _tail(os.path.join(job.run_dir, "ablation.log"))
        raise RuntimeError(f"training.run exited with {proc.returncode}:\n{tail}")
    return usage.ru_utime + usage.ru_stime


def _run_inprocess(job: Job, state: str, threads: int) -> None:
    import torch

    from ..checkpoint import CHECKPOINT_NAME, load_checkpoint
    from ..config import Config
    from ..run import run

    if state == "resume":
        stored = load_checkpoint(os.path.join(job.run_dir, CHECKPOINT_NAME))["config"]
        cfg = Config.from_dict({**stored, "device": job_config(job).device, "progress": False})
    else:
        cfg = job_config(job)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    os.makedirs(job.run_dir, exist_ok=True)
    cpu = time.process_time()
    try:
        with open(os.path.join(job.run_dir, "ablation.log"), "a") as log, contextlib.redirect_stdout(log):
            run(cfg, out_dir=job.run_dir, resume=state == "resume", overwrite=True)
    finally:
        torch.set_num_threads(previous)
    return time.process_time() - cpu


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path) as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError:
        return ""


def run_jobs(jobs: Sequence[Job], *, jobs_in_parallel: int = 1, threads: int = 1, subprocesses: Union[bool, None] = None,
             log=print) -> dict:
    """Run every job not already done; returns {job key: "done" | "ran" | error message}.

    ``jobs_in_parallel`` runs go at once (subprocesses of ``python -m training.run``, each with ``threads`` CPU
    threads); with one at a time they run in this process unless ``subprocesses`` is True. Longer settings start
    first. A failed run is reported and the others go on."""
    status, todo = {}, []
    for job in jobs:
        state = job_state(job)
        if state == "done":
            status[job.key] = "done"
        else:
            todo.append((job, state))
    if not todo:
        return status
    todo.sort(key=lambda item: (-SETTINGS[item[0].setting].cost_rank, item[0].seed, item[0].budget or ""))
    use_subprocess = jobs_in_parallel > 1 if subprocesses is None else subprocesses
    started = time.perf_counter()
    log(f"ablation: {len(todo)} run(s) to do ({len(status)} already done), {jobs_in_parallel} at a time, "
        f"{threads} thread(s) each")

    def one(item):
        job, state = item
        if state == "new":
            _clear_partial(job.run_dir)
        begin = time.perf_counter()
        cpu = (_run_subprocess if use_subprocess else _run_inprocess)(job, state, threads)
        seconds = time.perf_counter() - begin
        timing = _read_json(os.path.join(job.run_dir, TIMING_NAME)) or {"wall_seconds": 0.0, "cpu_seconds": 0.0}
        timing = {"wall_seconds": timing["wall_seconds"] + seconds, "cpu_seconds": timing["cpu_seconds"] + cpu,
                  "threads": threads, "parallel_runs": jobs_in_parallel}
        _atomic_write(os.path.join(job.run_dir, TIMING_NAME), json.dumps(timing) + "\n")
        return seconds, cpu

    finished = 0
    with ThreadPoolExecutor(max_workers=max(1, jobs_in_parallel)) as pool:
        futures = {pool.submit(one, item): item[0] for item in todo}
        for future in as_completed(futures):
            job = futures[future]
            finished += 1
            elapsed = time.perf_counter() - started
            try:
                seconds, cpu = future.result()
            except Exception as error:  # noqa: BLE001 - one failed run must not stop the others
                status[job.key] = f"failed: {error}"
                log(f"[{finished}/{len(todo)}] {job.key} FAILED ({error})")
                continue
            status[job.key] = "ran"
            summary = _read_json(os.path.join(job.run_dir, "summary.json")) or {}
            acc = (summary.get("average_incremental_accuracy") or {}).get("top1")
            eta = elapsed / finished * (len(todo) - finished)
            log(f"[{finished}/{len(todo)}] {job.key}: avg incremental top-1 "
                f"{'-' if acc is None else f'{acc:.2f}'}%, {seconds:.0f} s ({cpu:.0f} CPU s; elapsed "
                f"{elapsed / 60:.1f} min, "
                f"about {eta / 60:.1f} min left)")
    return status


# ---------------------------------------------------------------------------------------------------- results
def _mean_or_none(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def collect(jobs: Sequence[Job]) -> tuple[list[dict], list[str]]:
    """One record per finished run (numbers read from its summary.json), and the keys of the missing runs."""
    records, missing = [], []
    for job in jobs:
        summary = _read_json(os.path.join(job.run_dir, "summary.json"))
        if not summary or not summary.get("finished"):
            missing.append(job.key)
            continue
        phases = summary.get("per_phase") or []
        extras = [p.get("extra") or {} for p in phases]
        last = extras[-1] if extras else {}
        boxes = SETTINGS[job.setting].boxes
        run = summary.get("run") or {}
        timing = _read_json(os.path.join(job.run_dir, TIMING_NAME)) or {}
        records.append({
            "key": job.key,
            "budget": job.budget,
            "rule": job.rule,
            "setting": job.setting,
            "seed": job.seed,
            "run_dir": job.run_dir,
            "avg_inc_top1": (summary.get("average_incremental_accuracy") or {}).get("top1"),
            "last_top1": (summary.get("final") or {}).get("top1"),
            "forgetting": summary.get("forgetting"),
            "top1_per_phase": [p.get("top1") for p in phases],
            "num_classes_per_phase": [p.get("num_classes") for p in phases],
            "exemplars": last.get("exemplars"),
            "exemplars_per_class": last.get("exemplars_per_class"),
            "exemplars_per_class_per_phase": [e.get("exemplars_per_class") for e in extras],
            "memory_cost": last.get("memory_cost"),
            "bytes_held": last.get("memory_bytes"),
            "box_area_fraction": _mean_or_none([e.get("box_area_fraction") for e in extras]) if boxes else None,
            "box_area_per_phase": [e.get("box_area_fraction") for e in extras] if boxes else None,
            "box_iou_per_phase": [e.get("box_iou") for e in extras] if boxes else None,
            "box_iou": _mean_or_none([e.get("box_iou") for e in extras]) if boxes else None,
            "box_iou_whole_image": _mean_or_none([e.get("box_iou_whole_image") for e in extras]) if boxes else None,
            "box_iou_whole_image_per_phase": [e.get("box_iou_whole_image") for e in extras] if boxes else None,
            "box_iou_centre_prior": _mean_or_none([e.get("box_iou_centre_prior") for e in extras]) if boxes else None,
            "box_iou_centre_prior_per_phase": [e.get("box_iou_centre_prior") for e in extras] if boxes else None,
            "calibrated_threshold": last.get("calibrated_threshold"),
            "box_iou_over_training": _iou_over_training(summary, extras) if boxes else None,
            "image_size": run.get("image_size"),
            "num_phases": run.get("num_phases", len(phases)),
            "wall_seconds": summary.get("wall_seconds"),
            "cpu_seconds": timing.get("cpu_seconds"),
        })
    return records, missing


def _iou_over_training(summary: dict, extras: Sequence[dict]) -> Union[dict, None]:
    """{x: box IoU} over a run's training, x = phase + epoch / epochs: the in-phase box refreshes (``cim``) at their
    epoch, and the boxes the memory is built from at the end of each phase (x = phase + 1)."""
    config = summary.get("config") or {}
    points = {}
    for phase, extra in enumerate(extras):
        epochs = config.get("init_epochs" if phase == 0 else "incre_epochs") or 1
        for refresh in extra.get("box_refreshes") or []:
            if refresh.get("box_iou") is not None:
                points[round(phase + refresh["epoch"] / epochs, 4)] = refresh["box_iou"]
        if extra.get("box_iou") is not None:
            points[float(phase + 1)] = extra["box_iou"]
    return points or None


def _over_training_stats(curves) -> Union[dict, None]:
    """Mean / std over seeds of {x: value} curves, at the x of every curve."""
    curves = [c for c in curves if c]
    if not curves:
        return None
    xs = sorted({x for c in curves for x in c})
    columns = [_stats([c[x] for c in curves if x in c]) for x in xs]
    return {"x": xs, "mean": [c["mean"] for c in columns], "std": [c["std"] for c in columns],
            "n": [c["n"] for c in columns]}


def _stats(values) -> Union[dict, None]:
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "values": values}


def _per_phase_stats(lists) -> Union[dict, None]:
    lists = [l for l in lists if l]
    if not lists:
        return None
    length = max(len(l) for l in lists)
    columns = [_stats([l[i] for l in lists if i < len(l)]) for i in range(length)]
    return {"mean": [c["mean"] if c else None for c in columns], "std": [c["std"] if c else None for c in columns]}


SCALARS = ("avg_inc_top1", "last_top1", "forgetting", "exemplars_per_class", "exemplars", "memory_cost",
           "bytes_held", "box_area_fraction", "box_iou", "box_iou_whole_image", "box_iou_centre_prior",
           "calibrated_threshold", "wall_seconds", "cpu_seconds")
PER_PHASE = ("top1_per_phase", "box_iou_per_phase", "box_area_per_phase", "exemplars_per_class_per_phase",
             "box_iou_whole_image_per_phase", "box_iou_centre_prior_per_phase")


def conditions(budgets: Sequence[str], rules: Sequence[str] = ()) -> list[tuple]:
    """(name, budget, rule) of each table of the report: one per budget, or per budget and class-weight rule."""
    return [(f"{budget}-{rule}" if rule else budget, budget, rule) for budget in budgets for rule in (rules or (None,))]


def _paired(records: Sequence[dict], key, a, b) -> Union[dict, None]:
    """Stats of the per-seed differences avg_inc_top1(a) - avg_inc_top1(b), records grouped by ``key(record)``."""
    by_seed = {}
    for r in records:
        group = key(r)
        if group in (a, b) and r["avg_inc_top1"] is not None:
            by_seed.setdefault(r["seed"], {})[group] = r["avg_inc_top1"]
    return _stats([v[a] - v[b] for v in by_seed.values() if a in v and b in v])


def aggregate(records: Sequence[dict], *, settings: Sequence[str] = tuple(SETTINGS),
              budgets: Sequence[str] = BUDGETS, rules: Sequence[str] = ()) -> dict:
    """Mean / std over seeds per condition (budget, or budget and rule: :func:`conditions`) and setting, the
    paired-by-seed gaps of :data:`GAPS`, and with two rules the second minus the first per budget and ruled setting;
    a bound's runs (budget None) count under every budget, a run shared by the rules (rule None) under every rule."""
    results, gaps = {}, {}
    for name, budget, rule in conditions(budgets, rules):
        results[name] = {}
        ours = [r for r in records if r["budget"] in (budget, None) and r.get("rule") in (rule, None)]
        for setting in settings:
            group = [r for r in ours if r["setting"] == setting]
            if not group:
                continue
            entry = {"n": len(group), "seeds": [r["seed"] for r in group]}
            for key in SCALARS:
                entry[key] = _stats([r.get(key) for r in group])
            for key in PER_PHASE:
                entry[key] = _per_phase_stats([r.get(key) for r in group])
            entry["box_iou_over_training"] = _over_training_stats([r.get("box_iou_over_training") for r in group])
            results[name][setting] = entry
        gaps[name] = {}
        for a, b in GAPS:
            stats = _paired(ours, lambda r: r["setting"], a, b)
            if stats is not None:
                gaps[name][f"{a}-{b}"] = stats
    out = {"results": results, "gaps": gaps}
    if len(rules) == 2:
        first, second = rules
        out["rule_gaps"] = {budget: {setting: stats for setting in settings if SETTINGS[setting].ruled and (
            stats := _paired([r for r in records if r["budget"] == budget and r["setting"] == setting],
                             lambda r: r.get("rule"), second, first)) is not None}
            for budget in budgets}
    return out


def _setup(preset: Preset, jobs: Sequence[Job], records: Sequence[dict]) -> dict:
    cfg = job_config(jobs[0]) if jobs else None
    budgets = {}
    for budget in dict.fromkeys(j.budget for j in jobs if j.budget):
        size = preset.memory_size(budget)
        # the memory stores source images at their own size: the uncompressed setting's bytes are the budget's
        held = [r["bytes_held"] for r in records if r["budget"] == budget and r["setting"] == "none"]
        image = cfg.image_size if cfg and cfg.image_size else 32
        budgets[budget] = {"memory_size": size, "per_class_after_last_phase": preset.budgets[budget],
                           "budget_bytes": held[0] if held else size * 3 * image * image}
    return {
        "preset": preset.name,
        "description": preset.description,
        "base_config": preset.base_config,
        "dataset": cfg.dataset if cfg else None,
        "num_classes": preset.num_classes,
        "init_cls": cfg.init_cls if cfg else None,
        "increment": cfg.increment if cfg else None,
        "num_phases": records[0]["num_phases"] if records else None,
        "image_size": cfg.image_size if cfg else None,
        "backbone": cfg.backbone if cfg else None,
        "epochs": {"init": cfg.init_epochs, "incre": cfg.incre_epochs, "student": cfg.compression_epochs}
        if cfg else None,
        "compress_ratio": cfg.compress_ratio if cfg else None,
        "seeds": sorted({j.seed for j in jobs}),
        "budgets": budgets,
        "rules": list(preset.rules),
        "conditions": {name: {"budget": budget, "rule": rule}
                       for name, budget, rule in conditions(list(budgets) or list(BUDGETS[:1]), preset.rules)},
        "overrides": list(preset.overrides) + list(COMMON),
    }


def build_report(preset: Preset, jobs: Sequence[Job], *, command: str = "", status: Union[dict, None] = None) -> dict:
    """Everything of ``results/ablation*.json``: setup, per-setting statistics, gaps, runs, the original's figures."""
    records, missing = collect(jobs)
    settings = list(dict.fromkeys(j.setting for j in jobs))
    budgets = list(dict.fromkeys(j.budget for j in jobs if j.budget)) or list(BUDGETS[:1])
    report = {
        "command": command,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "setup": _setup(preset, jobs, records),
        "settings": {name: {"label": SETTINGS[name].label, "overrides": list(SETTINGS[name].overrides)}
                     for name in settings},
        **aggregate(records, settings=settings, budgets=budgets, rules=preset.rules),
        "original": ORIGINAL,
        "runs": records,
        "missing": missing,
    }
    if status:
        report["failed"] = {k: v for k, v in status.items() if v.startswith("failed")}
    return report


# ---------------------------------------------------------------------------------------------------- markdown
#: A mean box area below this means the CAM boxes were (nearly) all empty.
EMPTY_BOX_AREA = 0.01


def _empty_box_warnings(by_setting: dict) -> list:
    """Markdown lines flagging boxed settings whose boxes were (nearly) empty: their exemplars were then whole-image
    downsampled, so their numbers measure downsampling, not boxed compression."""
    lines = []
    for name, entry in by_setting.items():
        area = entry.get("box_area_fraction")
        if area and area["mean"] < EMPTY_BOX_AREA:
            lines.append(f"\n**Warning: {SETTINGS[name].label} kept (nearly) empty boxes** (mean box area "
                         f"{area['mean']:.4f}): its exemplars were whole-image downsampled, so its row measures "
                         "downsampling, not boxed compression.")
    return lines


def _budget_of(setup: dict, condition: str) -> str:
    return (setup.get("conditions") or {}).get(condition, {}).get("budget", condition)


def _rule_of(setup: dict, condition: str) -> Union[str, None]:
    return (setup.get("conditions") or {}).get(condition, {}).get("rule")


def _pm(stats: Union[dict, None], digits: int = 2, scale: float = 1.0, signed: bool = False) -> str:
    if not stats:
        return "—"
    mean = stats["mean"] * scale
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    if stats.get("std") is None:
        return text
    return f"{text} ± {stats['std'] * scale:.{digits}f}"


def _gap_sentence(gaps: dict, a: str, b: str) -> str:
    stats = gaps.get(f"{a}-{b}")
    if not stats:
        return f"{a} − {b}: not measured"
    spread = f" ± {stats['std']:.2f}" if stats.get("std") is not None else ""
    wins = sum(1 for v in stats["values"] if v > 0)
    return (f"{SETTINGS[a].label} − {SETTINGS[b].label}: **{stats['mean']:+.2f}{spread}** points "
            f"(paired over {stats['n']} seed(s); {a} ahead in {wins} of {stats['n']})")


def render_markdown(report: dict, *, png_name: Union[str, None] = None) -> str:
    """The results as a markdown page: setup, tables per budget, gaps, box IoU per phase, original figures."""
    setup, results, gaps = report["setup"], report["results"], report["gaps"]
    data = "synthetic data" if setup["dataset"] == "synthetic" else f"real photos (`{setup['dataset']}`)"
    lines = [f"# CIM ablation on {data} (preset `{setup['preset']}`)", ""]
    lines.append(f"Produced by `{report.get('command') or 'python -m training.experiments.ablation'}` on "
                 f"{report['created']}. {setup['description']}.")
    lines.append("")
    epochs = setup.get("epochs") or {}
    lines.append(
        f"Setup: `{setup['dataset']}` data, {setup['num_classes']} classes, {setup.get('num_phases')} phases "
        f"(B{setup.get('init_cls')} + {setup.get('increment')} per phase), {setup.get('image_size')}x"
        f"{setup.get('image_size')} images, {setup.get('backbone')}, epochs {epochs.get('init')} / "
        f"{epochs.get('incre')} / student {epochs.get('student')}, compression ratio {setup.get('compress_ratio')}, "
        f"seeds {', '.join(str(s) for s in setup['seeds'])}. Memory budgets in image units (`memory_size`, shared by "
        "the seen classes as in the original): "
        + "; ".join(f"**{b}** = {v['memory_size']} ({v['per_class_after_last_phase']} per class after the last "
                    f"phase, {v['budget_bytes'] / 1024:.0f} KiB of pixels)" for b, v in setup["budgets"].items())
        + ".")
    lines.append("")
    lines.append("Accuracies are top-1 % on the test images of all seen classes, mean ± std over seeds; "
                 "exemplars per class, bytes held and box area after the last phase / averaged over phases; box IoU "
                 "is against the true object box (the generator's, or the dataset's annotation; mean over the "
                 "phases' new-class training images), beside the IoU of the whole-image box (the trivial baseline) "
                 "and of a centred box of the same area as each box (the centre prior: what box size alone buys). "
                 "The bounds keep no memory and run once per seed; their rows repeat under each budget. Runs the "
                 "class-weight rule cannot change (uncompressed exemplars, the bounds) repeat under each rule.")
    for cond, by_setting in results.items():
        info = setup["budgets"].get(_budget_of(setup, cond), {})
        rule = _rule_of(setup, cond)
        ruling = f", class weights `{rule}` (`class_weight_counts={rule}`)" if rule else ""
        lines += ["", f"## Budget `{_budget_of(setup, cond)}`{ruling}: memory_size {info.get('memory_size')} "
                      f"({info.get('per_class_after_last_phase')} images per class at the end)", ""]
        lines.append("| setting | avg incremental top-1 | last-phase top-1 | forgetting | exemplars / class | "
                     "bytes held (KiB) | box area | box IoU | whole-image IoU | centre-prior IoU | runs |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for name, entry in by_setting.items():
            lines.append(
                f"| {SETTINGS[name].label} | {_pm(entry['avg_inc_top1'])} | {_pm(entry['last_top1'])} | "
                f"{_pm(entry['forgetting'])} | {_pm(entry['exemplars_per_class'], 1)} | "
                f"{_pm(entry['bytes_held'], 1, 1 / 1024)} | {_pm(entry['box_area_fraction'], 3)} | "
                f"{_pm(entry['box_iou'], 3)} | {_pm(entry.get('box_iou_whole_image'), 3)} | "
                f"{_pm(entry.get('box_iou_centre_prior'), 3)} | {entry['n']} |")
        ranked = sorted((name for name in by_setting if by_setting[name].get("avg_inc_top1")),
                        key=lambda name: -by_setting[name]["avg_inc_top1"]["mean"])
        if ranked:
            lines += ["", "Ordering by mean: " + " > ".join(f"{name} ({by_setting[name]['avg_inc_top1']['mean']:.2f})"
                                                            for name in ranked) + "."]
        calibrated = (by_setting.get("calibrated") or {}).get("calibrated_threshold")
        if calibrated:
            lines += ["", f"Calibrated threshold (chosen per run at the end of phase 0): {_pm(calibrated, 2)} "
                          f"(per seed {', '.join(f'{v:g}' for v in calibrated['values'])})."]
        lines += _empty_box_warnings(by_setting)
    lines += ["", "## Measured gaps (average incremental top-1, percentage points)", ""]
    for cond in results:
        present = [(a, b) for a, b in GAPS if f"{a}-{b}" in gaps.get(cond, {})]
        if present:
            lines.append(f"- **{cond}**:")
            lines += [f"  - {_gap_sentence(gaps[cond], a, b)}" for a, b in present]
    rule_gaps = report.get("rule_gaps") or {}
    if any(rule_gaps.values()):
        first, second = setup["rules"]
        lines += ["", f"## Class-weight rule: `{second}` − `{first}` (average incremental top-1, paired by seed)", ""]
        lines.append("| budget | setting | gap | ahead |")
        lines.append("|---|---|---|---|")
        for budget, by_setting in rule_gaps.items():
            for name, stats in by_setting.items():
                wins = sum(1 for v in stats["values"] if v > 0)
                lines.append(f"| {budget} | {SETTINGS[name].label} | {_pm(stats, signed=True)} | "
                             f"{wins} of {stats['n']} |")
    iou_rows = [(budget, name, entry["box_iou_per_phase"]) for budget, by_setting in results.items()
                for name, entry in by_setting.items() if entry.get("box_iou_per_phase")]
    if iou_rows:
        phases = max(len(row[2]["mean"]) for row in iou_rows)
        lines += ["", "## Box IoU with the true object box, per phase (mean ± std over seeds)", ""]
        lines.append("| budget | setting | " + " | ".join(f"phase {p}" for p in range(phases)) + " |")
        lines.append("|---|---|" + "---|" * phases)
        for budget, name, per in iou_rows:
            cells = []
            for p in range(phases):
                mean = per["mean"][p] if p < len(per["mean"]) else None
                std = per["std"][p] if p < len(per["std"]) else None
                cells.append("—" if mean is None else (f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"))
            lines.append(f"| {budget} | {SETTINGS[name].label} | " + " | ".join(cells) + " |")
    lines += ["", "## Beside the original paper", ""]
    lines.append("Average incremental top-1 (%). The paper's rows are its published figures (ImageNet, ResNet-18, "
                 f"hundreds of epochs); ours are this run's, on small {data}: compare the *direction and size "
                 "of the gaps*, not the absolute accuracies.")
    lines.append("")
    lines.append("| source | FOSTER / none | CAM fixed threshold | CIM | CIM − none |")
    lines.append("|---|---|---|---|---|")
    orig = report["original"]
    first = orig["imagenet100_b0_10_phases"]
    lines.append(f"| paper: {first['setting']} | {first['none']:.2f} | {first['cam']:.2f} | {first['cim']:.2f} | "
                 f"{first['cim'] - first['none']:+.2f} |")
    second = orig["imagenet1000_10_phases_5000"]
    lines.append(f"| paper: {second['setting']} | {second['none']:.2f} | — | {second['cim']:.2f} | "
                 f"{second['cim'] - second['none']:+.2f} |")
    third = orig["imagenet1000_10_phases_20000"]
    lines.append(f"| paper: {third['setting']} | — | — | — | {third['cim_minus_none']:+.1f} |")
    for budget, by_setting in results.items():
        get = lambda name: (by_setting.get(name) or {}).get("avg_inc_top1")  # noqa: E731
        gap = gaps.get(budget, {}).get("cim-none")
        lines.append(f"| ours: {setup['dataset']}, {budget} budget | {_pm(get('none'))} | {_pm(get('cam'))} | "
                     f"{_pm(get('cim'))} | {_pm(gap, signed=True)} |")
    timing = [(budget, name, entry) for budget, by_setting in results.items() for name, entry in by_setting.items()
              if entry.get("cpu_seconds") or entry.get("wall_seconds")]
    if timing:
        cpu_total = sum(sum(e["cpu_seconds"]["values"]) for _, _, e in timing if e.get("cpu_seconds"))
        lines += ["", "## Cost", "",
                  f"Mean seconds per run (wall as measured by the run, CPU as used by its process); {cpu_total / 60:.1f} "
                  "CPU-minutes in all.", "",
                  "| budget | setting | wall s | CPU s |", "|---|---|---|---|"]
        for budget, name, entry in timing:
            lines.append(f"| {budget} | {SETTINGS[name].label} | {_pm(entry.get('wall_seconds'), 0)} | "
                         f"{_pm(entry.get('cpu_seconds'), 0)} |")
    if png_name:
        lines += ["", f"![ablation plot]({png_name})"]
    if report.get("missing"):
        lines += ["", f"Missing runs (not finished): {', '.join(report['missing'])}."]
    if report.get("failed"):
        lines += ["", "Failed runs: " + "; ".join(f"{k}: {v.splitlines()[0]}" for k, v in report["failed"].items())]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- plot
_COLOURS = {"none": "#7f7f7f", "downsample": "#bcbd22", "cam": "#1f77b4", "otsu": "#17becf", "cim": "#d62728",
            "calibrated": "#9467bd", "gt": "#ff7f0e", "joint": "#2ca02c", "finetune": "#000000"}


def plot_results(report: dict, path: str) -> str:
    """Bars of average incremental top-1 per setting and budget, top-1 per phase per budget, box IoU per phase."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    results = report["results"]
    budgets = [b for b in results if results[b]]
    figure = Figure(figsize=(12, 4 + 3.6 * max(1, math.ceil(len(budgets) / 2))), dpi=100)
    FigureCanvasAgg(figure)
    rows = 1 + max(1, math.ceil(len(budgets) / 2))
    grid = figure.add_gridspec(rows, 2)
    bars = figure.add_subplot(grid[0, 0])
    settings = list(dict.fromkeys(name for b in budgets for name in results[b]))
    width = 0.8 / max(1, len(settings))
    for k, name in enumerate(settings):
        xs, ys, errs = [], [], []
        for i, budget in enumerate(budgets):
            stats = (results[budget].get(name) or {}).get("avg_inc_top1")
            if stats:
                xs.append(i + (k - (len(settings) - 1) / 2) * width)
                ys.append(stats["mean"])
                errs.append(stats["std"] or 0.0)
        bars.bar(xs, ys, width, yerr=errs, capsize=3, label=SETTINGS[name].label, color=_COLOURS.get(name))
    bars.set_xticks(range(len(budgets)))
    bars.set_xticklabels([f"{b} budget" for b in budgets])
    bars.set_ylabel("avg incremental top-1 (%)")
    bars.set_title("equal memory: average incremental accuracy (mean ± std)")
    bars.grid(axis="y", alpha=0.3)
    bars.set_ylim(0, bars.get_ylim()[1] * (1.45 if len(settings) > 5 else 1.0))
    bars.legend(fontsize=7, loc="upper left", ncol=2)
    iou = figure.add_subplot(grid[0, 1])
    styles = {budget: style for budget, style in zip(budgets, ("-", "--", ":", "-."))}
    plotted = False
    for budget in budgets:
        for name, entry in results[budget].items():
            per = entry.get("box_iou_per_phase")
            if not per:
                continue
            xs = [p for p, v in enumerate(per["mean"]) if v is not None]
            iou.errorbar(xs, [per["mean"][p] for p in xs], yerr=[per["std"][p] or 0.0 for p in xs], capsize=2,
                         linestyle=styles[budget], marker="o", color=_COLOURS.get(name),
                         label=f"{SETTINGS[name].label}, {budget}")
            plotted = True
    whole = next((entry["box_iou_whole_image_per_phase"] for budget in budgets for entry in results[budget].values()
                  if (entry.get("box_iou_whole_image_per_phase") or {}).get("mean")), None)
    if whole and any(v is not None for v in whole["mean"]):
        xs = [p for p, v in enumerate(whole["mean"]) if v is not None]
        iou.plot(xs, [whole["mean"][p] for p in xs], color="black", linestyle=":", marker="x",
                 label="whole-image box (trivial baseline)")
        plotted = True
    for budget in budgets:
        entry = results[budget].get("cim") or {}
        over = entry.get("box_iou_over_training")
        if over and len(over["x"]) > len((entry.get("box_iou_per_phase") or {}).get("mean") or []):
            # the rational branch's boxes at every refresh inside a phase; the phase-end boxes sit at x = phase + 1
            iou.plot([x - 1 for x in over["x"]], over["mean"], linestyle=styles[budget], linewidth=0.8,
                     marker=".", color=_COLOURS.get("cim"), alpha=0.6,
                     label=f"{SETTINGS['cim'].label}, {budget}: at each box refresh")
            plotted = True
    iou.set_title("CAM box IoU with the true object box")
    iou.set_xlabel("phase (a box refresh at epoch e of phase p: p - 1 + e / epochs)")
    iou.xaxis.set_major_locator(MaxNLocator(integer=True))
    iou.set_ylabel("IoU")
    iou.set_ylim(0, 1)
    iou.grid(alpha=0.3)
    if plotted:
        iou.legend(fontsize=7)
    for i, budget in enumerate(budgets):
        axes = figure.add_subplot(grid[1 + i // 2, i % 2])
        for name, entry in results[budget].items():
            per = entry.get("top1_per_phase")
            if not per:
                continue
            xs = [p for p, v in enumerate(per["mean"]) if v is not None]
            axes.errorbar(xs, [per["mean"][p] for p in xs], yerr=[per["std"][p] or 0.0 for p in xs], capsize=2,
                          marker="o", color=_COLOURS.get(name), label=SETTINGS[name].label)
        size = report["setup"]["budgets"].get(_budget_of(report["setup"], budget), {}).get("memory_size")
        axes.set_title(f"top-1 per phase, {budget} budget (memory_size {size})")
        axes.set_xlabel("phase")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel("top-1 (%)")
        axes.set_ylim(0, 100)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    return _save_figure(figure, path)


def _save_figure(figure, path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".png")
    os.close(handle)
    try:
        figure.savefig(tmp, format="png")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _atomic_write(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    with os.fdopen(handle, "w") as out:
        out.write(text)
    os.replace(tmp, path)


def output_paths(out_dir: str, preset: str) -> dict:
    stem = "ablation" if preset == "default" else f"ablation-{preset}"
    return {kind: os.path.join(out_dir, f"{stem}.{kind}") for kind in ("json", "md", "png")}


def write_outputs(report: dict, out_dir: str, preset: str) -> dict:
    """Write the json, the markdown page and the plot; returns their paths."""
    paths = output_paths(out_dir, preset)
    _atomic_write(paths["json"], json.dumps(report, indent=1) + "\n")
    plot_results(report, paths["png"])
    _atomic_write(paths["md"], render_markdown(report, png_name=os.path.basename(paths["png"])))
    return paths


# ---------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.experiments.ablation",
        description="CIM ablation: exemplar compression settings at equal memory on the synthetic data.")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", const="quick", dest="preset", help="tiny CI preset")
    size.add_argument("--gpu", action="store_const", const="gpu", dest="preset",
                      help="larger images, more seeds and epochs, for one CUDA GPU")
    size.add_argument("--preset", choices=sorted(PRESETS), help="preset by name (default: default)")
    parser.add_argument("--data-root", help="dataset root of presets on real photos (e.g. a Tiny ImageNet root)")
    parser.add_argument("--seeds", type=int, help="seeds per setting (default: the preset's)")
    parser.add_argument("--out", default="results", help="directory of ablation*.json/md/png (default: results)")
    parser.add_argument("--runs", help="directory of the run directories (default: runs/ablation/<preset>)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), help="device of the runs (default: the preset's)")
    parser.add_argument("--jobs", type=int, help="runs at once (default: the preset's, else the CPU cores)")
    parser.add_argument("--threads", type=int, help="CPU threads per run (default: cores / jobs)")
    parser.add_argument("--settings", help=f"comma-separated subset of {','.join(SETTINGS)} (default: the "
                        "preset's)")
    parser.add_argument("--budgets", help=f"comma-separated subset of {','.join(BUDGETS)}")
    parser.add_argument("--rules", help=f"comma-separated subset of the preset's class-weight rules "
                        f"({','.join(RULES)}) to run now (the report covers every finished run)")
    parser.add_argument("--set", dest="extra", action="append", default=[], nargs="+", metavar="KEY=VALUE",
                        help="extra config override for every run (changes the runs: use a fresh --runs)")
    parser.add_argument("--subprocess", action="store_true", help="run even a single job in a subprocess")
    parser.add_argument("--report-only", action="store_true", help="only aggregate the finished runs")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    return parser


def _choices(text: Union[str, None], valid: Sequence[str], what: str) -> list[str]:
    if not text:
        return list(valid)
    picked = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in picked if t not in valid]
    if bad or not picked:
        raise SystemExit(f"error: --{what}: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(valid)}")
    return [v for v in valid if v in picked]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def main(argv: Union[Sequence[str], None] = None) -> dict:
    args = build_parser().parse_args(argv)
    preset = PRESETS[args.preset or "default"]
    seeds = args.seeds or preset.seeds
    if seeds < 1:
        raise SystemExit("error: --seeds must be >= 1")
    device = args.device or preset.device
    settings = _choices(args.settings, tuple(SETTINGS), "settings") if args.settings else list(preset.settings)
    budgets = _choices(args.budgets, BUDGETS, "budgets")
    extra = [item for group in args.extra for item in group]
    if args.data_root:
        extra.insert(0, f"data_root={os.path.abspath(args.data_root)}")
    elif preset.needs_data_root:
        raise SystemExit(f"error: preset {preset.name!r} runs on {preset.base_config} data: give --data-root DIR")
    runs_dir = args.runs or os.path.join("runs", "ablation", preset.name)
    jobs = plan(preset, runs_dir=runs_dir, seeds=seeds, settings=settings, budgets=budgets, device=device,
                extra=extra)
    if args.rules:
        if not preset.rules:
            raise SystemExit(f"error: --rules: preset {preset.name!r} compares no class-weight rules")
        chosen = _choices(args.rules, preset.rules, "rules")
        to_run = [j for j in jobs if j.rule is None or j.rule in chosen]
    else:
        to_run = jobs
    from ..config import ConfigError

    try:
        job_config(jobs[0])
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    cores = _cores()
    parallel = max(1, args.jobs or preset.jobs or cores)
    threads = max(1, args.threads or cores // parallel)
    command = "python -m training.experiments.ablation " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.dry_run:
        for job in to_run:
            print(f"{job.key}: {job_state(job)}: {' '.join(_command(job, 'new'))}")
        return {"jobs": [dataclasses.asdict(j) for j in jobs]}
    status = None
    if not args.report_only:
        status = run_jobs(to_run, jobs_in_parallel=parallel, threads=threads, subprocesses=args.subprocess or None)
    report = build_report(preset, jobs, command=command.strip(), status=status)
    paths = write_outputs(report, args.out, preset.name)
    print(render_markdown(report))
    print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    if report.get("failed"):
        raise SystemExit(1)
    return report


if __name__ == "__main__":  # pragma: no cover
    main()
