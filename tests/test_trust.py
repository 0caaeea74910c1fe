"""A run a person can trust: user mistakes end in one line (exit 2, no traceback), nothing wrong is accepted silently,
SIGTERM / SIGINT stop at a batch end after a checkpoint and resume to the numbers of an uninterrupted run, a finished
run is left alone, the console says where the run is, and faults (a crash while checkpointing, a NaN loss, a full
disk) lose nothing."""
import errno
import io
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from training.config import load_config
from training.run import Interrupted, main, run
from trees import imagenet_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "data_options.num_classes=6", "data_options.train_per_class=8", "data_options.test_per_class=2",
    "image_size=16", "backbone=resnet8", "init_cls=2", "increment=2", "memory_size=6", "init_epochs=2",
    "incre_epochs=2", "compression_epochs=1", "batch_size=4", "meta_batch_size=4", "cam_batch_size=8",
    "num_meta_iters_per_cls=0.5", "cam_update_interval=1", "workers=0", "progress=false", "tensorboard=false",
    "device=cpu", "checkpoint_every=0", "compression=cim",
]


def _cli(args, env_extra=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return subprocess.run([sys.executable, "-m", "training.run", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _one_line(result, *needles):
    """Exit 2, a single ``error:`` line naming the problem, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _numbers(summary):
    return [{k: p[k] for k in ("top1", "top5", "old", "new", "per_task")} | {
        k: p["extra"][k] for k in ("exemplars", "memory_cost", "box_iou")} for p in summary["per_phase"]]


# ---------------------------------------------------------------------------------------------------- mistakes
def test_bad_keys_and_values_are_refused_before_torch_is_imported():
    probe = ("import sys\nfrom training.run import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
             "    print('exit', e.code, 'torch' in sys.modules)\n")
    for args, needle in ((["--set", "init_epoch=1"], "init_epoch"), (["--set", "memory_size=0"], "learner=finetune"),
                         (["--set", "compression=zip"], "'cim'")):
        result = subprocess.run([sys.executable, "-c", probe, *args], cwd=ROOT, capture_output=True, text=True,
                                env=dict(os.environ, PYTHONPATH=ROOT))
        assert result.stdout.strip() == "exit 2 False", (args, result.stdout, result.stderr)
        assert needle in result.stderr


def test_one_class_tree_and_an_increment_that_does_not_fit(tmp_path):
    imagenet_tree(tmp_path / "one", ["cat"], per_class=3)
    _one_line(_cli(["--dataset", "imagefolder", "--data-root", str(tmp_path / "one"), "--out", str(tmp_path / "r"),
                    "--set", "workers=0"]), "init_cls", "exceeds the 1 classes")
    assert not os.path.exists(tmp_path / "r"), "nothing half-made"
    _one_line(_cli(["--out", str(tmp_path / "r2"), "--set", *TINY, "init_cls=5", "increment=50",
                    "data_options.num_classes=10"]), "increment: 50 exceeds the 5 classes left")


def test_out_under_a_file_and_a_missing_data_root(tmp_path):
    (tmp_path / "file").write_text("x")
    _one_line(_cli(["--out", str(tmp_path / "file" / "run")]), "is a file, not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_out_that_cannot_be_written(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    _one_line(_cli(["--out", str(locked / "run")]), "not writable")


def test_unreadable_image_with_on_bad_image_error(tmp_path):
    imagenet_tree(tmp_path / "data", ["n01", "n02", "n03", "n04"], per_class=3, size=(16, 16))
    (tmp_path / "data" / "train" / "n02" / "n02_1.JPEG").write_bytes(b"not a jpeg")
    result = _cli(["--dataset", "imagenet1000", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "r"),
                   "--set", "image_size=16", "backbone=resnet8", "init_cls=2", "increment=2", "memory_size=4",
                   "init_epochs=1", "incre_epochs=1", "compression_epochs=0", "batch_size=4", "cam_batch_size=4",
                   "workers=0", "progress=false", "tensorboard=false", "on_bad_image=error"])
    _one_line(result, "cannot read image", "n02_1.JPEG", "on_bad_image=skip")


def test_truncated_checkpoint_is_one_line(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        run(load_config("synthetic", TINY), out_dir=str(out), stop_after_checkpoints=1)
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    _one_line(_cli(["--out", str(out), "--resume"]), "cannot read the checkpoint", "truncated")


def test_a_memory_that_keeps_every_image_is_warned_about(tmp_path, capsys):
    run(load_config("synthetic", TINY + ["memory_size=40"]), out_dir=str(tmp_path))
    out = capsys.readouterr().out
    assert "warning: memory_size=40 leaves 20 image units per class after phase 0" in out
    assert "close to joint training" in out


# ---------------------------------------------------------------------------------------------------- signals
@pytest.mark.parametrize("name, code", [("TERM", 143), ("INT", 130)])
def test_a_signal_stops_at_a_batch_end_and_resume_matches(tmp_path, name, code):
    full = run(load_config("synthetic", TINY), out_dir=str(tmp_path / "full"))
    out = str(tmp_path / "cut")
    # batch 13: inside phase 1 (phase 0 has 2 epochs of 3 batches; phase 1 trains on 2 x 8 new images + memory)
    first = _cli(["--out", out, "--set", *TINY], {"CIM_TRAINING_SIGNAL_AFTER_BATCHES": f"{name}:13"})
    assert first.returncode == code, first.stderr[-2000:]
    message = first.stderr.strip().splitlines()[-1]
    assert message.startswith("interrupted at phase 1, stage boost") and "batch" in message
    assert message.endswith(f"resume with --resume --out {out}") and "Traceback" not in first.stderr
    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["learner"]
    assert state["partial_epoch"] is not None and state["partial_epoch"]["batches"] > 0  # stopped mid-epoch
    second = _cli(["--out", out, "--resume"])
    assert second.returncode == 0, second.stderr[-2000:]
    resumed = json.loads(open(os.path.join(out, "summary.json")).read())
    assert _numbers(resumed) == _numbers(full)


def test_checkpoints_by_wall_time_and_at_every_stage_end(tmp_path, monkeypatch):
    import training.runner as runner

    seen = []
    original = runner.save_checkpoint
    monkeypatch.setattr(runner, "save_checkpoint", lambda path, state: seen.append(
        (state["learner"]["phase_index"], state["learner"]["stage"], state["learner"]["partial_epoch"] is not None))
        or original(path, state))
    run(load_config("synthetic", TINY + ["checkpoint_minutes=1e-9"]), out_dir=str(tmp_path / "timed"))
    assert sum(1 for _, _, mid in seen if mid) > 10, "a checkpoint at every batch end once the time is due"
    seen.clear()
    run(load_config("synthetic", TINY + ["checkpoint_minutes=0"]), out_dir=str(tmp_path / "stages"))
    # every stage end (boost -> student -> memory) and every phase end; none inside a stage
    assert [(p, s) for p, s, _ in seen] == [(0, "memory"), (0, "done"), (1, "student"), (1, "memory"), (1, "done"),
                                           (2, "student"), (2, "memory"), (2, "done")]


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    out = tmp_path / "run"
    run(load_config("synthetic", TINY), out_dir=str(out))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    result = _cli(["--out", str(out), "--resume"])
    assert result.returncode == 0 and "already finished (average incremental top-1" in result.stdout
    assert "nothing to do" in result.stdout
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------------------------------------------- console
def test_console_start_block_statuses_and_end_line(tmp_path):
    out = str(tmp_path / "run")
    result = _cli(["--out", out, "--set", *TINY, "progress=true", "init_epochs=3"])  # a box refresh at epoch 2
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    assert f"run {out} (new run)" in text and "device cpu" in text and "learner foster, compression cim" in text
    assert "3 phases: 2 + 2 + 2 classes; class order" in text and "set away from the bundled config:" in text
    assert "init_epochs=3" in text
    assert "phase 0: memory update" in text and "phase 1: evaluating on the test images of 4 classes" in text
    assert "boxes refreshed on the rational branch" in text
    assert text.strip().splitlines()[-1].startswith("finished: average incremental top-1 ")
    assert os.path.join(out, "summary.json") in text.strip().splitlines()[-1]
    # stdout is a pipe here: one line per epoch with the whole run's ETA instead of a redrawn bar
    assert "\r" not in text
    epochs = [line for line in text.splitlines() if " epochs (" in line]
    assert re.match(r"phase 0 \w+ epoch 1 1/\d+ epochs \(\d+%\) \[\d+s elapsed, about ", epochs[0]), epochs[0]
    assert " epochs (100%) [" in epochs[-1]


def test_console_draws_a_bar_on_a_terminal_and_lines_elsewhere():
    from training.console import Console

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, bar in ((Terminal(), True), (io.StringIO(), False)):
        console = Console(stream=stream)
        console.open_bar(4)
        for epoch in range(4):
            console.batch(f"phase 0 train epoch {epoch + 1}", 1, 2)
            console.epoch_done("train_loss 1.000")
        console.end("finished")
        text = stream.getvalue()
        assert ("\r" in text) == bar and ("|" in text) == bar
        if not bar:
            assert text.splitlines()[-2].startswith("phase 0 train epoch 4 4/4 epochs (100%) [")
            assert text.splitlines()[-2].endswith("s left] train_loss 1.000")


# ---------------------------------------------------------------------------------------------------- faults
def test_a_crash_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import training.checkpoint as checkpoint

    full = run(load_config("synthetic", TINY), out_dir=str(tmp_path / "full"))
    out = tmp_path / "cut"
    calls = {"n": 0}
    original = torch.save

    def torn(obj, handle, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            handle.write(b"PK\x03\x04 torn")  # half a checkpoint in the temporary file, then the crash
            raise RuntimeError("simulated crash while writing the checkpoint")
        return original(obj, handle, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", torn)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(load_config("synthetic", TINY), out_dir=str(out))
    monkeypatch.setattr(checkpoint.torch, "save", original)
    assert not [p for p in os.listdir(out) if p.startswith(".tmp")], "the torn temporary file is removed"
    state = torch.load(out / "checkpoint.pt", weights_only=True)["learner"]  # the third checkpoint, intact
    assert (state["phase_index"], state["stage"]) == (1, "student")
    resumed = run(load_config("synthetic", TINY), out_dir=str(out), resume=True)
    assert _numbers(resumed) == _numbers(full)


def _nan_at(monkeypatch, call):
    """FOSTER's loss returns NaN at its ``call``-th call."""
    import training.learners.foster as foster

    original, calls = foster.foster_loss, {"n": 0}

    def poisoned(outputs, labels, **kwargs):
        loss, parts = original(outputs, labels, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), parts) if calls["n"] == call else (loss, parts)

    monkeypatch.setattr(foster, "foster_loss", poisoned)


def test_a_nan_loss_stops_with_a_named_error_or_is_skipped(tmp_path, monkeypatch, capsys):
    _nan_at(monkeypatch, 8)
    with pytest.raises(SystemExit) as info:
        main(["--out", str(tmp_path / "stop"), "--set", *TINY, "checkpoint_every=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 1 and len(err) == 1
    assert err[0].startswith("error: non-finite training loss (nan) at phase 0, stage boost, epoch 2, batch 3;")
    assert "on_nonfinite_loss=skip" in err[0]
    state = torch.load(tmp_path / "stop" / "checkpoint.pt", weights_only=True)["learner"]
    assert all(torch.isfinite(v).all() for v in state["network"]["state"].values() if v.is_floating_point())
    _nan_at(monkeypatch, 8)
    summary = run(load_config("synthetic", TINY + ["on_nonfinite_loss=skip"]), out_dir=str(tmp_path / "skip"))
    assert summary["finished"]
    metrics = [json.loads(line) for line in open(tmp_path / "skip" / "metrics.jsonl")]
    assert all(p["top1"] is not None for p in metrics)


def test_a_nonfinite_meta_step_is_never_applied(monkeypatch):
    import training.cim as cim
    from training.models import FosterNet, split_parameters

    torch.manual_seed(0)
    net = FosterNet(backbone="resnet8").grow(3)
    _, phi = split_parameters(net)
    optimizer = torch.optim.Adam(list(phi.values()), lr=0.1)
    batch = (torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))
    original = cim.meta_objective
    monkeypatch.setattr(cim, "meta_objective", lambda *a, **k: (lambda o, p: (o * float("nan"), p))(*original(*a, **k)))
    before = {k: v.clone() for k, v in phi.items()}
    out = cim.meta_step(net, batch, batch, phi_optimizer=optimizer, inner_lr=0.1, compress_ratio=4, div_coef=0.2,
                        reg_coef=0.1, max_grad_norm=1.0)
    assert float(out["skipped"]) == 1.0 and all(torch.equal(v, before[k]) for k, v in phi.items())
    monkeypatch.setattr(cim, "meta_objective", original)
    out = cim.meta_step(net, batch, batch, phi_optimizer=optimizer, inner_lr=0.1, compress_ratio=4, div_coef=0.2,
                        reg_coef=0.1, max_grad_norm=1.0)
    assert float(out["skipped"]) == 0.0 and any(not torch.equal(v, before[k]) for k, v in phi.items())


@pytest.mark.parametrize("where", ["checkpoint", "store"])
def test_a_full_disk_stops_with_a_clear_error_and_resumes(tmp_path, monkeypatch, capsys, where):
    import training.checkpoint as checkpoint
    from training.exemplar_store import ExemplarStore

    full = run(load_config("synthetic", TINY), out_dir=str(tmp_path / "full"))
    out = tmp_path / "cut"
    target = (checkpoint, "save_checkpoint") if where == "checkpoint" else (ExemplarStore, "write")
    original, calls = getattr(*target), {"n": 0}

    def full_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "x"))
        return original(*args, **kwargs)

    import training.runner as runner

    monkeypatch.setattr(*target, full_disk)
    if where == "checkpoint":
        monkeypatch.setattr(runner, "save_checkpoint", full_disk)
    with pytest.raises(SystemExit) as info:
        main(["--out", str(out), "--set", *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 1 and len(err) == 1 and err[0].startswith("error: no space left on device")
    assert err[0].endswith(f"free space, then resume with --resume --out {out}")
    monkeypatch.setattr(*target, original)
    monkeypatch.setattr(runner, "save_checkpoint", checkpoint.save_checkpoint)
    resumed = run(load_config("synthetic", TINY), out_dir=str(out), resume=True)
    assert _numbers(resumed) == _numbers(full)
