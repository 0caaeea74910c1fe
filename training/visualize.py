"""Pictures of a finished (or checkpointed) run: its stored exemplars and its rational activations.

    python -m training.visualize RUN_DIR [--out PNG] [--classes N] [--per-class K] [--seed S] [--curves PNG]

Writes two PNGs (default ``RUN_DIR/exemplars.png`` and ``RUN_DIR/rationals.png``):

* **exemplars**: sampled stored exemplars of ``N`` classes (spread over the phases), one row each: the original
  training image (from the dataset), the CAM its box came from as a heatmap overlay with the box (and, on synthetic
  data, the generator's true object box), the exemplar *as stored* (rebuilt from the memory's packed pixels with
  ``cim_ext.uncompress``, exactly what rehearsal trains on), and its cost, bytes, box area and IoU. Nothing is
  recomputed with the final network: the box, pixels and cost are the memory's, the CAM is the one the learner kept
  when it selected the exemplar (``exemplar_cams`` in the checkpoint). Each row also checks that the stored
  exemplar equals ``cim_ext.compress`` of the dataset image with the stored box (it flags a mismatch, e.g. a
  dataset regenerated with other options).
* **rationals**: every activation site's rational function of the final network, learnt vs its initial ReLU fit
  (``cim_ext.nn.RELU_INIT``), with ReLU for reference, evaluated with ``cim_ext.rational``.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
from typing import Sequence, Union

import torch
import torch.nn.functional as F

import cim_ext
from cim_ext.nn import RELU_INIT

from .files import read_json, save_figure

__all__ = ["load_run", "exemplar_rows", "plot_exemplars", "plot_rationals", "main"]


# ---------------------------------------------------------------------------------------------------- loading
class RunView:
    """What a run directory holds: config, learner state (from ``checkpoint.pt``), memory, data source."""

    def __init__(self, run_dir: str):
        from .checkpoint import CHECKPOINT_NAME, load_checkpoint
        from .config import MEMORY_LEARNERS, Config
        from .exemplar_store import ExemplarStore
        from .learners.base import upgrade_state
        from .memory import ExemplarMemory
        from .policy import memory_mode
        from .run import MEMORY_DIR

        self.run_dir = run_dir
        path = os.path.join(run_dir, CHECKPOINT_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{run_dir}: no {CHECKPOINT_NAME} (visualize needs the run's checkpoint, written "
                                    "after every phase)")
        self.state = load_checkpoint(path)
        self.cfg = Config.from_dict(self.state["config"])
        learner = upgrade_state(self.state["learner"], self.cfg.learner,
                                uses_memory=self.cfg.learner in MEMORY_LEARNERS)
        self.learner_state = learner
        policy = learner["policy"] or {}
        stored = (policy.get("memory") or {}).get("store")
        store = None if stored is None else ExemplarStore(os.path.join(run_dir, MEMORY_DIR), codec=stored["codec"],
                                                          quality=stored["quality"], writer=False)
        self.memory = ExemplarMemory(ratio=self.cfg.compress_ratio, mode=memory_mode(self.cfg.compression),
                                     store=store)
        if policy.get("memory") is not None:
            self.memory.load_state_dict(policy["memory"])
        self.exemplar_cams = policy.get("exemplar_cams") or {}
        self.network_state = (learner.get("network") or {}).get("state") or {}
        self.phase_index = learner.get("phase_index")
        info = read_json(os.path.join(run_dir, "config.json")) or {}
        self.class_order = info.get("class_order")
        self._source = None

    @property
    def source(self):
        """The run's data source, rebuilt from its config as ``training.run`` builds it."""
        if self._source is None:
            from .data import load_source

            cfg = self.cfg
            options = dict(cfg.data_options)
            seed = int(options.pop("seed", 0))
            if cfg.image_size is not None:
                options.setdefault("image_size", cfg.image_size)
            self._source = load_source(cfg.dataset, cfg.data_root, seed=seed, on_bad_image=cfg.on_bad_image,
                                       **options)
        return self._source


def load_run(run_dir: str) -> RunView:
    return RunView(run_dir)


