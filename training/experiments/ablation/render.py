"""The ablation's report as a markdown page and a plot, and the three output files."""
from __future__ import annotations

import json
import math
import os
from typing import Union

from ...files import save_figure, write_text
from .settings import GAPS, SETTINGS

__all__ = ["render_markdown", "plot_results", "output_paths", "write_outputs"]


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
    learner = setup.get("learner", "foster")
    lines = [f"# CIM ablation on {data} with {learner.upper()} (preset `{setup['preset']}`)", ""]
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
    base = report.get("baseline")
    if base:
        lines += ["", f"## {learner.upper()} − {base['learner'].upper()} (average incremental top-1, same preset, "
                      "paired by seed)", "", f"Baseline: `{base.get('command')}`.", "",
                  "| condition | setting | gap | ahead |", "|---|---|---|---|"]
        for cond, by_setting in base["minus_baseline"].items():
            for name, stats in by_setting.items():
                if stats:
                    wins = sum(1 for v in stats["values"] if v > 0)
                    lines.append(f"| {cond} | {SETTINGS[name].label} | {_pm(stats, signed=True)} | "
                                 f"{wins} of {stats['n']} |")
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
    return save_figure(figure, path)


def output_paths(out_dir: str, preset: str, learner: str = "foster") -> dict:
    """``ablation[-<preset>][-<learner>].{json,md,png}`` (no preset part for ``default``, none for FOSTER)."""
    stem = "ablation" + ("" if preset == "default" else f"-{preset}") + ("" if learner == "foster" else f"-{learner}")
    return {kind: os.path.join(out_dir, f"{stem}.{kind}") for kind in ("json", "md", "png")}


def write_outputs(report: dict, out_dir: str, preset: str, learner: str = "foster") -> dict:
    """Write the json, the markdown page and the plot; returns their paths."""
    paths = output_paths(out_dir, preset, learner)
    write_text(paths["json"], json.dumps(report, indent=1) + "\n")
    plot_results(report, paths["png"])
    write_text(paths["md"], render_markdown(report, png_name=os.path.basename(paths["png"])))
    return paths
