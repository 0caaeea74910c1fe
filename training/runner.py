"""The whole class-incremental schedule of one run (what ``python -m training.run`` runs): data, class stream,
learner, per-phase metrics and loggers, checkpoints (every ``checkpoint_every`` epochs, every ``checkpoint_minutes``
at a batch end, at every stage and phase end, and before stopping on SIGTERM/SIGINT) and the console."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from typing import Union

import numpy as np
import torch

from .checkpoint import CHECKPOINT_NAME, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import Config, ConfigError, config_names, load_config
from .console import Console, changed_keys
from .distributed import launch_env, resolve_runtime
from .files import write_text
from .learners import Hooks, build_learner
from .memory import class_budget
from .metrics import MetricsHistory, RunLoggers, evaluate
from .run import MEMORY_DIR
from .safepoints import Interrupted, SafePoints
from .stream import ClassStream

__all__ = ["run_schedule", "seed_everything"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _load_source(cfg: Config):
    from .data import load_source

    options = dict(cfg.data_options)
    data_seed = int(options.pop("seed", 0))
    if cfg.image_size is not None:
        options.setdefault("image_size", cfg.image_size)
    try:
        return load_source(cfg.dataset, cfg.data_root, seed=data_seed, on_bad_image=cfg.on_bad_image, **options)
    except (TypeError, ValueError) as error:
        error._cim_user_error = True  # a bad root or data option: reported in one line by main()
        raise


def _check_split(cfg: Config, source) -> None:
    """``init_cls`` / ``increment`` that do not fit the source's classes, refused with the numbers."""
    if cfg.init_cls > source.num_classes:
        raise ConfigError(f"init_cls: {cfg.init_cls} exceeds the {source.num_classes} classes of {source.name!r}")
    left = source.num_classes - cfg.init_cls
    if left and cfg.increment > left:
        raise ConfigError(f"increment: {cfg.increment} exceeds the {left} classes left after init_cls={cfg.init_cls} "
                          f"({source.num_classes} classes in {source.name!r}); the run would have one phase of "
                          f"{left} instead")


def _memory_warning(cfg: Config, stream) -> Union[str, None]:
    """One line when the memory keeps every training image of the first phase's classes (near-joint training)."""
    first = stream.phases[0]
    budget = class_budget(cfg, total_classes=first.total)
    largest = max(stream.train_count(cls) for cls in first.classes)
    if budget < largest:
        return None
    key = "memory_per_class" if cfg.fixed_memory else "memory_size"
    return (f"warning: {key}={getattr(cfg, key)} leaves {budget:g} image units per class after phase 0, and its "
            f"classes have at most {largest} training images: the memory keeps every one of them, which is close to "
            f"joint training, not class-incremental learning; lower {key}")


#: Test hook: ``SIGNAL:N`` (e.g. ``TERM:7``) sends this process that signal after its N-th training batch.
SIGNAL_ENV = "CIM_TRAINING_SIGNAL_AFTER_BATCHES"


def _signal_hook() -> Union[tuple, None]:
    value = os.environ.get(SIGNAL_ENV)
    if not value:
        return None
    name, _, count = value.partition(":")
    return getattr(signal, f"SIG{name.upper()}"), int(count)


def _base_config(cfg: Config, base: Union[str, None]) -> Config:
    name = base or (cfg.dataset if cfg.dataset in config_names() else "synthetic")
    try:
        return load_config(name)
    except ConfigError:
        return Config()


def _clear_run(out_dir: str) -> None:
    for name in (CHECKPOINT_NAME, "summary.json", "metrics.jsonl"):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    shutil.rmtree(os.path.join(out_dir, MEMORY_DIR), ignore_errors=True)


