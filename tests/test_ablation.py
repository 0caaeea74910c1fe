"""training.experiments.ablation: plan, resumability, aggregation on fake run summaries, and a tiny real run."""
import json
import os

import pytest

from training.experiments import ablation as ab
from training.experiments.ablation import render, report, runner


def _fake_summary(job, acc, *, phases=3, boxes=True, config=None):
    per_phase = []
    for p in range(phases):
        extra = {"exemplars": 10 + p, "exemplars_per_class": 5.0 - p, "memory_cost": 12.0, "memory_bytes": 30000 + p,
                 "box_area_fraction": 0.3 if boxes else None, "box_iou": (0.2 + 0.1 * p) if boxes else None,
                 "box_refreshes": [{"epoch": 1, "box_area": 0.5, "box_iou": 0.1 * p}] if boxes else None}
        per_phase.append({"phase": p, "num_classes": 2 * (p + 1), "top1": acc + 10 - 5 * p, "extra": extra})
    return {
        "finished": True,
        "average_incremental_accuracy": {"top1": acc, "top5": 99.0},
        "final": {"top1": acc - 5},
        "forgetting": 3.0,
        "per_phase": per_phase,
        "run": {"image_size": 32, "num_phases": phases},
        "config": config if config is not None else ab.job_config(job).to_dict(),
        "wall_seconds": 12.5,
    }


def _write(path, payload):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(payload, handle)


def test_plan_covers_every_setting_budget_and_seed(tmp_path):
    preset = ab.PRESETS["default"]
    jobs = ab.plan(preset, runs_dir=str(tmp_path), seeds=3)
    assert len(jobs) == len(ab.COMPRESSION_SETTINGS) * len(ab.BUDGETS) * 3
    assert len({j.run_dir for j in jobs}) == len(jobs)
    assert sorted({j.seed for j in jobs}) == [1993, 1994, 1995]
    jobs = [j for j in jobs if j.seed == 1993]  # (config loading is slowish: check one seed)
    for job in jobs:
        cfg = ab.job_config(job)
        assert cfg.memory_size == preset.budgets[job.budget] * preset.num_classes
        assert cfg.seed == job.seed and cfg.tensorboard is False and cfg.fixed_memory is False
    by = {(j.budget, j.setting): ab.job_config(j) for j in jobs}
    assert by["small", "none"].compression == "none"
    assert by["small", "downsample"].compression == "downsample"
    assert by["small", "cam"].compression == "cam" and by["small", "cam"].threshold == 0.6
    assert by["small", "otsu"].compression == "cam" and by["small", "otsu"].threshold == "otsu"
    assert by["small", "cim"].compression == "cim"
    assert by["small", "none"].memory_size < by["large", "none"].memory_size


@pytest.mark.parametrize("name", sorted(ab.PRESETS))
def test_presets_are_valid_configs(name, tmp_path):
    preset = ab.PRESETS[name]
    job = ab.plan(preset, runs_dir=str(tmp_path), seeds=1, device=preset.device)[0]
    cfg = ab.job_config(job)
    options = cfg.data_options
    assert cfg.dataset == preset.base_config
    # the preset's classes: the first N, or N chosen by a rule
    assert options.get("num_classes") == preset.num_classes or (
        options["num_classes"] is None and options["classes"].endswith(f":{preset.num_classes}"))
    assert preset.seeds >= (1 if name == "quick" else 3)


def test_bounds_run_once_per_seed_and_count_under_every_budget(tmp_path):
    preset = ab.PRESETS["tinyimagenet"]
    jobs = ab.plan(preset, runs_dir=str(tmp_path / "runs"), seeds=2)
    assert len(jobs) == (len(ab.COMPRESSION_SETTINGS) * len(ab.BUDGETS) + 2) * 2
    bounds = [j for j in jobs if not ab.SETTINGS[j.setting].memory]
    assert {j.key for j in bounds} == {f"bound-{s}-seed{seed}" for s in ("joint", "finetune") for seed in (1993, 1994)}
    cfg = ab.job_config(bounds[0])
    assert cfg.learner in ("joint", "finetune") and cfg.compression == "none" and cfg.memory_size == 0
    assert cfg.dataset == "tinyimagenet" and cfg.data_options["train_per_class"] == 150
    accuracy = {"joint": 60.0, "finetune": 20.0, "none": 40.0}
    for job in jobs:
        if job.setting in accuracy:
            acc = accuracy[job.setting] + (job.seed - 1993) + (5.0 if job.budget == "large" else 0.0)
            _write(os.path.join(job.run_dir, "summary.json"), _fake_summary(job, acc, boxes=False, config={}))
    report = ab.build_report(preset, jobs)
    for budget, none in (("small", 40.5), ("large", 45.5)):
        assert report["results"][budget]["joint"]["avg_inc_top1"]["mean"] == pytest.approx(60.5)
        assert report["results"][budget]["none"]["avg_inc_top1"]["mean"] == pytest.approx(none)
        assert report["gaps"][budget]["none-finetune"]["mean"] == pytest.approx(none - 20.5)
    page = ab.render_markdown(report)
    assert "real photos (`tinyimagenet`)" in page and "joint training (upper bound)" in page


