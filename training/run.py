"""Command line: class-incremental training with CIM exemplar compression (FOSTER, DER or a learner of your own).

    python -m training.run [--dataset NAME] [--data-root PATH] [--config FILE] [--out DIR]
                           [--set key=value ...] [--resume] [--overwrite]

With no arguments it runs the bundled ``synthetic`` config (a few minutes on a 2-core CPU). ``--dataset NAME``
alone picks the bundled config of that name. The run directory (``--out``, default
``runs/<dataset>-<compression>-seed<seed>``) receives ``config.json`` (the resolved config, the seed used, the
device), ``metrics.jsonl``, ``summary.json``, ``accuracy.png``, ``tensorboard/``, ``checkpoint.pt`` and ``memory/`` (the
exemplars, encoded, which the checkpoint references); ``--resume`` continues a stopped run from its last checkpoint
with the config stored there. SIGTERM and SIGINT stop the run at the next batch end after a checkpoint.

Every user mistake ends in one line on stderr and exit code 2, before any expensive work: the arguments and the
config are checked before torch is imported, the run directory before the data are read. For tests:
``CIM_TRAINING_STOP_AFTER_CHECKPOINTS=N`` (or ``run(..., stop_after_checkpoints=N)``) stops the process with
:class:`Interrupted` right after its N-th checkpoint, like a kill at that moment.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from typing import Sequence, Union

from .config import Config, ConfigError, apply_overrides, config_names, load_config, parse_override, _assign
from .safepoints import Interrupted

__all__ = ["main", "run", "build_parser", "Interrupted", "default_out_dir", "MEMORY_DIR", "RESUMABLE_KEYS"]

MEMORY_DIR = "memory"  # the exemplar store's shards, inside the run directory

STOP_ENV = "CIM_TRAINING_STOP_AFTER_CHECKPOINTS"
#: Keys that may change when resuming (they do not affect the result on one device).
RESUMABLE_KEYS = ("device", "workers", "progress", "checkpoint_every", "checkpoint_minutes", "eval_every",
                  "tensorboard", "data_root", "pin_memory", "persistent_workers", "prefetch_factor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.run",
        description="Class-incremental learning with CIM exemplar compression (cim-ext).",
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


def default_out_dir(cfg: Config) -> str:
    return os.path.join("runs", f"{cfg.dataset}-{cfg.compression}-seed{cfg.seed}")


def _flatten(overrides) -> list:
    return [item for group in overrides for item in (group if isinstance(group, list) else [group])]


#: The bundled config a dataset without one of its own starts from: user photo folders take the real-photo config.
BASE_CONFIG_OF = {"imagefolder": "tinyimagenet"}


def _base_name(args) -> str:
    bundled = args.dataset if args.dataset in config_names() else BASE_CONFIG_OF.get(args.dataset)
    return args.config or bundled or "synthetic"


def _config_from_args(args) -> Config:
    """``--config`` (default: the bundled config named like ``--dataset``, else its :data:`BASE_CONFIG_OF`, else
    ``synthetic``), switched to ``--dataset``, then the ``--set`` overrides. A switched dataset starts with no
    ``data_options``: those of the base config belong to its own source."""
    cfg = load_config(_base_name(args))
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


def _check_out_dir(out_dir: str) -> None:
    """An ``--out`` that cannot be created or written, refused before any work."""
    path = os.path.abspath(out_dir)
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(f"--out {out_dir}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "it" if probe == path else f"its parent {probe}"
        raise ConfigError(f"--out {out_dir}: {what} is not writable by this user")


def _finished(out_dir: str) -> Union[dict, None]:
    """The summary of a finished run in ``out_dir``, if it holds one."""
    try:
        with open(os.path.join(out_dir, "summary.json")) as handle:
            summary = json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None
    return summary if summary.get("finished") else None


def _read_checkpoint(path: str) -> dict:
    from .checkpoint import load_checkpoint

    try:
        return load_checkpoint(path)
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ConfigError(f"--resume: cannot read the checkpoint {path} ({str(error).splitlines()[0]}): it is "
                          "truncated or not a cim-ext checkpoint; start over with --overwrite") from None


def main(argv: Union[Sequence[str], None] = None) -> dict:
    """Entry point of ``python -m training.run``; returns the summary dict."""
    args = build_parser().parse_args(argv)
    out_dir = args.out
    try:
        checkpoint = None
        if args.resume:
            if not args.out:
                raise ConfigError("--resume needs --out DIR (the run directory to continue)")
            if args.config or args.dataset:
                raise ConfigError("--resume continues with the config stored in the run; drop --config/--dataset")
            summary = _finished(args.out)
            if summary is not None:
                _resume_config(summary["config"], args)  # the overrides a resume would refuse, refused here too
                average = (summary.get("average_incremental_accuracy") or {}).get("top1")
                print(f"{args.out}: already finished (average incremental top-1 "
                      f"{'-' if average is None else f'{average:.2f}%'}), nothing to do")
                return summary
            from .checkpoint import CHECKPOINT_NAME  # resuming needs torch from here on

            path = os.path.join(args.out, CHECKPOINT_NAME)
            if not os.path.isfile(path):
                raise ConfigError(f"--resume: no checkpoint at {path}"
                                  + ("" if os.path.isdir(args.out) else f" ({args.out} does not exist)"))
            _check_out_dir(args.out)
            checkpoint = _read_checkpoint(path)
            cfg = _resume_config(checkpoint["config"], args)
        else:
            cfg = _config_from_args(args)
            out_dir = args.out or default_out_dir(cfg)
            _check_out_dir(out_dir)
        if args.repair_memory and not args.resume:
            raise ConfigError("--repair-memory repairs a run's exemplar store when resuming: add --resume")
        stop = os.environ.get(STOP_ENV)
        return run(cfg, out_dir=out_dir, resume=args.resume, overwrite=args.overwrite,
                   stop_after_checkpoints=int(stop) if stop else None, checkpoint=checkpoint,
                   base_config=None if args.resume else _base_name(args), repair_memory=args.repair_memory)
    except Interrupted as error:
        print(error, file=sys.stderr)
        raise SystemExit(error.exit_code) from None
    except KeyboardInterrupt:
        print(f"aborted at once; the last checkpoint is intact: resume with --resume --out {out_dir}",
              file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:  # noqa: BLE001 - classified below; internal errors keep their traceback
        known = _one_line(error, out_dir)
        if known is None:
            raise
        message, code = known
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(code) from None


def _one_line(error: Exception, out_dir) -> Union[tuple[str, int], None]:
    """(message, exit code) of the errors a user can act on: configuration, data root and options, unreadable
    images, a non-finite loss, a full disk; None for internal errors (shown with their traceback)."""
    if isinstance(error, (ConfigError, FileNotFoundError)) or getattr(error, "_cim_user_error", False):
        return str(error), 2
    module = sys.modules.get("training.data")
    if module is not None and isinstance(error, (module.DataRootError, module.BadImageError)):
        hint = "; on_bad_image=skip skips unreadable images" if isinstance(error, module.BadImageError) else ""
        return f"{error}{hint}", 2
    steps = sys.modules.get("training.learners.steps")
    if steps is not None and isinstance(error, steps.NonFiniteLoss):
        return (f"{error}; the last checkpoint is intact: resume with --resume --out {out_dir}, or set "
                "on_nonfinite_loss=skip to skip such batches"), 1
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on device ({error.filename or 'writing the run'}); free space, then resume with "
                f"--resume --out {out_dir}"), 1
    return None


def run(cfg: Config, *, out_dir: str, resume: bool = False, overwrite: bool = False,
        stop_after_checkpoints: Union[int, None] = None, checkpoint: Union[dict, None] = None,
        base_config: Union[str, None] = None, repair_memory: bool = False) -> dict:
    """Run (or resume) the whole class-incremental schedule of ``cfg`` in ``out_dir``; returns the summary
    (:func:`training.runner.run_schedule`, imported here so that the command line checks its arguments first)."""
    from .runner import run_schedule

    return run_schedule(cfg, out_dir=out_dir, resume=resume, overwrite=overwrite,
                        stop_after_checkpoints=stop_after_checkpoints, checkpoint=checkpoint, base_config=base_config,
                        repair_memory=repair_memory)


if __name__ == "__main__":  # pragma: no cover
    main()
