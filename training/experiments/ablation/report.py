"""The ablation's numbers: one record per finished run (read from its summary.json), mean / std over seeds per
condition (budget, or budget and class-weight rule) and setting, gaps paired by seed, and the report dict that
``results/ablation*.json`` holds."""
from __future__ import annotations

import datetime
import math
import os
import statistics
from typing import Sequence, Union

from ...files import read_json
from .plan import Job, job_config
from .runner import TIMING_NAME
from .settings import BUDGETS, COMMON, GAPS, ORIGINAL, SETTINGS, Preset

__all__ = ["collect", "aggregate", "conditions", "compare", "build_report"]


def _mean_or_none(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def collect(jobs: Sequence[Job]) -> tuple[list[dict], list[str]]:
    """One record per finished run (numbers read from its summary.json), and the keys of the missing runs."""
    records, missing = [], []
    for job in jobs:
        summary = read_json(os.path.join(job.run_dir, "summary.json"))
        if not summary or not summary.get("finished"):
            missing.append(job.key)
            continue
        phases = summary.get("per_phase") or []
        extras = [p.get("extra") or {} for p in phases]
        last = extras[-1] if extras else {}
        boxes = SETTINGS[job.setting].boxes
        run = summary.get("run") or {}
        timing = read_json(os.path.join(job.run_dir, TIMING_NAME)) or {}
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


def compare(records: Sequence[dict], baseline: Sequence[dict], *, budgets: Sequence[str],
            rules: Sequence[str] = ()) -> dict:
    """Per condition and memory setting, this ablation's runs minus a baseline's (another learner on the same
    preset), paired by seed: ``{condition: {setting: stats}}``."""
    out = {}
    for name, budget, rule in conditions(budgets, rules):
        pick = lambda rs: {(r["setting"], r["seed"]): r["avg_inc_top1"] for r in rs  # noqa: E731
                           if r["budget"] == budget and r.get("rule") in (rule, None) and r["avg_inc_top1"] is not None}
        ours, theirs = pick(records), pick(baseline)
        by_setting = {}
        for (setting, seed), value in ours.items():
            if (setting, seed) in theirs:
                by_setting.setdefault(setting, []).append(value - theirs[setting, seed])
        out[name] = {setting: _stats(diffs) for setting, diffs in by_setting.items()}
    return out


def build_report(preset: Preset, jobs: Sequence[Job], *, command: str = "", status: Union[dict, None] = None,
                 learner: str = "foster", baseline: Union[dict, None] = None) -> dict:
    """Everything of ``results/ablation*.json``: setup, per-setting statistics, gaps, runs, the original's figures,
    and with ``baseline`` (another learner's report on the same preset) the paired differences to it."""
    records, missing = collect(jobs)
    settings = list(dict.fromkeys(j.setting for j in jobs))
    budgets = list(dict.fromkeys(j.budget for j in jobs if j.budget)) or list(BUDGETS[:1])
    report = {
        "command": command,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "setup": {**_setup(preset, jobs, records), "learner": learner},
        "settings": {name: {"label": SETTINGS[name].label, "overrides": list(SETTINGS[name].overrides)}
                     for name in settings},
        **aggregate(records, settings=settings, budgets=budgets, rules=preset.rules),
        "original": ORIGINAL,
        "runs": records,
        "missing": missing,
    }
    if baseline is not None:
        report["baseline"] = {"learner": baseline.get("setup", {}).get("learner", "foster"),
                              "command": baseline.get("command"),
                              "minus_baseline": compare(records, baseline["runs"], budgets=budgets, rules=preset.rules)}
    if status:
        report["failed"] = {k: v for k, v in status.items() if v.startswith("failed")}
    return report
