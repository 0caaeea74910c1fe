"""bench.steps: the op-backend swap reaches the learner's calls, the projection formula, and a quick CPU run."""
import json
import math

import pytest
import torch

import cim_ext
from cim_ext import reference

from bench import steps


def test_reference_ops_swaps_and_restores():
    originals = {name: getattr(cim_ext, name) for name in steps.REFERENCE_OPS}
    rational = cim_ext.ops.rational
    with steps.reference_ops():
        assert cim_ext.cam is reference.cam
        assert cim_ext.soft_compress is reference.soft_compress
        assert cim_ext.ops.rational is reference.rational
    assert {name: getattr(cim_ext, name) for name in steps.REFERENCE_OPS} == originals
    assert cim_ext.ops.rational is rational
    with pytest.raises(RuntimeError), steps.reference_ops():
        raise RuntimeError("restored even on error")
    assert cim_ext.cam is originals["cam"]


def test_partial_swap_for_ops_without_a_kernel():
    cam, soft = cim_ext.cam, cim_ext.soft_compress
    with steps.ops_backend("cim_ext", fallback=["soft_compress"]):
        assert cim_ext.soft_compress is reference.soft_compress and cim_ext.cam is cam
    assert cim_ext.soft_compress is soft
    assert steps.missing_kernels(torch.device("cpu")) == []  # every op has a CPU kernel in this build


def test_reference_uncompress_matches_signature():
    images = torch.randint(0, 256, (2, 3, 9, 7), dtype=torch.uint8)
    boxes = torch.tensor([[1, 5, 2, 6], [0, 0, 0, 0]])
    small, crops = cim_ext.compress_parts(images, boxes, 4.0)
    rebuilt = steps.REFERENCE_OPS["uncompress"](small, crops, boxes, (9, 7))
    assert torch.equal(rebuilt, reference.compress(images, boxes, 4.0))


def test_swap_reaches_the_learner(monkeypatch):
    """Every op the meta-step and the memory case use goes through the swapped functions (a learner module that
    bound an op at import time, e.g. ``from cim_ext import cam``, would make this fail)."""
    calls = {}

    def spy(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return wrapper

    for name, fn in list(steps.REFERENCE_OPS.items()):
        monkeypatch.setitem(steps.REFERENCE_OPS, name, spy(name, fn))
    torch.manual_seed(0)
    with steps.reference_ops():
        bench = steps.Bench(steps.QUICK, torch.device("cpu"), "reference")
        step, _ = bench.case("meta")
        step()
        step, _ = bench.case("memory")
        step()
    for name in ("rational", "cam", "soft_compress", "cam_to_boxes", "compress", "uncompress"):
        assert calls.get(name, 0) > 0, f"cim_ext.{name} was not swapped for the learner ({calls})"


def test_projection_formula():
    schedule = dict(steps.ORIGINAL_IMAGENET1000)
    rates = {"train0": 1000.0, "boost": 500.0, "student": 800.0, "infer": 4000.0, "meta0": 10.0, "meta": 5.0,
             "boxes": 2000.0, "memory": 2.0}
    out = steps.project_hours(rates, schedule)
    phases = out["phases"]
    assert len(phases) == 10 and [p["new"] for p in phases] == [100] * 10
    assert phases[0]["train_images"] == 100 * 1300
    assert phases[1]["train_images"] == 100 * 1300 + 20000
    assert phases[0]["meta_iters"] == 50 and phases[0]["refreshes"] == 4 and phases[1]["refreshes"] == 4
    p1 = phases[1]
    expected = (170 * p1["train_images"] / 500 + 170 * 50 / 5 + 4 * 130000 / 2000 + 130 * p1["train_images"] / 800
                + 100 * 2.0 + 2 * 50 * 200 / 4000) / 3600
    assert math.isclose(p1["hours"], expected, rel_tol=1e-12)
    assert math.isclose(out["gpu_hours"], sum(p["hours"] for p in phases), rel_tol=1e-12)
    half = steps.project_hours(rates, schedule, exemplar_cost=0.5)
    assert half["phases"][1]["train_images"] == 100 * 1300 + 40000


def test_quick_cli(tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "steps.json"
    assert steps.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for backend in steps.BACKENDS:
        for case in steps.CASES:
            entry = report["settings"][backend][case]
            assert "error" not in entry, f"{backend}/{case}: {entry.get('error')}"
            assert entry["images_per_s"] > 0
        projection = report["projection"][backend]
        assert projection["gpu_hours"] > 0 and len(projection["phases"]) == 10
    assert set(report["speedup"]) == set(steps.CASES)
    printed = capsys.readouterr().out
    assert "projected GPU-hours" in printed and "speed-up" in printed


def test_loader_quick(tmp_path):
    from bench import loader

    out = tmp_path / "loader.json"
    steps_json = tmp_path / "steps.json"
    steps_json.write_text(json.dumps({"settings": {"cim_ext": {"boost": {"images_per_s": 100.0}}}}))
    assert loader.main(["--quick", "--device", "cpu", "--workers", "0", "--out", str(out),
                        "--steps", str(steps_json)]) == 0
    report = json.loads(out.read_text())
    for name in ("workers=0", "device", "memory"):
        assert report["results"][name]["images_per_s"] > 0, name
    assert report["results"]["device"]["images"] == report["results"]["workers=0"]["images"]
    assert report["step_demand"]["boost"] == 100.0
    assert "fraction_of_fastest_step" in report["results"]["workers=0"]


def test_der_parameter_count_matches_the_network():
    from training.models import DERNet

    rows = steps.der_parameters("resnet8", init_cls=2, increment=3, phases=3)
    net = DERNet(backbone="resnet8")
    for row, seen in zip(rows, (2, 5, 8)):
        net.grow(seen)
        assert row["backbones"] == len(net.backbones) and row["classes"] == seen
        assert row["total"] == sum(p.numel() for p in net.parameters())
        assert row["trainable"] == sum(p.numel() for p in net.parameters() if p.requires_grad)
    imagenet = steps.der_parameters()
    assert [r["backbones"] for r in imagenet] == list(range(1, 11)) and imagenet[-1]["classes"] == 1000
