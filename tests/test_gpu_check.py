"""bench/gpu_check.sh, the prepared GPU call: its arguments, its deadline, and a dry run of its stages on CPU."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def gpu_check(*args, out):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), "--out", str(out), *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=1800)


def read(out, name):
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        return tar.extractfile(f"./{name}").read().decode()


def members(out):
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        return {name.removeprefix("./") for name in tar.getnames()} - {".", ""}


def test_syntax():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("args, named", [
    (["--deadline", "soon"], "--deadline"),
    (["--deadline", "0"], "--deadline"),
    (["--deadline"], "--deadline"),
    (["--stages", "tests,benchmarks"], "--stages"),
    (["--stages", ""], "--stages"),
    (["--frobnicate"], "--frobnicate"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, args, named):
    done = gpu_check(*args, out=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], done.stderr
    assert not (tmp_path / "gpu-check.tar.gz").exists()


def test_stage_without_time_left_is_skipped(tmp_path):
    # 20 s: after the 15 s kept for packing, less than the tests stage's minimum is left
    done = gpu_check("--dry-run", "--stages", "tests", "--deadline", "20", out=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "== tests: SKIPPED" in done.stdout
    assert members(tmp_path) == {"summary.txt", "environment.txt"}
    assert "== tests: SKIPPED" in read(tmp_path, "summary.txt")


def test_dry_run_of_the_build_stage(tmp_path):
    done = gpu_check("--dry-run", "--stages", "build", out=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "== build: ok" in done.stdout
    log = read(tmp_path, "build.log")
    assert "TORCH_CUDA_ARCH_LIST=9.0" in log and "cim_ext build:" in log  # setup.py's configuration, no compile
    assert os.listdir(tmp_path) == ["gpu-check.tar.gz"]  # one file comes back


@pytest.mark.slow
def test_dry_run_of_every_stage(tmp_path):
    done = gpu_check("--dry-run", "--deadline", "1500", out=tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    for stage in ("build", "tests", "bench", "steps", "train", "datapath", "compiled"):
        assert f"== {stage}: ok" in done.stdout
    names = members(tmp_path)
    for name in ("bench.json", "steps.json", "projection-imagenet100.json", "train-summary.json", "datapath.json",
                 "tests.log", "summary.txt"):
        assert name in names
    bench = json.loads(read(tmp_path, "bench.json"))
    assert "kernel" in bench["ops"]["compress[uint8]"]
    assert "compiled" in bench["ops"]["rational[forward]"]  # the compiled stage merged into the bench result
    assert len(bench["environment"]["merged_runs"]) == 1
    datapath = json.loads(read(tmp_path, "datapath.json"))
    assert "nvJPEG" in datapath["results"]["device"]["skipped"]
    assert "not representative" in datapath["verdict"]["text"]  # the dry run's steps are --quick sizes
    for name, classes in (("steps.json", 1000), ("projection-imagenet100.json", 100)):
        report = json.loads(read(tmp_path, name))
        assert report["schedule"]["num_classes"] == classes and len(report["projection"]["cim_ext"]["phases"]) == 10
