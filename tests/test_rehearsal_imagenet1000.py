"""A 1000-class rehearsal (slow): ``python -m training.run --dataset imagenet1000`` with the bundled config on a
generated ILSVRC-layout tree, small images, one epoch per stage, through all 10 phases.

Set ``CIM_REHEARSAL_RECORD=path.json`` to keep what it measured (wall seconds, peak RSS, memory and checkpoint
bytes per phase)."""
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 1000, 3, 1


def _ilsvrc_tree(root, size=24):
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c in range(CLASSES):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(size, size + i, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"n{c:08d}_{i}.JPEG", quality=90)


@pytest.mark.slow
def test_imagenet1000_rehearsal_runs_all_ten_phases_within_budget(tmp_path):
    _ilsvrc_tree(tmp_path / "data")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "training.run", "--dataset", "imagenet1000", "--data-root", str(tmp_path / "data"),
               "--out", str(out), "--set", "image_size=16", "init_epochs=1", "incre_epochs=1", "compression_epochs=1",
               "workers=0", "progress=false", "tensorboard=true", "device=cpu", "checkpoint_every=0"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    peak_rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["phases_done"] == 10
    phases = summary["per_phase"]
    assert [p["num_classes"] for p in phases] == list(range(100, 1001, 100))
    for p in phases:
        extra = p["extra"]
        assert extra["memory_cost"] <= 20000 + 1e-6  # memory_size of the bundled config
        assert extra["exemplars"] <= TRAIN_PER_CLASS * p["num_classes"]
        assert 0 < extra["memory_encoded_bytes"] <= extra["memory_store_file_bytes"]
    assert len(summary["final"]["per_task"]) == 10
    assert (out / "accuracy.png").is_file() and any((out / "tensorboard").iterdir())
    record = {
        "command": " ".join(command[1:]),
        "tree": f"{CLASSES} classes x {TRAIN_PER_CLASS} train + {VAL_PER_CLASS} val JPEGs (24 px)",
        "wall_seconds": wall,
        "peak_rss_mib": peak_rss_mib,
        "checkpoint": summary["checkpoint"],
        "per_phase": [{k: p["extra"].get(k) for k in ("exemplars", "memory_cost", "memory_bytes",
                                                       "memory_encoded_bytes", "memory_store_file_bytes",
                                                       "memory_source_file_bytes", "phase_seconds")}
                      for p in phases],
    }
    if os.environ.get("CIM_REHEARSAL_RECORD"):
        with open(os.environ["CIM_REHEARSAL_RECORD"], "w") as handle:
            json.dump(record, handle, indent=1)