@pytest.mark.parametrize("name", ["default", "tinyimagenet"])
def test_run_command_builds_the_jobs_config(name, tmp_path):
    from training.run import _config_from_args, build_parser

    job = ab.plan(ab.PRESETS[name], runs_dir=str(tmp_path), seeds=1, settings=["cim"], budgets=["small"])[0]
    command = runner._command(job, "new")
    assert command[1:3] == ["-m", "training.run"]
    assert _config_from_args(build_parser().parse_args(command[3:])).to_dict() == ab.job_config(job).to_dict()


def test_real_photo_preset_needs_a_data_root(tmp_path):
    with pytest.raises(SystemExit, match="--data-root"):
        ab.main(["--preset", "tinyimagenet", "--dry-run", "--runs", str(tmp_path)])


def test_job_state_resume_and_config_guard(tmp_path):
    job = ab.plan(ab.PRESETS["quick"], runs_dir=str(tmp_path), seeds=1, settings=["none"], budgets=["small"])[0]
    assert ab.job_state(job) == "new"
    os.makedirs(job.run_dir)
    open(os.path.join(job.run_dir, "checkpoint.pt"), "wb").close()
    assert ab.job_state(job) == "resume"
    _write(os.path.join(job.run_dir, "summary.json"), _fake_summary(job, 50.0, boxes=False))
    assert ab.job_state(job) == "done"
    changed = ab.job_config(job).to_dict()
    changed["init_epochs"] += 1
    _write(os.path.join(job.run_dir, "summary.json"), _fake_summary(job, 50.0, boxes=False, config=changed))
    with pytest.raises(ValueError, match="init_epochs"):
        ab.job_state(job)
    # a run from before a key existed counts as made with its default
    older = ab.job_config(job).to_dict()
    del older["memory_codec"]
    _write(os.path.join(job.run_dir, "summary.json"), _fake_summary(job, 50.0, boxes=False, config=older))
    assert ab.job_state(job) == "done"
    # keys that may change on resume (device, progress, ...) do not count
    moved = ab.job_config(job).to_dict()
    moved["device"] = "cuda"
    _write(os.path.join(job.run_dir, "summary.json"), _fake_summary(job, 50.0, boxes=False, config=moved))
    assert ab.job_state(job) == "done"