# ---------------------------------------------------------------------------------------------------- exemplars
def pick_classes(view: RunView, count: int) -> list[int]:
    """``count`` stored classes spread evenly over the class order (hence over the phases)."""
    stored = view.memory.classes()
    order = [c for c in (view.class_order or stored) if c in stored] or stored
    if count >= len(order):
        return order
    step = len(order) / count
    return [order[int(k * step)] for k in range(count)]


def _box_iou(a, b) -> float:
    from .cim import box_iou

    return float(box_iou(torch.tensor([a], dtype=torch.int64), torch.tensor([b], dtype=torch.int64))[0])


def _best_true_box(truth, index: int, box) -> Union[tuple, None]:
    """The true box of image ``index`` that best matches ``box`` (None without one)."""
    if truth is None:
        return None
    candidates = truth.of(index)
    if not len(candidates):
        return None
    scores = [_box_iou(box, tuple(int(v) for v in c)) for c in candidates.tolist()]
    return tuple(int(v) for v in candidates[max(range(len(scores)), key=scores.__getitem__)].tolist())


def exemplar_rows(view: RunView, *, classes: int = 6, per_class: int = 2, seed: int = 0) -> list[dict]:
    """One dict per sampled stored exemplar with everything :func:`plot_exemplars` draws."""
    rng = random.Random(seed)
    memory = view.memory
    truth = getattr(view.source.train, "object_boxes", None)
    rows = []
    for label in pick_classes(view, classes):
        exemplars = memory.exemplars(label)
        if not exemplars:
            continue
        stored_images = memory.images([label])  # rebuilt with cim_ext.uncompress from the packed pixels
        positions = sorted(rng.sample(range(len(exemplars)), min(per_class, len(exemplars))))
        cams = view.exemplar_cams.get(label) or view.exemplar_cams.get(str(label))
        cam_rows = {} if cams is None else {int(i): r for r, i in enumerate(cams["indices"].tolist())}
        for pos in positions:
            ex = exemplars[pos]
            original = view.source.train.load(ex.index)
            stored = stored_images[pos]
            box = tuple(int(v) for v in ex.box)
            row = {
                "label": int(label),
                "class_name": view.source.class_names[label] if label < len(view.source.class_names) else str(label),
                "index": int(ex.index),
                "position": pos,
                "count": len(exemplars),
                "original": original,
                "stored": stored,
                "box": box,
                "size": tuple(ex.size),
                "cost": float(ex.cost),
                "bytes": int(memory._classes[label][pos].nbytes),
                "full_bytes": int(stored.numel()),
                "box_area": (box[1] - box[0]) * (box[3] - box[2]) / float(ex.size[0] * ex.size[1]),
                "cam": None if ex.index not in cam_rows else cams["cams"][cam_rows[ex.index]].float(),
                "true_box": _best_true_box(truth, ex.index, box),
            }
            row["iou"] = None if row["true_box"] is None or memory.mode != "cam" else _box_iou(box, row["true_box"])
            if original is None:
                row["check"] = "dataset image unreadable"
            else:
                ratio = memory.effective_ratio
                expected = cim_ext.compress(original[None], torch.tensor([box], dtype=torch.int64), ratio)[0] \
                    if ratio > 1 else original
                row["check"] = "ok" if torch.equal(expected, stored) else "MISMATCH with the dataset image"
            rows.append(row)
    return rows


def _threshold(view: RunView, cam: torch.Tensor, size) -> Union[float, None]:
    threshold = view.cfg.cam_threshold
    if threshold == "otsu":
        return float(cim_ext.otsu_threshold(cam[None].float(), tuple(size))[0])
    return float(threshold)


def _rect(axes, box, colour, style="-", label=None):
    from matplotlib.patches import Rectangle

    y0, y1, x0, x1 = box
    if y1 <= y0 or x1 <= x0:
        return
    axes.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.6,
                             linestyle=style, label=label))


def _show(axes, image: torch.Tensor):
    axes.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
    axes.set_xticks([])
    axes.set_yticks([])


