"""training.files: atomic writes whose files follow the umask, and every file a run, visualize and the ablation
write (through training.run's CLI) checked for it."""
import os
import stat

import pytest

from training import files, visualize
from training.experiments import ablation as ab
from training.run import main

from test_ablation import _fake_summary, _write
from test_run import TINY


@pytest.fixture
def umask():
    """Set the process umask for one test (``umask(value)``), restored afterwards."""
    before = os.umask(0o022)
    os.umask(before)
    yield os.umask
    os.umask(before)


def _modes(directory):
    """{path relative to ``directory``: permission bits} of every file under it."""
    paths = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
    return {os.path.relpath(path, directory): stat.S_IMODE(os.stat(path).st_mode) for path in paths}


def _ablation_outputs(directory):
    """The ablation's json, md and png for a one-seed quick plan of fake summaries."""
    preset = ab.PRESETS["quick"]
    jobs = ab.plan(preset, runs_dir=str(directory / "runs"), seeds=1)
    for job in jobs:
        _write(os.path.join(job.run_dir, "summary.json"), _fake_summary(job, 40.0, config={}))
    return ab.write_outputs(ab.build_report(preset, jobs, command="test"), str(directory / "results"), preset.name)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mask, expected):
    from matplotlib.figure import Figure

    umask(mask)
    paths = [files.write_text(str(tmp_path / "a" / "text.json"), "{}\n"),
             files.write_bytes(str(tmp_path / "bytes.bin"), b"\x00\x01"),
             files.atomic_write(str(tmp_path / "stream.bin"), lambda stream: stream.write(b"x")),
             files.save_figure(Figure(figsize=(1, 1)), str(tmp_path / "figure.png"))]
    assert {path: stat.S_IMODE(os.stat(path).st_mode) for path in paths} == {path: expected for path in paths}
    assert sorted(os.listdir(tmp_path)) == ["a", "bytes.bin", "figure.png", "stream.bin"]  # no temporary left
    assert open(paths[0]).read() == "{}\n" and open(paths[1], "rb").read() == b"\x00\x01"
    assert open(paths[3], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = files.write_text(str(tmp_path / "summary.json"), "old\n")

    def failing(stream):
        stream.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        files.atomic_write(path, failing)
    assert os.listdir(tmp_path) == ["summary.json"] and open(path).read() == "old\n"


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_every_file_of_a_run_follows_the_umask(tmp_path, umask, mask):
    umask(mask)
    out = str(tmp_path / "run")
    settings = [s for s in TINY if s != "tensorboard=false"] + ["compression=cam", "threshold=otsu"]
    main(["--out", out] + [item for s in settings for item in ("--set", s)])
    visualize.main([out, "--classes", "2", "--per-class", "1"])
    modes = _modes(out)
    for name in ("summary.json", "metrics.jsonl", "accuracy.png", "checkpoint.pt", "config.json", "exemplars.png",
                 "rationals.png"):
        assert name in modes, name
    assert any(name.startswith("memory" + os.sep) and name.endswith(".bin") for name in modes)
    assert any(name.startswith("tensorboard" + os.sep) for name in modes)
    modes.update({f"ablation/{os.path.basename(path)}": stat.S_IMODE(os.stat(path).st_mode)
                  for path in _ablation_outputs(tmp_path / "ablation").values()})
    if mask == 0o022:
        assert modes == {name: 0o644 for name in modes}
    else:
        assert {name: mode & 0o077 for name, mode in modes.items()} == {name: 0 for name in modes}
        assert {name: mode & 0o600 for name, mode in modes.items()} == {name: 0o600 for name in modes}
