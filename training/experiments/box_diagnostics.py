"""Where CIM's boxes come from: CAM boxes of a finished run's network from each activation branch, scored against the
true object boxes.

    python -m training.experiments.box_diagnostics RUN_DIR [RUN_DIR ...] [--out JSON]

For every run (a source with true object boxes: synthetic, Tiny ImageNet) it rebuilds the final network from the
checkpoint and computes, over the training images of every seen class, the boxes the learner would compute
(:func:`training.cim.compute_boxes` at the run's threshold) from

* ``relu``: the ReLU branch (what ``compression=cam`` stores),
* ``rational``: the rational branch with the run's coefficients (what ``compression=cim`` stores),
* ``rational_init``: the rational branch with every coefficient reset to its ReLU fit (``cim_ext.nn.RELU_INIT``),

and reports the mean IoU with the true boxes and the mean box area. ``rational_init`` against ``relu`` measures what
the Padé fit alone changes; ``rational`` against ``rational_init`` what the meta-learnt coefficients change.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.utils.data import DataLoader

from cim_ext.nn import RELU_INIT

from ..cim import CamDataset, compute_boxes
from ..runtime import Runtime
from ..data import build_transform, collate_skip_bad
from ..models import IncrementalNet, network_from_spec, rational_modules
from ..visualize import load_run

__all__ = ["branch_boxes", "main"]

BRANCHES = ("relu", "rational", "rational_init")


def _reset_rationals(network: IncrementalNet) -> None:
    with torch.no_grad():
        for _, module in rational_modules(network):
            module.numerator.copy_(torch.tensor(RELU_INIT["numerator"]))
            module.denominator.copy_(torch.tensor(RELU_INIT["denominator"]))


def branch_boxes(run_dir: str, *, batch_size: int = 256) -> dict:
    """``{branch: {"box_iou", "box_area", "images"}}`` of a finished run (see the module docstring)."""
    view = load_run(run_dir)
    learner = view.learner_state
    truth = getattr(view.source.train, "object_boxes", None)
    if truth is None:
        raise ValueError(f"{run_dir}: the source {view.cfg.dataset!r} has no true object boxes")
    order = view.class_order or list(range(view.source.num_classes))
    seen = order[: learner["network"]["spec"]["fc"][0]]
    label_map = {cls: k for k, cls in enumerate(order)}
    targets = torch.as_tensor(view.source.train.targets)
    indices = torch.nonzero(torch.isin(targets, torch.tensor(seen))).flatten().tolist()
    image_size = view.cfg.image_size or view.source.image_size
    dataset = CamDataset(view.source.train, indices, build_transform("cam", image_size, augment=False), label_map)
    runtime = Runtime(device=torch.device("cpu"))
    results = {}
    for branch in BRANCHES:
        network = network_from_spec(learner["network"]["spec"])
        network.load_state_dict(learner["network"]["state"])
        if branch == "rational_init":
            _reset_rationals(network)
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_skip_bad)
        table = compute_boxes(network, loader, activation="relu" if branch == "relu" else "rational",
                              threshold=view.cfg.cam_threshold, runtime=runtime)
        results[branch] = {"box_iou": float(truth.best_iou(table.indices, table.boxes).nanmean()),
                           "box_area": table.area_fraction(), "images": len(table)}
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m training.experiments.box_diagnostics",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="finished run directories")
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args(argv)
    results = {}
    for run_dir in args.runs:
        results[run_dir] = branch_boxes(run_dir)
        cells = "  ".join(f"{b}: IoU {r['box_iou']:.3f} area {r['box_area']:.3f}" for b, r in results[run_dir].items())
        print(f"{run_dir}: {cells}", flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