def plot_exemplars(view: RunView, rows: Sequence[dict], path: str) -> str:
    """The exemplar grid PNG (see the module docstring)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cfg, memory = view.cfg, view.memory
    columns = 4
    figure = Figure(figsize=(2.6 * columns + 1.2, 2.35 * max(1, len(rows)) + 0.9), dpi=100)
    FigureCanvasAgg(figure)
    threshold_text = "Otsu" if cfg.cam_threshold == "otsu" else f"{float(cfg.cam_threshold):g}"
    figure.suptitle(
        f"{os.path.basename(os.path.normpath(view.run_dir))}: compression={cfg.compression}, threshold="
        f"{threshold_text}, ratio {cfg.compress_ratio:g}; {len(memory)} exemplars of {len(memory.classes())} "
        f"classes, {memory.bytes_held() / 1024:.1f} KiB held", fontsize=10, y=1 - 0.2 / figure.get_figheight())
    if not rows:
        axes = figure.add_subplot(1, 1, 1)
        axes.axis("off")
        axes.text(0.5, 0.5, "the memory holds no exemplars", ha="center", va="center")
    for r, row in enumerate(rows):
        original, stored = row["original"], row["stored"]
        ax = figure.add_subplot(len(rows), columns, r * columns + 1)
        if original is not None:
            _show(ax, original)
            if row["true_box"] is not None:
                _rect(ax, row["true_box"], "lime", "--")
        ax.set_title(f"{row['class_name']} #{row['index']}: original", fontsize=8)
        ax = figure.add_subplot(len(rows), columns, r * columns + 2)
        if original is not None:
            _show(ax, original)
        if row["cam"] is not None:
            size = row["size"]
            up = F.interpolate(row["cam"][None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
            ax.imshow(up.numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0, interpolation="nearest")
            threshold = _threshold(view, row["cam"], size)
            if threshold is not None and float(up.min()) < threshold < float(up.max()):
                ax.contour(up.numpy(), levels=[threshold], colors="white", linewidths=0.8)
            ax.set_title(f"stored CAM (t={threshold:.2f}) + box", fontsize=8)
        else:
            ax.set_title("no CAM (no box in this mode)" if memory.mode != "cam" else "CAM not kept", fontsize=8)
        _rect(ax, row["box"], "red")
        if row["true_box"] is not None:
            _rect(ax, row["true_box"], "lime", "--")
        ax = figure.add_subplot(len(rows), columns, r * columns + 3)
        _show(ax, stored)
        _rect(ax, row["box"], "red")
        ax.set_title("as stored (cim_ext.uncompress)", fontsize=8)
        ax = figure.add_subplot(len(rows), columns, r * columns + 4)
        ax.axis("off")
        lines = [
            f"exemplar {row['position'] + 1} of {row['count']} (herding order)",
            f"cost {row['cost']:.3f} image",
            f"bytes {row['bytes']} of {row['full_bytes']} ({row['bytes'] / row['full_bytes']:.0%})",
            f"box {row['box']}" if memory.mode == "cam" else f"mode {memory.mode}: no box",
            f"box area {row['box_area']:.1%}" if memory.mode == "cam" else "",
            f"IoU with true box {row['iou']:.2f}" if row["iou"] is not None else "",
            f"check: {row['check']}",
        ]
        ax.text(0.0, 0.5, "\n".join(line for line in lines if line), va="center", fontsize=8,
                color="black" if row["check"] == "ok" else "red", family="monospace")
    figure.text(0.01, 0.005, "red: stored box; dashed green: true object box (best match, where the source has "
                "boxes); white: CAM threshold contour", fontsize=8)
    height = figure.get_figheight()
    figure.subplots_adjust(left=0.02, right=0.99, bottom=0.35 / height, top=1 - 0.75 / height, wspace=0.08,
                           hspace=0.3)
    return save_figure(figure, path)


# ---------------------------------------------------------------------------------------------------- rationals
def rational_sites(network_state: dict) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(site name, numerator, denominator) of every rational in a network state dict, in state order."""
    sites = []
    for key, value in network_state.items():
        if key.endswith(".rational.numerator"):
            name = key[: -len(".rational.numerator")]
            sites.append((name, value.float(), network_state[f"{name}.rational.denominator"].float()))
    return sites


