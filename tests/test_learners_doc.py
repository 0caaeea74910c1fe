"""docs/learners.md: its example learner (a replay learner written against the documented interface only) runs
with every compression setting, keeps its memory within budget, and resumes to the same numbers."""
import os
import re

import pytest

from training.config import load_config
from training.run import Interrupted, run

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "learners.md")
TINY = [
    "learner=replay", "data_options.num_classes=6", "data_options.train_per_class=6", "data_options.test_per_class=2",
    "image_size=16", "backbone=resnet8", "init_cls=2", "increment=2", "memory_size=12", "init_epochs=2",
    "incre_epochs=2", "batch_size=8", "meta_batch_size=4", "cam_batch_size=8", "num_meta_iters_per_cls=0.5",
    "cam_update_interval=1", "workers=0", "progress=false", "tensorboard=false", "device=cpu",
]


@pytest.fixture(scope="module")
def replay():
    """The first python block of docs/learners.md, executed (it registers learner=replay)."""
    text = open(DOC).read()
    code = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    namespace = {}
    exec(compile(code, DOC, "exec"), namespace)
    return namespace["Replay"]


@pytest.mark.parametrize("compression", ["none", "cam", "cim"])
def test_the_documented_learner_runs(tmp_path, replay, compression):
    summary = run(load_config("synthetic", TINY + [f"compression={compression}"]), out_dir=str(tmp_path))
    assert summary["finished"] and summary["config"]["learner"] == "replay"
    extra = summary["final"]["extra"]
    assert extra["exemplars"] > 0 and extra["memory_cost"] <= 12 + 1e-9
    if compression == "cim":
        assert extra["box_area_fraction"] is not None


def test_the_documented_learner_resumes(tmp_path, replay):
    settings = TINY + ["compression=cim", "checkpoint_every=1"]
    full = run(load_config("synthetic", settings), out_dir=str(tmp_path / "full"))
    with pytest.raises(Interrupted):
        run(load_config("synthetic", settings), out_dir=str(tmp_path / "cut"), stop_after_checkpoints=4)
    resumed = run(load_config("synthetic", settings), out_dir=str(tmp_path / "cut"), resume=True)
    top1 = lambda s: [p["top1"] for p in s["per_phase"]]  # noqa: E731
    assert top1(resumed) == top1(full)
