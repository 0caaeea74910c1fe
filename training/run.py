"""Command line: class-incremental training with FOSTER + CIM exemplar compression.

    python -m training.run [--dataset NAME] [--data-root PATH] [--config FILE] [--out DIR]
                           [--set key=value ...] [--resume] [--overwrite]

With no arguments it runs the bundled ``synthetic`` config (a few minutes on a 2-core CPU). ``--dataset NAME``
alone picks the bundled config of that name. The run directory (``--out``, default
``runs/<dataset>-<compression>-seed<seed>``) receives ``config.json`` (the resolved config, the seed used, the
device), ``metrics.jsonl``, ``summary.json``, ``accuracy.png``, ``tensorboard/``, ``checkpoint.pt`` and ``memory/`` (the
exemplars, encoded, which the checkpoint references);
``--resume`` continues a killed run from its last checkpoint with the config stored there.

For tests: ``CIM_TRAINING_STOP_AFTER_CHECKPOINTS=N`` (or ``run(..., stop_after_checkpoints=N)``) stops the process
with :class:`Interrupted` right after its N-th checkpoint, like a kill at that moment.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from typing import Sequence, Union

import numpy as np
import torch

from .checkpoint import CHECKPOINT_NAME, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import Config, ConfigError, apply_overrides, config_names, load_config, parse_override, _assign
from .distributed import resolve_runtime
from .learners import Learner, build_learner
from .metrics import MetricsHistory, RunLoggers, evaluate
from .stream import ClassStream

__all__ = ["main", "run", "build_parser", "Interrupted", "seed_everything", "default_out_dir"]

MEMORY_DIR = "memory"  # the exemplar store's shards, inside the run directory

STOP_ENV = "CIM_TRAINING_STOP_AFTER_CHECKPOINTS"
#: Keys that may change when resuming (they do not affect the result on one device).
RESUMABLE_KEYS = ("device", "workers", "progress", "checkpoint_every", "eval_every", "tensorboard", "data_root",
                  "pin_memory", "persistent_workers", "prefetch_factor")


class Interrupted(RuntimeError):
    """Raised by the test hook after the requested number of checkpoints."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.run",
        description="Class-incremental learning with FOSTER + CIM exemplar compression (cim-ext).",
    )
    parser.add_argument("--dataset", help="dataset name; alone, also selects the bundled config of that name "
                        "(synthetic, tinyimagenet, imagenet1000, imagenet100, food101, imagefolder)")
    parser.add_argument("--data-root", help="dataset root directory")
    parser.add_argument("--config", help="JSON config file or bundled config name (default: synthetic)")
    parser.add_argument("--out", help="run directory (default: runs/<dataset>-<compression>-seed<seed>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        nargs="+", help="override a config key (repeatable), e.g. --set init_epochs=5 threshold=otsu")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="start over in an --out that already holds a run")
    parser.add_argument("--repair-memory", action="store_true", help="with --resume: check the exemplar store's "
                        "shards and rebuild damaged classes from the training images")
    return parser


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_out_dir(cfg: Config) -> str:
    return os.path.join("runs", f"{cfg.dataset}-{cfg.compression}-seed{cfg.seed}")


def _flatten(overrides) -> list:
    return [item for group in overrides for item in (group if isinstance(group, list) else [group])]


#: The bundled config a dataset without one of its own starts from: user photo folders take the real-photo config.
BASE_CONFIG_OF = {"imagefolder": "tinyimagenet"}


def _config_from_args(args) -> Config:
    """``--config`` (default: the bundled config named like ``--dataset``, else its :data:`BASE_CONFIG_OF`, else
    ``synthetic``), switched to ``--dataset``, then the ``--set`` overrides. A switched dataset starts with no
    ``data_options``: those of the base config belong to its own source."""
    bundled = args.dataset if args.dataset in config_names() else BASE_CONFIG_OF.get(args.dataset)
    cfg = load_config(args.config or bundled or "synthetic")
    if args.dataset and args.dataset != cfg.dataset:
        _assign(cfg, "dataset", args.dataset, source="--dataset")
        cfg.data_options = {}
    apply_overrides(cfg, _flatten(args.overrides))
    if args.data_root:
        cfg.data_root = args.data_root
    return cfg.validate()


def _resume_config(stored: dict, args) -> Config:
    """The stored config, with only the keys in RESUMABLE_KEYS changeable from the command line."""
    cfg = Config.from_dict(stored)
    for item in _flatten(args.overrides):
        key, value = parse_override(item)
        if key not in RESUMABLE_KEYS:
            raise ConfigError(f"--resume: {key!r} cannot change when resuming (only {', '.join(RESUMABLE_KEYS)}); "
                              "start a new run in another --out instead")
        _assign(cfg, key, value, source="--set")
    if args.data_root:
        cfg.data_root = args.data_root
    return cfg.validate()


def main(argv: Union[Sequence[str], None] = None) -> dict:
    """Entry point of ``python -m training.run``; returns the summary dict."""
    args = build_parser().parse_args(argv)
    try:
        if args.resume:
            if not args.out:
                raise ConfigError("--resume needs --out DIR (the run directory to continue)")
            path = os.path.join(args.out, CHECKPOINT_NAME)
            if not os.path.isfile(path):
                raise ConfigError(f"--resume: no checkpoint at {path}")
            if args.config or args.dataset:
                raise ConfigError("--resume continues with the config stored in the run; drop --config/--dataset")
            checkpoint = load_checkpoint(path)
            cfg = _resume_config(checkpoint["config"], args)
        else:
            checkpoint, cfg = None, _config_from_args(args)
        stop = os.environ.get(STOP_ENV)
        return run(cfg, out_dir=args.out or default_out_dir(cfg), resume=args.resume, overwrite=args.overwrite,
                   stop_after_checkpoints=int(stop) if stop else None, checkpoint=checkpoint)
    except (ConfigError, ValueError, TypeError, FileNotFoundError) as error:
        # configuration, data root and option errors: one clear line, no traceback
        if not isinstance(error, (ConfigError, FileNotFoundError)) and not _is_user_error(error):
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except Interrupted as error:
        print(f"interrupted: {error}", file=sys.stderr)
        raise SystemExit(75) from None


def _is_user_error(error: Exception) -> bool:
    """Errors raised while reading the data root or its options (shown without a traceback)."""
    from .data import DataRootError

    return isinstance(error, DataRootError) or getattr(error, "_cim_user_error", False)


def run(cfg: Config, *, out_dir: str, resume: bool = False, overwrite: bool = False,
        stop_after_checkpoints: Union[int, None] = None, checkpoint: Union[dict, None] = None) -> dict:
    """Run (or resume) the whole class-incremental schedule of ``cfg`` in ``out_dir``; returns the summary.
    ``checkpoint``: the run's checkpoint when the caller has already read it (resume), so that it is read once."""
    from .data import load_source

    cfg.validate()
    checkpoint_path = os.path.join(out_dir, CHECKPOINT_NAME)
    state = None
    if resume:
        state = checkpoint if checkpoint is not None else load_checkpoint(checkpoint_path)
        checkpoint = None
    elif os.path.exists(checkpoint_path) or os.path.exists(os.path.join(out_dir, "summary.json")):
        if not overwrite:
            raise ConfigError(f"{out_dir} already holds a run; pass --resume to continue it, --overwrite to start "
                              "over, or another --out")
        for name in (CHECKPOINT_NAME, "summary.json", "metrics.jsonl"):
            if _is_main_process() and os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
        if _is_main_process():
            shutil.rmtree(os.path.join(out_dir, MEMORY_DIR), ignore_errors=True)

    runtime = resolve_runtime(cfg)
    seed_everything(cfg.seed)
    options = dict(cfg.data_options)
    data_seed = int(options.pop("seed", 0))
    if cfg.image_size is not None:
        options.setdefault("image_size", cfg.image_size)
    try:
        source = load_source(cfg.dataset, cfg.data_root, seed=data_seed, on_bad_image=cfg.on_bad_image, **options)
    except (TypeError, ValueError) as error:
        error._cim_user_error = True  # a bad root or data option: reported in one line by main()
        raise
    source = runtime.prepare_source(source)  # decode_on_device: JPEG files decoded on the device
    image_size = cfg.image_size or source.image_size
    stream = ClassStream(source, init_cls=cfg.init_cls, increment=cfg.increment, order_seed=cfg.class_order_seed)

    history = MetricsHistory()
    counters = {"checkpoints": 0, "epochs_logged": 0, "elapsed": 0.0, "checkpoint_bytes": None,
                "checkpoint_seconds": None}
    loggers = RunLoggers(out_dir, enabled=runtime.is_main, tensorboard=cfg.tensorboard, console=True)
    started = time.perf_counter()

    def save(learner):
        if runtime.is_main:
            begin = time.perf_counter()
            save_checkpoint(checkpoint_path, {
                "version": 2,
                "config": cfg.to_dict(),
                "learner": learner.state_dict(),
                "history": history.state_dict(),
                "counters": {**counters, "elapsed": counters["elapsed"] + time.perf_counter() - started},
                "rng": rng_state(),
            })
            counters["checkpoint_seconds"] = time.perf_counter() - begin
            counters["checkpoint_bytes"] = os.path.getsize(checkpoint_path)
        counters["checkpoints"] += 1
        if stop_after_checkpoints is not None and counters["checkpoints"] >= stop_after_checkpoints:
            raise Interrupted(f"stopped after {counters['checkpoints']} checkpoint(s) (test hook)")

    def on_epoch_end(info):
        counters["epochs_logged"] += 1
        scalars = {f"train/{k}": v for k, v in info.items() if isinstance(v, float)}
        loggers.log_scalars(scalars, counters["epochs_logged"])
        if cfg.checkpoint_every and (info["epoch"] + 1) % cfg.checkpoint_every == 0:
            save(learner)

    learner = build_learner(cfg, stream=stream, runtime=runtime, image_size=image_size, on_epoch_end=on_epoch_end,
                            memory_dir=os.path.join(out_dir, MEMORY_DIR))
    if state is not None:
        learner.load_state_dict(state["learner"])
        history.load_state_dict(state["history"])
        counters.update({k: state["counters"][k] for k in ("epochs_logged", "elapsed")})
        set_rng_state(state["rng"])
        state = None  # the loaded checkpoint is not kept for the rest of the run

    run_info = {
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "device": str(runtime.device),
        "amp": str(runtime.amp_dtype) if runtime.amp_dtype else None,
        "image_size": image_size,
        "class_order": stream.order,
        "num_phases": len(stream),
        "torch": torch.__version__,
    }
    if runtime.is_main:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as handle:
            json.dump(run_info, handle, indent=2)

    start = learner.phase_index + 1 if learner.stage == "done" else learner.phase_index
    try:
        for phase in stream.phases[start:]:
            phase_start = time.perf_counter()
            learner.incremental_train(phase)
            result = learner.eval_task()
            metrics = evaluate(result["predictions"], result["targets"], result["task_classes"], phase=phase.index)
            metrics.extra = _phase_extra(learner, result, time.perf_counter() - phase_start, source)
            history.add(metrics)
            learner.after_task()
            loggers.log_phase(history, extra=_summary_extra(run_info, counters, started, source))
            save(learner)
        summary_extra = _summary_extra(run_info, counters, started, source)
        loggers.finish(history, extra=summary_extra)
        return history.summary(summary_extra, finished=True)
    except Interrupted:
        loggers.close()
        raise


def _is_main_process() -> bool:
    from .distributed import launch_env

    return launch_env()[0] == 0


def _phase_extra(learner: Learner, result: dict, seconds: float, source) -> dict:
    """Per-phase values beside the accuracies: student accuracy, memory size, boxes, wall time."""
    memory = learner.memory
    counts = memory.counts()
    extra = {
        "exemplars": len(memory),
        "exemplars_per_class": (len(memory) / len(counts)) if counts else 0.0,
        "memory_cost": memory.total_cost(),
        "memory_bytes": memory.bytes_held(),  # raw pixels
        "memory_encoded_bytes": memory.encoded_bytes(),  # the same exemplars as the store holds them
        "memory_store_file_bytes": memory.store.file_bytes() if memory.store else None,  # shards, trimmed included
        "memory_source_file_bytes": _source_file_bytes(source.train, memory.indices()),  # what paths point to
        "box_area_fraction": learner.phase_log.get("boxes_area"),
        "box_iou": learner.phase_log.get("box_iou"),  # CAM boxes vs true object boxes (where the source has them)
        "box_iou_whole_image": learner.phase_log.get("box_iou_whole_image"),  # the whole-image box vs the same
        "box_iou_centre_prior": learner.phase_log.get("box_iou_centre_prior"),  # a centred box of the same area
        "box_refreshes": learner.phase_log.get("box_refreshes"),  # cim: box area / IoU at each in-phase refresh
        "phase_seconds": seconds,
    }
    if learner.calibration is not None:
        extra["calibrated_threshold"] = learner.calibration["threshold"]
        extra["calibration"] = learner.calibration
    student = result.get("student_predictions")
    if student is not None and len(result["targets"]):
        extra["student_top1"] = float((student[:, 0] == result["targets"]).double().mean() * 100)
    return extra


def _source_file_bytes(imageset, indices) -> Union[int, None]:
    """Bytes of the image files of the given training images (what the original's memory of paths points to);
    None for in-memory sources."""
    if not hasattr(imageset, "path"):
        return None
    return sum(os.path.getsize(imageset.path(i)) for i in indices)


def _summary_extra(run_info: dict, counters: dict, started: float, source) -> dict:
    return {
        "run": {k: v for k, v in run_info.items() if k != "config"},
        "config": run_info["config"],
        "bad_images": {"train": int(getattr(source.train, "bad_count", 0)),
                       "test": int(getattr(source.test, "bad_count", 0))},
        "wall_seconds": counters["elapsed"] + time.perf_counter() - started,
        "checkpoint": {"bytes": counters["checkpoint_bytes"], "seconds": counters["checkpoint_seconds"]},
    }


if __name__ == "__main__":  # pragma: no cover
    main()