def plot_rationals(view: RunView, path: str, *, span: float = 4.0) -> str:
    """Learnt vs initial rational activation of every site of the final network's newest backbone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sites = rational_sites(view.network_state)
    backbones = sorted({name.split(".")[1] for name, _, _ in sites if name.startswith("backbones.")}, key=int)
    if backbones:
        sites = [s for s in sites if s[0].startswith(f"backbones.{backbones[-1]}.")]
    x = torch.linspace(-span, span, 161)
    init_num = torch.tensor(RELU_INIT["numerator"], dtype=torch.float32)
    init_den = torch.tensor(RELU_INIT["denominator"], dtype=torch.float32)
    initial = cim_ext.rational(x, init_num, init_den)
    panels = len(sites) + 1  # one panel per site, then all the changes together
    columns = min(6, panels)
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(2.3 * columns, 1.9 * rows + 0.7), dpi=90)
    FigureCanvasAgg(figure)
    figure.subplots_adjust(left=0.04, right=0.99, bottom=0.04, top=1 - 0.55 / (1.9 * rows + 0.7), wspace=0.3,
                           hspace=0.45)
    cfg = view.cfg
    note = "" if cfg.compression == "cim" else "; rationals are trained only with compression=cim"
    figure.suptitle(f"{os.path.basename(os.path.normpath(view.run_dir))}: rational activations of the final network, "
                    f"learnt (red) vs initial ReLU fit (blue dashed), ReLU (grey){note}", fontsize=9)
    xs = x.numpy()
    changes = []
    for k, (name, numerator, denominator) in enumerate(sites):
        axes = figure.add_subplot(rows, columns, k + 1)
        learnt = cim_ext.rational(x, numerator, denominator)
        changes.append((name, (learnt - initial).numpy()))
        axes.plot(xs, F.relu(x).numpy(), color="0.7", linewidth=1)
        axes.plot(xs, initial.numpy(), "--", color="tab:blue", linewidth=1)
        axes.plot(xs, learnt.numpy(), color="tab:red", linewidth=1.1)
        short = name.replace("backbones.", "b").replace("stages.", "s")
        axes.set_title(f"{short}  max|Δ| {float((learnt - initial).abs().max()):.3f}", fontsize=7)
        axes.tick_params(labelsize=6)
    axes = figure.add_subplot(rows, columns, len(sites) + 1)
    for name, change in changes:
        axes.plot(xs, change, linewidth=0.8)
    axes.axhline(0.0, color="0.5", linewidth=0.6)
    axes.set_title("learnt − initial, every site" if changes else "no rational activations", fontsize=7)
    axes.tick_params(labelsize=6)
    return save_figure(figure, path)


# ---------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.visualize",
                                     description="Stored exemplars and rational activations of a run.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory (with checkpoint.pt and config.json)")
    parser.add_argument("--out", help="exemplar grid PNG (default: RUN_DIR/exemplars.png)")
    parser.add_argument("--curves", help="rational curves PNG (default: rationals.png beside --out)")
    parser.add_argument("--classes", type=int, default=6, help="classes to show (default 6)")
    parser.add_argument("--per-class", type=int, default=2, help="exemplars per class (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the exemplar sampling")
    return parser


def main(argv: Union[Sequence[str], None] = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.classes < 1 or args.per_class < 1:
        raise SystemExit("error: --classes and --per-class must be >= 1")
    try:
        view = load_run(args.run_dir)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    out = args.out or os.path.join(args.run_dir, "exemplars.png")
    curves = args.curves or os.path.join(os.path.dirname(os.path.abspath(out)), "rationals.png")
    rows = exemplar_rows(view, classes=args.classes, per_class=args.per_class, seed=args.seed)
    plot_exemplars(view, rows, out)
    plot_rationals(view, curves)
    mismatches = sum(1 for row in rows if row["check"] != "ok")
    print(f"wrote {out} ({len(rows)} exemplars of {len({r['label'] for r in rows})} classes"
          f"{f', {mismatches} MISMATCHED' if mismatches else ''}) and {curves}")
    return {"exemplars": out, "rationals": curves, "rows": len(rows), "mismatches": mismatches}


if __name__ == "__main__":  # pragma: no cover
    main()
