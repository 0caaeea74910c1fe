"""``python -m training.experiments.ablation``: the command line (see the package docstring)."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Sequence, Union

from ...files import read_json
from .plan import job_config, plan
from .render import render_markdown, write_outputs
from .report import build_report
from .runner import _command, job_state, run_jobs
from .settings import BUDGETS, LEARNERS, PRESETS, RULES, SETTINGS

__all__ = ["build_parser", "main"]


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
    parser.add_argument("--learner", choices=LEARNERS, default="foster",
                        help="learner of the memory settings (default: foster); outputs ablation[-preset]-<learner>.*")
    parser.add_argument("--baseline", help="the ablation*.json of another learner on the same preset: its runs are "
                        "compared with these, paired by seed")
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
    suffix = "" if args.learner == "foster" else f"-{args.learner}"
    runs_dir = args.runs or os.path.join("runs", "ablation", preset.name + suffix)
    jobs = plan(preset, runs_dir=runs_dir, seeds=seeds, settings=settings, budgets=budgets, device=device,
                extra=extra, learner=args.learner)
    baseline = None
    if args.baseline:
        baseline = read_json(args.baseline)
        if not baseline or "runs" not in baseline:
            raise SystemExit(f"error: --baseline: {args.baseline} is not an ablation report (ablation*.json)")
    if args.rules:
        if not preset.rules:
            raise SystemExit(f"error: --rules: preset {preset.name!r} compares no class-weight rules")
        chosen = _choices(args.rules, preset.rules, "rules")
        to_run = [j for j in jobs if j.rule is None or j.rule in chosen]
    else:
        to_run = jobs
    from ...config import ConfigError

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
    report = build_report(preset, jobs, command=command.strip(), status=status, learner=args.learner,
                          baseline=baseline)
    paths = write_outputs(report, args.out, preset.name, args.learner)
    print(render_markdown(report))
    print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    if report.get("failed"):
        raise SystemExit(1)
    return report


if __name__ == "__main__":  # pragma: no cover
    main()
