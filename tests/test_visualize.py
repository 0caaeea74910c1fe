"""training.visualize: exemplar grid and rational curves from a run directory."""
import json
import os

import pytest
import torch

import cim_ext
from training import visualize
from training.checkpoint import save_checkpoint
from training.config import load_config
from training.data import load_source
from training.memory import ExemplarMemory, compress_exemplars
from training.models import FosterNet

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    with open(path, "rb") as handle:
        return handle.read(8) == PNG


def _fake_run(run_dir, *, compression="cam", data_seed=0, learnt=True):
    """A run directory shaped like training.run's: config.json and a checkpoint with memory, CAMs and network."""
    overrides = ["data_options.num_classes=4", "data_options.train_per_class=6", "data_options.test_per_class=2",
                 f"compression={compression}", "init_cls=2", "increment=2", "backbone=resnet32"]
    cfg = load_config("synthetic", overrides)
    options = dict(cfg.data_options)
    source = load_source("synthetic", seed=0, **{k: v for k, v in options.items() if k != "seed"})
    mode = {"cim": "cam", "cam": "cam"}.get(compression, compression)
    memory = ExemplarMemory(ratio=cfg.compress_ratio, mode=mode)
    cams = {}
    generator = torch.Generator().manual_seed(0)
    for label in range(4):
        indices = [int(i) for i in (source.train.targets == label).nonzero()[0][:3]]
        images = [source.train.load(i) for i in indices]
        boxes = source.train.object_boxes.boxes[indices] if mode == "cam" else None
        memory.add_class(label, compress_exemplars(images, boxes, cfg.compress_ratio, mode, indices=indices,
                                                   label=label))
        if mode == "cam":
            cams[label] = {"indices": torch.tensor(indices), "cams": torch.rand(3, 8, 8, generator=generator).half()}
    net = FosterNet(backbone=cfg.backbone)
    net.grow(4)
    if learnt:
        with torch.no_grad():
            net.backbones[0].act.rational.numerator.add_(0.05)
    stored = cfg.to_dict()
    if data_seed:
        stored["data_options"] = {**stored["data_options"], "seed": data_seed}
    os.makedirs(run_dir, exist_ok=True)
    save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), {
        "version": 2,
        "config": stored,
        "learner": {"learner": "foster", "phase_index": 1,
                    "policy": {"memory": memory.state_dict(), "exemplar_cams": cams},
                    "network": {"spec": net.spec(), "state": net.state_dict()}},
    })
    with open(os.path.join(run_dir, "config.json"), "w") as handle:
        json.dump({"config": stored, "class_order": [2, 0, 3, 1]}, handle)
    return memory


def test_visualize_fake_run_writes_both_pngs(tmp_path):
    run_dir = str(tmp_path / "run")
    memory = _fake_run(run_dir)
    out = str(tmp_path / "pics" / "grid.png")
    result = visualize.main([run_dir, "--out", out, "--classes", "3", "--per-class", "2"])
    assert result["exemplars"] == out and result["rationals"] == str(tmp_path / "pics" / "rationals.png")
    assert _is_png(result["exemplars"]) and _is_png(result["rationals"])
    assert result["rows"] == 6 and result["mismatches"] == 0
    view = visualize.load_run(run_dir)
    assert visualize.pick_classes(view, 2) == [2, 3]  # spread over the class order
    rows = visualize.exemplar_rows(view, classes=4, per_class=3)
    assert len(rows) == 12
    for row in rows:
        stored = memory.images([row["label"]])[row["position"]]
        assert torch.equal(row["stored"], stored)  # the memory's own rebuild, not a recomputation
        assert row["cam"] is not None and row["cam"].shape == (8, 8)
        assert row["iou"] == pytest.approx(1.0)  # fake boxes are the true boxes
        assert row["check"] == "ok"
        assert 0 < row["bytes"] < row["full_bytes"]
    sites = visualize.rational_sites(view.network_state)
    assert len(sites) == 31  # resnet32: stem + 2 per block
    changed = [name for name, numerator, _ in sites if not torch.allclose(numerator, torch.tensor(
        visualize.RELU_INIT["numerator"]))]
    assert changed == ["backbones.0.act"]


def test_visualize_flags_a_dataset_that_differs_from_the_stored_exemplars(tmp_path):
    run_dir = str(tmp_path / "run")
    _fake_run(run_dir, data_seed=5)  # the config now names another synthetic seed than the memory came from
    rows = visualize.exemplar_rows(visualize.load_run(run_dir), classes=2, per_class=1)
    assert [row["check"] for row in rows] == ["MISMATCH with the dataset image"] * 2


def test_visualize_uncompressed_memory(tmp_path):
    run_dir = str(tmp_path / "run")
    _fake_run(run_dir, compression="none", learnt=False)
    view = visualize.load_run(run_dir)
    rows = visualize.exemplar_rows(view, classes=2, per_class=1)
    assert all(row["cam"] is None and row["iou"] is None and row["check"] == "ok" for row in rows)
    assert all(torch.equal(row["stored"], row["original"]) for row in rows)
    result = visualize.main([run_dir, "--classes", "2", "--per-class", "1"])
    assert result["exemplars"] == os.path.join(run_dir, "exemplars.png")
    assert result["rationals"] == os.path.join(run_dir, "rationals.png")
    assert _is_png(result["exemplars"]) and _is_png(result["rationals"])


def test_visualize_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        visualize.main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert "checkpoint.pt" in capsys.readouterr().err


@pytest.mark.slow
def test_visualize_real_tiny_run(tmp_path):
    from training.run import main as run_main

    run_dir = str(tmp_path / "run")
    run_main(["--out", run_dir, "--set", "data_options.num_classes=4", "data_options.train_per_class=8",
              "data_options.test_per_class=2", "init_cls=2", "increment=2", "init_epochs=1", "incre_epochs=1",
              "compression_epochs=1", "compression=cam", "memory_size=8", "progress=false", "tensorboard=false",
              "batch_size=16"])
    result = visualize.main([run_dir, "--classes", "4", "--per-class", "1"])
    assert result["rows"] == 4 and result["mismatches"] == 0
    view = visualize.load_run(run_dir)
    for row in visualize.exemplar_rows(view, classes=4, per_class=1):
        assert row["cam"] is not None  # the learner kept the CAM each stored box came from
        expected = cim_ext.compress(row["original"][None], torch.tensor([row["box"]]), view.cfg.compress_ratio)[0]
        assert torch.equal(row["stored"], expected)