def test_aggregation_on_fake_summaries(tmp_path):
    preset = ab.PRESETS["quick"]
    jobs = ab.plan(preset, runs_dir=str(tmp_path / "runs"), seeds=3)
    accuracy = {"none": 40.0, "downsample": 35.0, "cam": 44.0, "otsu": 43.0, "cim": 46.0}
    for job in jobs:
        if job.key == "large-otsu-seed1995":
            continue  # a missing run
        offset = job.seed - 1994  # -1, 0, +1 over the three seeds
        acc = accuracy[job.setting] + offset + (1.0 if job.budget == "large" else 0.0)
        if job.setting == "cim":
            acc += 0.5 * offset  # cim - none gaps: 5.5, 6, 6.5
        _write(os.path.join(job.run_dir, "summary.json"),
               _fake_summary(job, acc, boxes=ab.SETTINGS[job.setting].boxes, config={}))
    report = ab.build_report(preset, jobs, command="test")
    small = report["results"]["small"]
    assert small["none"]["avg_inc_top1"]["mean"] == pytest.approx(40.0)
    assert small["none"]["avg_inc_top1"]["std"] == pytest.approx(1.0)
    assert small["none"]["n"] == 3
    assert small["cim"]["avg_inc_top1"]["mean"] == pytest.approx(46.0)
    assert small["none"]["box_iou"] is None and small["none"]["box_iou_per_phase"] is None
    assert small["cam"]["box_iou_per_phase"]["mean"] == pytest.approx([0.2, 0.3, 0.4])
    assert small["cam"]["box_iou"]["mean"] == pytest.approx(0.3)
    assert small["cam"]["top1_per_phase"]["mean"] == pytest.approx([54.0, 49.0, 44.0])
    # refreshes at epoch 1 of 1 (quick preset: one epoch a stage) sit at x = phase + 1, where the phase-end boxes
    # are too: the phase-end value wins; a refresh at epoch 1 of 2 would sit at x = phase + 0.5
    over = small["cam"]["box_iou_over_training"]
    assert over["x"] == [1.0, 2.0, 3.0] and over["mean"] == pytest.approx([0.2, 0.3, 0.4])
    assert small["cim"]["exemplars_per_class"]["mean"] == pytest.approx(3.0)
    assert small["cim"]["bytes_held"]["mean"] == pytest.approx(30002)
    gap = report["gaps"]["small"]["cim-none"]
    assert gap["mean"] == pytest.approx(6.0) and gap["std"] == pytest.approx(0.5) and gap["n"] == 3
    assert report["gaps"]["large"]["cim-otsu"]["n"] == 2  # paired only where both seeds exist
    assert report["results"]["large"]["otsu"]["n"] == 2
    assert report["missing"] == ["large-otsu-seed1995"]
    assert report["setup"]["budgets"]["small"]["memory_size"] == preset.memory_size("small")

    paths = ab.write_outputs(report, str(tmp_path / "results"), preset.name)
    assert os.path.basename(paths["json"]) == "ablation-quick.json"
    for path in paths.values():
        assert os.path.getsize(path) > 0
    with open(paths["png"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    saved = json.load(open(paths["json"]))
    assert saved["gaps"]["small"]["cim-none"]["values"] == pytest.approx([5.5, 6.0, 6.5])
    text = open(paths["md"]).read()
    for figure in ("76.55", "77.21", "77.94", "54.72", "59.48", "+1.2"):
        assert figure in text
    assert "**+6.00 ± 0.50** points" in text
    assert "large-otsu-seed1995" in text
    assert ab.output_paths("results", "default")["md"] == os.path.join("results", "ablation.md")


def test_stats_edge_cases():
    assert report._stats([]) is None
    assert report._stats([None, float("nan")]) is None
    one = report._stats([2.0])
    assert one["mean"] == 2.0 and one["std"] is None and one["n"] == 1
    assert render._pm(one) == "2.00"
    assert render._pm(None) == "—"


def _tiny_args(tmp_path, *more):
    return ["--quick", "--settings", "none,cim", "--budgets", "small", "--seeds", "1", "--jobs", "1",
            "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "results"),
            "--set", "data_options.num_classes=4", "data_options.train_per_class=8", "data_options.test_per_class=4",
            *more]


def test_tiny_ablation_end_to_end(tmp_path, capsys):
    report = ab.main(_tiny_args(tmp_path))
    results = report["results"]["small"]
    assert set(results) == {"none", "cim"} and not report["missing"]
    for name in ("none", "cim"):
        assert results[name]["n"] == 1 and results[name]["avg_inc_top1"]["mean"] is not None
    assert results["cim"]["box_iou_per_phase"] is not None
    assert results["none"]["bytes_held"]["mean"] <= report["setup"]["budgets"]["small"]["budget_bytes"]
    for kind in ("json", "md", "png"):
        assert os.path.getsize(tmp_path / "results" / f"ablation-quick.{kind}") > 0
    run_dir = tmp_path / "runs" / "small-cim-seed1993"
    stamp = os.path.getmtime(run_dir / "summary.json")
    capsys.readouterr()
    ab.main(_tiny_args(tmp_path))  # resumable: finished runs are reused, not rerun
    assert os.path.getmtime(run_dir / "summary.json") == stamp
    assert "to do" not in capsys.readouterr().out


def test_empty_box_warning():
    by_setting = {"none": {"box_area_fraction": None}, "cam": {"box_area_fraction": {"mean": 0.4, "std": 0.1}},
                  "cim": {"box_area_fraction": {"mean": 0.0, "std": 0.0}}}
    lines = render._empty_box_warnings(by_setting)
    assert len(lines) == 1
    assert ab.SETTINGS["cim"].label in lines[0] and "empty boxes" in lines[0]


def test_box_diagnostics_branches(tmp_path):
    """A cam run never trains phi: its rational branch equals the rational branch reset to the ReLU fit."""
    from training.experiments.box_diagnostics import BRANCHES, branch_boxes
    from training.run import run
    from training.config import load_config

    cfg = load_config("synthetic", [
        "data_options.num_classes=4", "data_options.train_per_class=6", "data_options.test_per_class=2",
        "image_size=16", "backbone=resnet8", "init_cls=2", "increment=2", "memory_size=8", "init_epochs=1",
        "incre_epochs=1", "compression_epochs=0", "batch_size=8", "cam_batch_size=8", "workers=0",
        "progress=false", "tensorboard=false", "device=cpu", "compression=cam"])
    run(cfg, out_dir=str(tmp_path / "run"))
    results = branch_boxes(str(tmp_path / "run"))
    assert set(results) == set(BRANCHES)
    assert all(r["images"] == 24 and 0 <= r["box_iou"] <= 1 for r in results.values())
    assert results["rational"] == results["rational_init"]


def test_iou_over_training_positions():
    summary = {"config": {"init_epochs": 4, "incre_epochs": 2}}
    extras = [{"box_iou": 0.5, "box_refreshes": [{"epoch": 2, "box_iou": 0.3}, {"epoch": 3, "box_iou": None}]},
              {"box_iou": 0.6, "box_refreshes": [{"epoch": 1, "box_iou": 0.4}]}]
    assert report._iou_over_training(summary, extras) == {0.5: 0.3, 1.0: 0.5, 1.5: 0.4, 2.0: 0.6}
    curves = [{0.5: 0.2, 1.0: 0.4}, {0.5: 0.4}]
    stats = report._over_training_stats(curves)
    assert stats["x"] == [0.5, 1.0] and stats["mean"] == pytest.approx([0.3, 0.4]) and stats["n"] == [2, 1]