def run_schedule(cfg: Config, *, out_dir: str, resume: bool = False, overwrite: bool = False,
                 stop_after_checkpoints: Union[int, None] = None, checkpoint: Union[dict, None] = None,
                 base_config: Union[str, None] = None, repair_memory: bool = False) -> dict:
    """Run (or resume) the whole class-incremental schedule of ``cfg`` in ``out_dir``; returns the summary.

    ``checkpoint``: the run's checkpoint when the caller has already read it (resume), so that it is read once;
    ``base_config``: the bundled config the run started from (the start block lists the keys set away from it);
    ``repair_memory``: on resume, rebuild damaged exemplar-store classes from the training images first;
    ``stop_after_checkpoints``: a test hook, :class:`Interrupted` right after that many checkpoints."""
    cfg.validate()
    main_process = launch_env()[0] == 0
    checkpoint_path = os.path.join(out_dir, CHECKPOINT_NAME)
    state = None
    if resume:
        state = checkpoint if checkpoint is not None else load_checkpoint(checkpoint_path)
        checkpoint = None
    elif os.path.exists(checkpoint_path) or os.path.exists(os.path.join(out_dir, "summary.json")):
        if not overwrite:
            raise ConfigError(f"{out_dir} already holds a run; pass --resume to continue it, --overwrite to start "
                              "over, or another --out")
        if main_process:
            _clear_run(out_dir)

    runtime = resolve_runtime(cfg)
    seed_everything(cfg.seed)
    console = Console(enabled=runtime.is_main, progress=cfg.progress)
    source = runtime.prepare_source(_load_source(cfg))  # decode_on_device: JPEG files decoded on the device
    _check_split(cfg, source)
    image_size = cfg.image_size or source.image_size
    stream = ClassStream(source, init_cls=cfg.init_cls, increment=cfg.increment, order_seed=cfg.class_order_seed)

    history = MetricsHistory()
    counters = {"checkpoints": 0, "epochs_logged": 0, "elapsed": 0.0, "checkpoint_bytes": None,
                "checkpoint_seconds": None}
    loggers = RunLoggers(out_dir, enabled=runtime.is_main, tensorboard=cfg.tensorboard, console=True,
                         stream=console.lines)
    safe = SafePoints(runtime, minutes=cfg.checkpoint_minutes, log=console.status)
    signal_at = _signal_hook()
    started = time.perf_counter()

    def save():
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
        safe.checkpointed()
        if stop_after_checkpoints is not None and counters["checkpoints"] >= stop_after_checkpoints:
            raise Interrupted(f"interrupted after {counters['checkpoints']} checkpoint(s) (test hook); resume with "
                              f"--resume --out {out_dir}")

    def safe_point(*, saved: bool, batch: str = "") -> None:
        """Checkpoint when due, and stop (after a checkpoint) when a signal asked for it."""
        stop, due = safe.decide()
        if (stop or due) and not saved:
            save()
        if stop:
            where = f"phase {learner.phase_index}, stage {learner.stage}, epoch {learner.epoch + 1}{batch}"
            raise Interrupted(f"interrupted at {where}; resume with --resume --out {out_dir}", safe.exit_code)

    def epoch_end(info):
        counters["epochs_logged"] += 1
        loggers.log_scalars({f"train/{k}": v for k, v in info.items() if isinstance(v, float)},
                            counters["epochs_logged"])
        console.epoch_done(", ".join(f"{k} {info[k]:.3f}" for k in ("train_loss", "student_loss", "test_top1")
                                     if isinstance(info.get(k), float)))
        every = cfg.checkpoint_every and (info["epoch"] + 1) % cfg.checkpoint_every == 0
        if every or info["stage_end"]:
            save()
        safe_point(saved=bool(every or info["stage_end"]))

    def batch_end(done, total):
        console.batch(f"phase {learner.phase_index} {learner.stage} epoch {learner.epoch + 1}", done, total)
        counters["batches"] = counters.get("batches", 0) + 1
        if signal_at is not None and counters["batches"] == signal_at[1]:
            os.kill(os.getpid(), signal_at[0])  # the test hook: a signal arriving during this batch
        safe_point(saved=False, batch=f" (batch {done} of {total})")

    learner = build_learner(cfg, stream=stream, runtime=runtime, image_size=image_size,
                            hooks=Hooks(epoch_end=epoch_end, batch_end=batch_end, status=console.status),
                            memory_dir=os.path.join(out_dir, MEMORY_DIR))
    resumed_at = None
    if state is not None:
        learner.load_state_dict(state["learner"])
        history.load_state_dict(state["history"])
        counters.update({k: state["counters"][k] for k in ("epochs_logged", "elapsed")})
        set_rng_state(state["rng"])
        state = None  # the loaded checkpoint is not kept for the rest of the run
        resumed_at = f"phase {learner.phase_index}, stage {learner.stage}, epoch {learner.epoch}"
        if repair_memory:
            from .memory_repair import repair_memory as repair

            repaired = repair(learner.memory, source.train)
            runtime.barrier()  # the writer's new shards exist before any rank reads them
            console.status(f"memory: {len(repaired)} damaged class(es) rebuilt from the training images"
                           + (f" ({', '.join(map(str, repaired))})" if repaired else ""))

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
        write_text(os.path.join(out_dir, "config.json"), json.dumps(run_info, indent=2))
    console.start(out_dir=out_dir, runtime=runtime, threads=torch.get_num_threads(), cfg=cfg, source=source,
                  stream=stream, changed=changed_keys(cfg, _base_config(cfg, base_config)), resumed_at=resumed_at)
    warning = _memory_warning(cfg, stream) if learner.USES_MEMORY else None
    if warning:
        console.status(warning)
    from .data import BadImageWarning

    console.route_warnings(BadImageWarning)
    safe.install()
    start = learner.phase_index + 1 if learner.stage == "done" else learner.phase_index
    console.open_bar(sum(learner.epochs_in(p) for p in stream.phases), counters["epochs_logged"])
    try:
        for phase in stream.phases[start:]:
            phase_start = time.perf_counter()
            learner.incremental_train(phase)
            console.status(f"phase {phase.index}: evaluating on the test images of {phase.total} classes")
            result = learner.eval_task()
            metrics = evaluate(result["predictions"], result["targets"], result["task_classes"], phase=phase.index)
            metrics.extra = _phase_extra(learner, result, time.perf_counter() - phase_start, source)
            history.add(metrics)
            learner.after_task()
            loggers.log_phase(history, extra=_summary_extra(run_info, counters, started, source))
            save()
            safe_point(saved=True)
        summary_extra = _summary_extra(run_info, counters, started, source)
        loggers.finish(history, extra=summary_extra)
        summary = history.summary(summary_extra, finished=True)
        console.end(_end_line(summary, out_dir))
        return summary
    except BaseException:
        loggers.close()
        raise
    finally:
        safe.restore()
        console.close()
        console.restore_warnings()


def _end_line(summary: dict, out_dir: str) -> str:
    average = (summary.get("average_incremental_accuracy") or {}).get("top1")
    last = (summary.get("final") or {}).get("top1")
    fmt = lambda v: "-" if v is None else f"{v:.2f}%"  # noqa: E731
    return (f"finished: average incremental top-1 {fmt(average)}, last phase {fmt(last)} "
            f"({summary.get('phases_done')} phases, {summary.get('wall_seconds', 0):.0f} s); "
            f"summary in {os.path.join(out_dir, 'summary.json')}")


def _phase_extra(learner, result: dict, seconds: float, source) -> dict:
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
