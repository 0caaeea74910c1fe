"""End-to-end: tiny CPU runs of ``training.run`` for every compression mode, resume == uninterrupted, the CLI,
and a generated ImageFolder of JPEG files (with a corrupt one) through the imagenet1000 code path."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from training.config import ConfigError, load_config
from training.run import Interrupted, main, run

TINY = [
    "data_options.num_classes=6", "data_options.train_per_class=6", "data_options.test_per_class=2",
    "image_size=16", "backbone=resnet8", "init_cls=2", "increment=2", "memory_size=12", "init_epochs=1",
    "incre_epochs=1", "compression_epochs=1", "batch_size=8", "meta_batch_size=4", "cam_batch_size=8",
    "num_meta_iters_per_cls=0.5", "cam_update_interval=1", "workers=0", "progress=false", "tensorboard=false",
    "device=cpu",
]


def _tiny(*extra):
    return load_config("synthetic", TINY + list(extra))


def _numbers(summary):
    """The result numbers of a summary (no timings)."""
    phases = []
    for phase in summary["per_phase"]:
        phase = dict(phase)
        phase["extra"] = {k: v for k, v in phase["extra"].items() if "seconds" not in k}
        phases.append(phase)
    return phases


@pytest.mark.parametrize("compression", ["none", "downsample", "cam", "cim"])
def test_end_to_end_each_compression_mode(tmp_path, compression):
    threshold = "otsu" if compression == "cam" else "null"
    summary = run(_tiny(f"compression={compression}", f"threshold={threshold}"), out_dir=str(tmp_path))
    assert summary["finished"] and summary["phases_done"] == 3
    final = summary["final"]
    assert final["num_classes"] == 6 and len(final["per_task"]) == 3
    assert 0 <= final["top1"] <= 100 and summary["average_incremental_accuracy"]["top1"] is not None
    extra = final["extra"]
    assert extra["exemplars"] > 0 and extra["memory_bytes"] > 0
    # budget: memory_size 12 over 6 classes -> 2 images per class; costs stay within it
    assert extra["memory_cost"] <= 12 + 1e-9
    if compression == "none":
        assert extra["exemplars"] == 12
    elif compression == "downsample":
        assert extra["exemplars"] == 6 * 6  # cost 1/4 each: 8 fit per class, but each class has only 6 images
    else:
        assert extra["box_area_fraction"] is not None
    assert "student_top1" in extra
    for name in ("summary.json", "metrics.jsonl", "accuracy.png", "config.json", "checkpoint.pt"):
        assert os.path.isfile(tmp_path / name), name
    # the exemplars live encoded in memory/ (PNG): the checkpoint holds their references, no pixels
    memory_state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["learner"]["policy"]["memory"]
    assert "kept" not in memory_state and memory_state["store"]["codec"] == "png"
    assert sorted(os.listdir(tmp_path / "memory")) == sorted(memory_state["shards"])
    assert 0 < extra["memory_encoded_bytes"] <= extra["memory_store_file_bytes"]
    assert extra["memory_source_file_bytes"] is None  # synthetic images have no files
    with open(tmp_path / "metrics.jsonl") as handle:
        assert len(handle.readlines()) == 3
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["seed"] == 1993 and stored["config"]["compression"] == compression


@pytest.mark.parametrize("learner", ["finetune", "joint"])
def test_bounds_train_one_network_without_memory(tmp_path, monkeypatch, learner):
    from training.checkpoint import load_checkpoint
    from training.learners import LEARNERS

    trained_on = []
    bound = LEARNERS[learner]
    original = bound._classes

    def recording(self, phase):
        classes = original(self, phase)
        trained_on.append(sorted(classes))
        return classes

    monkeypatch.setattr(bound, "_classes", recording)
    summary = run(_tiny(f"learner={learner}", "compression=none", "memory_size=0"), out_dir=str(tmp_path))
    assert summary["finished"] and summary["final"]["num_classes"] == 6
    assert summary["final"]["extra"]["exemplars"] == 0 and "student_top1" not in summary["final"]["extra"]
    spec = load_checkpoint(str(tmp_path / "checkpoint.pt"))["learner"]["network"]["spec"]
    assert spec["kind"] == "incremental" and spec["num_backbones"] == 1 and spec["fc"][0] == 6
    phases = list(dict.fromkeys(map(tuple, trained_on)))  # one entry per phase (every epoch trains on the same)
    assert [len(classes) for classes in phases] == ([2, 4, 6] if learner == "joint" else [2, 2, 2])
    assert len({c for classes in phases for c in classes}) == 6


def test_bounds_need_compression_none():
    with pytest.raises(ConfigError, match="compression: expected 'none' with learner='joint'"):
        _tiny("learner=joint", "compression=cim")


def test_resume_equals_uninterrupted(tmp_path):
    """Kill mid-phase (after the 4th checkpoint: inside phase 1), resume, compare every number of summary.json."""
    settings = ("init_epochs=2", "incre_epochs=2", "compression_epochs=2", "checkpoint_every=1")
    full = run(_tiny(*settings), out_dir=str(tmp_path / "full"))
    with pytest.raises(Interrupted):
        run(_tiny(*settings), out_dir=str(tmp_path / "cut"), stop_after_checkpoints=4)
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert state["learner"]["phase_index"] == 1 and state["learner"]["stage"] in ("boost", "student")
    resumed = run(_tiny(*settings), out_dir=str(tmp_path / "cut"), resume=True)
    assert _numbers(resumed) == _numbers(full)
    on_disk = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert _numbers(on_disk) == _numbers(json.loads((tmp_path / "full" / "summary.json").read_text()))


def test_cli_resume_reads_the_checkpoint_once_and_reports_its_size(tmp_path, monkeypatch):
    import training.checkpoint as checkpoint_module
    import training.runner as runner_module

    out = tmp_path / "cut"
    with pytest.raises(Interrupted):
        run(_tiny("compression=cam"), out_dir=str(out), stop_after_checkpoints=1)
    reads = []
    original = checkpoint_module.load_checkpoint
    counting = lambda path, **kw: reads.append(path) or original(path, **kw)  # noqa: E731
    for module in (checkpoint_module, runner_module):
        monkeypatch.setattr(module, "load_checkpoint", counting)
    summary = main(["--out", str(out), "--resume", "--set", "progress=false"])
    assert summary["finished"] and len(reads) == 1
    assert summary["checkpoint"]["bytes"] == os.path.getsize(out / "checkpoint.pt")
    assert summary["checkpoint"]["seconds"] > 0


def test_cli_and_errors(tmp_path, capsys):
    out = str(tmp_path / "cli")
    args = ["--out", out] + [item for pair in (("--set", s) for s in TINY + ["compression=none"]) for item in pair]
    summary = main(args)
    assert summary["finished"]
    with pytest.raises(SystemExit) as info:  # refuses to overwrite a run silently
        main(args)
    assert info.value.code == 2 and "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # resuming a finished run changes nothing
        main(["--out", out, "--resume", "--set", "init_epochs=5"])
    assert "cannot change when resuming" in capsys.readouterr().err
    assert main(["--out", out, "--resume"])["final"] == summary["final"]
    with pytest.raises(SystemExit) as info:
        main(["--set", "compression=zip"])
    assert info.value.code == 2 and "'cim'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["--dataset", "imagenet1000", "--data-root", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "train/<wnid>" in err


def _jpeg_tree(root, classes=4, per_class=5, size=(20, 26)):
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 2)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, size=(size[0] + i, size[1], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.JPEG", quality=90)
    (root / "train" / "n00000001" / "img0.JPEG").write_bytes(b"not a jpeg")  # corrupt file


def test_imagenet1000_path_with_a_corrupt_jpeg(tmp_path):
    _jpeg_tree(tmp_path / "data")
    cfg = load_config("imagenet1000", [
        f"data_root={tmp_path / 'data'}", "image_size=16", "backbone=resnet8", "init_cls=2", "increment=2",
        "memory_size=8", "init_epochs=1", "incre_epochs=1", "compression_epochs=1", "batch_size=4",
        "meta_batch_size=2", "cam_batch_size=4", "num_meta_iters_per_cls=0.5", "workers=0", "progress=false",
        "tensorboard=false", "device=cpu", "augmentation=original",
    ])
    with pytest.warns(UserWarning, match="img0.JPEG"):
        summary = run(cfg, out_dir=str(tmp_path / "run"))
    assert summary["finished"] and summary["phases_done"] == 2
    assert summary["bad_images"]["train"] == 1
    # honest bytes: the stored exemplars' own image files, beside their raw pixels and their encoded parts
    extra = summary["final"]["extra"]
    assert extra["memory_source_file_bytes"] > 0 and extra["memory_encoded_bytes"] > 0 and extra["memory_bytes"] > 0


def test_unknown_override_is_a_config_error():
    with pytest.raises(ConfigError, match="valid keys"):
        _tiny("epochs=3")
