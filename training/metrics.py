"""Class-incremental evaluation metrics and the loggers that write them.

Metrics (no I/O): :func:`evaluate` turns one phase's test predictions into a :class:`PhaseMetrics` (top-1 / top-5
over all seen classes, old / new and per-task accuracy, in percent); :class:`MetricsHistory` keeps the phases and
derives the average incremental accuracy and forgetting; it is checkpointable (``state_dict``).

Loggers (I/O only, each with an ``enabled`` flag so that only rank 0 writes): :class:`ConsoleTable` (plain-text
table), :class:`JsonlLog` (``metrics.jsonl``, one line per phase), :func:`write_summary` (``summary.json``),
:class:`TensorBoardLog` (scalars), :func:`plot_accuracy` (accuracy-per-phase PNG), and :class:`RunLoggers`, which
drives them all for a run directory.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field

import torch

from .files import save_figure, write_text

__all__ = [
    "PhaseMetrics",
    "MetricsHistory",
    "evaluate",
    "ConsoleTable",
    "JsonlLog",
    "TensorBoardLog",
    "RunLoggers",
    "write_summary",
    "plot_accuracy",
]


# --------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------
@dataclass
class PhaseMetrics:
    """Accuracies (percent) of one phase over the test samples of all seen classes.

    ``old`` is None in phase 0; a group without test samples reads None. ``per_task[j]`` is the accuracy on the
    classes introduced in phase j. ``avg_incremental_top1/top5`` (mean of top1/top5 over phases 0..phase) and
    ``forgetting`` (None in phase 0) are filled in by :meth:`MetricsHistory.add`. ``extra``: JSON-ready values the
    learner attaches (e.g. NME accuracy, memory bytes, wall time); numbers among them also go to TensorBoard.
    """

    phase: int
    num_classes: int
    num_samples: int
    top1: float | None
    top5: float | None
    old: float | None
    new: float | None
    per_task: list
    avg_incremental_top1: float | None = None
    avg_incremental_top5: float | None = None
    forgetting: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"PhaseMetrics: unknown fields {sorted(unknown)}")
        return cls(**values)


def _percent(hits, mask):
    count = int(mask.sum())
    return None if count == 0 else 100.0 * float(hits[mask].sum()) / count


def evaluate(outputs, targets, task_classes, *, phase=None, topk=5):
    """Accuracies of one phase.

    Args:
        outputs (Tensor): float logits [N, K] (ranked here), or integer predictions [N, k] ranked best first
            (or [N] top-1 only, then top-5 is None).
        targets (Tensor[N]): integer labels (in the same label space as the predictions).
        task_classes (list of list of int): labels introduced in each phase 0..t (t = current phase); the seen
            classes are their union, old = phases < t, new = phase t.
        phase (int, optional): phase index; default ``len(task_classes) - 1``.
        topk (int): the k of top-k (5); with fewer classes or predictions, top-min(k, K).

    Returns:
        PhaseMetrics with top1, top5, old, new and per_task filled in.
    """
    if not task_classes:
        raise ValueError("task_classes: expected the classes of at least one phase")
    targets = torch.as_tensor(targets).reshape(-1).cpu().to(torch.int64)
    outputs = torch.as_tensor(outputs).detach().cpu()
    if outputs.shape[0] != targets.shape[0]:
        raise ValueError(f"outputs: expected {targets.shape[0]} rows (one per target), got {outputs.shape[0]}")
    if outputs.is_floating_point():
        if outputs.dim() != 2:
            raise ValueError(f"outputs: logits must be [N, K], got {tuple(outputs.shape)}")
        k = min(topk, outputs.shape[1])
        ranked = outputs.topk(k, dim=1).indices if k else outputs.new_zeros(outputs.shape[0], 0, dtype=torch.int64)
        has_topk = True
    else:
        ranked = outputs.to(torch.int64)
        has_topk = ranked.dim() == 2
        ranked = ranked.reshape(ranked.shape[0], -1)[:, :topk]
    top1_hits = (ranked[:, 0] == targets) if ranked.shape[1] else torch.zeros_like(targets, dtype=torch.bool)
    topk_hits = (ranked == targets[:, None]).any(1)
    every = torch.ones_like(targets, dtype=torch.bool)
    phase = len(task_classes) - 1 if phase is None else int(phase)
    task_masks = [torch.isin(targets, torch.tensor(list(classes), dtype=torch.int64)) for classes in task_classes]
    old_mask = torch.zeros_like(every)
    for mask in task_masks[:-1]:
        old_mask |= mask
    return PhaseMetrics(
        phase=phase,
        num_classes=len({int(c) for classes in task_classes for c in classes}),
        num_samples=int(targets.numel()),
        top1=_percent(top1_hits, every),
        top5=_percent(topk_hits, every) if has_topk else None,
        old=_percent(top1_hits, old_mask) if len(task_classes) > 1 else None,
        new=_percent(top1_hits, task_masks[-1]),
        per_task=[_percent(top1_hits, mask) for mask in task_masks],
    )


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


class MetricsHistory:
    """Per-phase metrics of a run, with the derived average incremental accuracy and forgetting."""

    def __init__(self):
        self.phases: list[PhaseMetrics] = []

    def __len__(self):
        return len(self.phases)

    @property
    def last(self):
        return self.phases[-1] if self.phases else None

    def add(self, metrics):
        """Record phase ``metrics.phase`` (== number of phases recorded, or a re-run of a recorded one, which then
        replaces it and drops the later phases) and fill in its derived values. Returns it."""
        if not 0 <= metrics.phase <= len(self.phases):
            raise ValueError(f"add: phase {metrics.phase} after {len(self.phases)} recorded phases")
        del self.phases[metrics.phase:]
        self.phases.append(metrics)
        metrics.avg_incremental_top1 = _mean([m.top1 for m in self.phases])
        metrics.avg_incremental_top5 = _mean([m.top5 for m in self.phases])
        metrics.forgetting = self.forgetting()
        return metrics

    def accuracy_matrix(self):
        """``matrix[l][j]``: accuracy on task j after phase l (j <= l), from the recorded per-task accuracies."""
        return [list(m.per_task) for m in self.phases]

    def forgetting(self, phase=None):
        """Mean over old tasks j < t of (max over phases j..t-1 of the task-j accuracy) - (task-j accuracy at t).

        None in phase 0 (no old task) or when no old task has test samples."""
        matrix = self.accuracy_matrix()
        phase = len(matrix) - 1 if phase is None else phase
        if phase < 1:
            return None
        drops = []
        for task in range(phase):
            before = [matrix[l][task] for l in range(task, phase) if matrix[l][task] is not None]
            now = matrix[phase][task]
            if before and now is not None:
                drops.append(max(before) - now)
        return _mean(drops)

    def summary(self, extra=None, *, finished=False):
        """JSON-ready summary: final metrics, average incremental accuracy, forgetting, every phase, extra."""
        last = self.last
        out = {
            "finished": bool(finished),
            "phases_done": len(self.phases),
            "final": last.to_dict() if last else None,
            "average_incremental_accuracy": {
                "top1": last.avg_incremental_top1 if last else None,
                "top5": last.avg_incremental_top5 if last else None,
            },
            "forgetting": last.forgetting if last else None,
            "accuracy_matrix": self.accuracy_matrix(),
            "per_phase": [m.to_dict() for m in self.phases],
        }
        if extra:
            out.update(extra)
        return out

    def table(self):
        """Plain-text table of all phases."""
        def cell(value, width=7):
            return f"{'-':>{width}}" if value is None else f"{value:>{width}.2f}"

        header = f"{'phase':>5} {'classes':>7} {'top1':>7} {'top5':>7} {'old':>7} {'new':>7} {'avg_inc':>7} " \
                 f"{'forget':>7}  per-task top1"
        lines = [header, "-" * len(header)]
        for m in self.phases:
            tasks = " ".join("-" if v is None else f"{v:.1f}" for v in m.per_task)
            lines.append(f"{m.phase:>5} {m.num_classes:>7} {cell(m.top1)} {cell(m.top5)} {cell(m.old)} "
                         f"{cell(m.new)} {cell(m.avg_incremental_top1)} {cell(m.forgetting)}  {tasks}")
        return "\n".join(lines)

    def state_dict(self):
        return {"phases": [m.to_dict() for m in self.phases]}

    def load_state_dict(self, state):
        self.phases = [PhaseMetrics.from_dict(dict(values)) for values in state["phases"]]


# --------------------------------------------------------------------------------------------------------------
# Loggers
# --------------------------------------------------------------------------------------------------------------
def _json_number(value):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_number(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_number(v) for v in value]
    return value


class ConsoleTable:
    """Prints the whole table after each phase (plain text)."""

    def __init__(self, *, enabled=True, stream=None):
        self.enabled = enabled
        self.stream = stream

    def log(self, history):
        if self.enabled and history.phases:
            print(history.table(), file=self.stream or sys.stdout, flush=True)


class JsonlLog:
    """``metrics.jsonl``: one JSON line per recorded phase, rewritten atomically from the history at each call, so a
    resumed run never duplicates or loses a phase."""

    def __init__(self, path, *, enabled=True):
        self.path = path
        self.enabled = enabled

    def write(self, history):
        if self.enabled:
            write_text(self.path, "".join(json.dumps(_json_number(m.to_dict())) + "\n" for m in history.phases))


def write_summary(path, history, extra=None, *, finished=False, enabled=True):
    """``summary.json`` (atomic): :meth:`MetricsHistory.summary`."""
    if enabled:
        write_text(path, json.dumps(_json_number(history.summary(extra, finished=finished)), indent=2) + "\n")


class TensorBoardLog:
    """TensorBoard scalars via ``torch.utils.tensorboard.SummaryWriter`` (imported only when enabled).

    Phase metrics go under ``accuracy/*``, ``task_accuracy/task_<j>``, ``forgetting`` and ``extra/*`` with the
    phase as step. ``purge_step`` (e.g. the number of phases already done when resuming) hides stale events at
    or after that step.
    """

    def __init__(self, log_dir, *, enabled=True, purge_step=None):
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def log_phase(self, metrics):
        if not self.enabled:
            return
        step = metrics.phase
        values = {
            "accuracy/top1": metrics.top1, "accuracy/top5": metrics.top5, "accuracy/old": metrics.old,
            "accuracy/new": metrics.new, "accuracy/avg_incremental_top1": metrics.avg_incremental_top1,
            "accuracy/avg_incremental_top5": metrics.avg_incremental_top5, "forgetting": metrics.forgetting,
        }
        values.update({f"task_accuracy/task_{j}": v for j, v in enumerate(metrics.per_task)})
        values.update({f"extra/{k}": v for k, v in metrics.extra.items()})
        self.scalars(values, step)

    def scalars(self, values, step):
        """Write the numeric (non-bool, finite) entries of ``values`` at ``step``."""
        if not self.enabled:
            return
        for tag, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def plot_accuracy(history, path, *, title=None):
    """Accuracy per phase (top-1, top-5, old, new against the number of seen classes) as a PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(figure)  # Agg rendering without pyplot or its global backend
    axes = figure.subplots()
    x = [m.num_classes for m in history.phases]
    for key, style in (("top1", "o-"), ("top5", "s--"), ("old", "^:"), ("new", "v:")):
        points = [(c, getattr(m, key)) for c, m in zip(x, history.phases) if getattr(m, key) is not None]
        if points:
            axes.plot([p[0] for p in points], [p[1] for p in points], style, label=key)
    last = history.last
    if title is None and last is not None and last.avg_incremental_top1 is not None:
        title = f"avg incremental top-1 {last.avg_incremental_top1:.2f}%"
    axes.set_title(title or "accuracy per phase")
    axes.set_xlabel("classes seen")
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 100)
    if x:
        axes.set_xticks(sorted(set(x)))
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left")
    figure.tight_layout()
    return save_figure(figure, path)


class RunLoggers:
    """All outputs of a run directory; every method is a no-op when ``enabled`` is False (non-zero ranks).

    Files: ``metrics.jsonl``, ``summary.json``, ``accuracy.png``, TensorBoard events under ``tensorboard/``.

    Args:
        run_dir (str): output directory (created on first write).
        enabled (bool): write anything at all (True on rank 0 only).
        console, tensorboard, plot (bool): switch the console table, TensorBoard and the PNG.
        stream: console stream (default sys.stdout).
        purge_step (int, optional): passed to TensorBoard (phases already done when resuming).
    """

    JSONL = "metrics.jsonl"
    SUMMARY = "summary.json"
    PLOT = "accuracy.png"
    TENSORBOARD = "tensorboard"

    def __init__(self, run_dir, *, enabled=True, console=True, tensorboard=True, plot=True, stream=None,
                 purge_step=None):
        self.run_dir = run_dir
        self.enabled = enabled
        self.plot = plot and enabled
        self.console = ConsoleTable(enabled=console and enabled, stream=stream)
        self.jsonl = JsonlLog(os.path.join(run_dir, self.JSONL), enabled=enabled)
        self.tensorboard = TensorBoardLog(os.path.join(run_dir, self.TENSORBOARD), enabled=tensorboard and enabled,
                                          purge_step=purge_step)

    def log_phase(self, history, extra=None):
        """After ``history.add``: console table, metrics.jsonl, TensorBoard scalars of the last phase, the plot and
        a provisional summary.json (``finished: false``)."""
        if not self.enabled or not history.phases:
            return
        self.console.log(history)
        self.jsonl.write(history)
        self.tensorboard.log_phase(history.last)
        if self.plot:
            plot_accuracy(history, os.path.join(self.run_dir, self.PLOT))
        write_summary(os.path.join(self.run_dir, self.SUMMARY), history, extra, finished=False)

    def log_scalars(self, values, step):
        """Extra TensorBoard scalars (e.g. training losses) at ``step``."""
        self.tensorboard.scalars(values, step)

    def finish(self, history, extra=None):
        """Final summary.json (``finished: true``) and plot; closes TensorBoard."""
        if self.enabled:
            write_summary(os.path.join(self.run_dir, self.SUMMARY), history, extra, finished=True)
            if self.plot and history.phases:
                plot_accuracy(history, os.path.join(self.run_dir, self.PLOT))
        self.close()

    def close(self):
        self.tensorboard.close()
