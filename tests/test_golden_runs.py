"""Refactors change no number: tiny CPU runs of every learner path reproduce, to the last digit, what the code gave
when the values in ``golden/runs.json`` were recorded (accuracies, exemplar counts and costs, box statistics of every
phase, and a float64 checksum of the final network's parameters).

Floats depend on the CPU's kernels, so the comparison runs only where torch and the CPU capability match the
recording; elsewhere it skips and says why. To record again (only when a change is meant to move the numbers, and
say so in its commit): ``python -m tests.test_golden_runs``.
"""
import json
import os
import sys

import pytest
import torch

from training.config import load_config
from training.run import run

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "runs.json")

TINY = [
    "data_options.num_classes=6", "data_options.train_per_class=8", "data_options.test_per_class=3",
    "image_size=16", "backbone=resnet8", "init_cls=2", "increment=2", "memory_size=12", "init_epochs=3",
    "incre_epochs=3", "compression_epochs=1", "batch_size=8", "meta_batch_size=4", "cam_batch_size=8",
    "num_meta_iters_per_cls=1", "cam_update_interval=1", "workers=0", "progress=false", "tensorboard=false",
    "device=cpu", "checkpoint_every=0",
]

#: name -> overrides of the tiny run: every FOSTER compression mode (with and without its student stage), and the
#: two bounds.
SCENARIOS = {
    "foster-none": ["compression=none"],
    "foster-downsample": ["compression=downsample"],
    "foster-cam-otsu": ["compression=cam", "threshold=otsu"],
    "foster-cim": ["compression=cim", "threshold=0.6"],
    "foster-cim-first-order-real": ["compression=cim", "meta_gradient=first_order", "class_weight_counts=real"],
    "foster-cim-no-student": ["compression=cim", "compression_epochs=0"],
    "joint": ["learner=joint", "compression=none"],
    "finetune": ["learner=finetune", "compression=none"],
}

PHASE_KEYS = ("top1", "top5", "old", "new", "per_task")
EXTRA_KEYS = ("exemplars", "memory_cost", "memory_bytes", "box_area_fraction", "box_iou", "student_top1")


def fingerprint() -> dict:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": 1}


def record(name: str, out_dir: str) -> dict:
    """The numbers of one scenario's run, on one CPU thread (float reductions depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = run(load_config("synthetic", TINY + SCENARIOS[name]), out_dir=out_dir)
    finally:
        torch.set_num_threads(threads)
    from training.checkpoint import load_checkpoint

    weights = load_checkpoint(os.path.join(out_dir, "checkpoint.pt"))["learner"]["network"]["state"]
    checksum = sum(float(v.double().abs().sum()) for k, v in sorted(weights.items()) if v.is_floating_point())
    return {
        "phases": [{**{k: p[k] for k in PHASE_KEYS}, **{k: p["extra"].get(k) for k in EXTRA_KEYS}}
                   for p in summary["per_phase"]],
        "average_incremental_top1": summary["average_incremental_accuracy"]["top1"],
        "network_abs_sum": checksum,
    }


def _golden() -> dict:
    with open(GOLDEN) as handle:
        return json.load(handle)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_runs_reproduce_the_recorded_numbers(tmp_path, name):
    golden = _golden()
    if golden["fingerprint"] != fingerprint():
        pytest.skip(f"recorded with {golden['fingerprint']}, this machine is {fingerprint()}: floats may differ")
    assert record(name, str(tmp_path)) == golden["runs"][name]


def write(path: str = GOLDEN) -> None:
    import tempfile

    runs = {}
    for name in SCENARIOS:
        with tempfile.TemporaryDirectory() as tmp:
            runs[name] = record(name, tmp)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        json.dump({"fingerprint": fingerprint(), "runs": runs}, handle, indent=1)
        handle.write("\n")


if __name__ == "__main__":  # pragma: no cover
    write(*sys.argv[1:])
