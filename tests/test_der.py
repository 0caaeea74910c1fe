"""DER (training.learners.der, training.models.DERNet) against plain-PyTorch references: the auxiliary targets and
loss, weight aligning, growth with old rows copied, old backbones frozen whole through a phase (a parameter
snapshot before and after), the meta-step with DER's inner loss, resume, and a run on every bundled dataset source."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from training.config import load_config
from training.data import load_source
from training.learners import DER
from training.learners.der import aux_targets, der_loss
from training.models import DERNet, network_from_spec, split_parameters
from training.run import Interrupted, run
from training.stream import ClassStream

TINY = [
    "learner=der", "data_options.num_classes=6", "data_options.train_per_class=6", "data_options.test_per_class=2",
    "image_size=16", "backbone=resnet8", "init_cls=2", "increment=2", "memory_size=12", "init_epochs=2",
    "incre_epochs=2", "batch_size=8", "meta_batch_size=4", "cam_batch_size=8", "num_meta_iters_per_cls=0.5",
    "cam_update_interval=1", "workers=0", "progress=false", "tensorboard=false", "device=cpu",
]


def _tiny(*extra):
    return load_config("synthetic", TINY + list(extra))


def test_aux_targets_match_a_plain_loop():
    labels = torch.tensor([0, 4, 1, 5, 3, 6, 2])
    known = 4
    expected = [0 if int(y) < known else int(y) - known + 1 for y in labels]
    assert aux_targets(labels, known).tolist() == expected == [0, 1, 0, 2, 0, 3, 0]


def test_der_loss_is_ce_plus_aux_ce():
    torch.manual_seed(0)
    outputs = {"logits": torch.randn(5, 6), "aux_logits": torch.randn(5, 3)}
    labels = torch.tensor([0, 5, 4, 1, 3])
    loss, parts = der_loss(outputs, labels, known=4)
    reference = F.cross_entropy(outputs["logits"], labels) + F.cross_entropy(
        outputs["aux_logits"], torch.tensor([0, 2, 1, 0, 0]))
    torch.testing.assert_close(loss, reference)
    assert set(parts) == {"clf", "aux"}
    phase0, parts0 = der_loss(outputs, labels, known=0)
    torch.testing.assert_close(phase0, F.cross_entropy(outputs["logits"], labels))
    assert set(parts0) == {"clf"}


def test_dernet_grows_like_the_original():
    net = DERNet(backbone="resnet8", backbone_kwargs={"width": 4}).grow(3)
    assert net.aux_fc.weight.shape == (4, 16)  # 3 new classes + "old" (unused in phase 0, as in the original)
    old_fc = net.fc.weight.detach().clone()
    first = {k: v.clone() for k, v in net.backbones[0].state_dict().items()}
    net.grow(5)
    assert len(net.backbones) == 2 and net.fc.weight.shape == (5, 32) and net.aux_fc.weight.shape == (3, 16)
    torch.testing.assert_close(net.fc.weight[:3, :16], old_fc)  # old rows over the old features copied
    for key, value in net.backbones[1].state_dict().items():  # the new backbone starts from the last one
        torch.testing.assert_close(value, first[key])
    assert not any(p.requires_grad for p in net.backbones[0].parameters())  # rationals included
    assert all(p.requires_grad for p in net.backbones[1].parameters())
    out = net(torch.randn(2, 3, 16, 16))
    assert out["logits"].shape == (2, 5) and out["aux_logits"].shape == (2, 3) and out["fmaps"].shape[1] == 32
    clone = network_from_spec(net.spec())
    clone.load_state_dict(net.state_dict())
    assert type(clone) is DERNet and clone.spec() == net.spec()


def test_weight_align_matches_the_reference():
    torch.manual_seed(1)
    net = DERNet(backbone="resnet8", backbone_kwargs={"width": 4}).grow(3).grow(5)
    weights = net.fc.weight.detach().clone()
    gamma = net.weight_align(3, 2)
    expected = weights[:3].norm(dim=1).mean() / weights[3:].norm(dim=1).mean()  # the original's weight_align
    assert gamma == pytest.approx(float(expected), rel=1e-6)
    torch.testing.assert_close(net.fc.weight[3:], weights[3:] * expected)
    torch.testing.assert_close(net.fc.weight[:3], weights[:3])
    torch.testing.assert_close(net.fc.weight[3:].norm(dim=1).mean(), net.fc.weight[:3].norm(dim=1).mean())


def _learner(cfg, tmp_path):
    from training.distributed import resolve_runtime

    options = dict(cfg.data_options)
    source = load_source(cfg.dataset, seed=int(options.pop("seed", 0)), **options)
    stream = ClassStream(source, init_cls=cfg.init_cls, increment=cfg.increment, order_seed=cfg.class_order_seed)
    return DER(cfg=cfg, stream=stream, runtime=resolve_runtime(cfg), image_size=16,
               memory_dir=str(tmp_path / "memory")), stream


def test_a_phase_leaves_the_old_backbones_untouched_and_trains_the_new_one(tmp_path):
    torch.manual_seed(0)
    learner, stream = _learner(_tiny("compression=cim"), tmp_path)
    learner.incremental_train(stream.phases[0])
    learner.after_task()
    before = {k: v.clone() for k, v in learner.network.state_dict().items()}
    learner.incremental_train(stream.phases[1])
    after = learner.network.state_dict()
    old = [k for k in before if k.startswith("backbones.0.")]
    assert any("rational" in k for k in old) and any("running_mean" in k for k in old)
    for key in old:  # weights, rational coefficients and batch-norm statistics of the frozen backbone
        assert torch.equal(before[key], after[key]), key
    new = [k for k in after if k.startswith("backbones.1.")]
    assert any(not torch.equal(after[k], before[k.replace("backbones.1.", "backbones.0.")]) for k in new
               if "rational" not in k), "the new backbone trained"
    assert any(not torch.equal(after[k], before[k.replace("backbones.1.", "backbones.0.")]) for k in new
               if "rational" in k), "the new backbone's rationals were meta-trained"
    _, phi = split_parameters(learner.network)
    assert phi and all(name.startswith("backbones.1.") for name in phi)


def test_resume_equals_uninterrupted(tmp_path):
    settings = ("compression=cim", "checkpoint_every=1")
    full = run(_tiny(*settings), out_dir=str(tmp_path / "full"))
    with pytest.raises(Interrupted):
        run(_tiny(*settings), out_dir=str(tmp_path / "cut"), stop_after_checkpoints=4)
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert state["learner"]["learner"] == "der"
    assert state["learner"]["phase_index"] == 1 and state["learner"]["stage"] == "train"
    assert state["learner"]["policy"]["phi"] is not None  # resumed with phi's optimiser mid-phase
    resumed = run(_tiny(*settings), out_dir=str(tmp_path / "cut"), resume=True)
    strip = lambda s: [{k: v for k, v in p.items() if k != "extra"} for p in s["per_phase"]]  # noqa: E731
    assert strip(resumed) == strip(full)
    exemplars = lambda s: [p["extra"]["exemplars"] for p in s["per_phase"]]  # noqa: E731
    assert exemplars(resumed) == exemplars(full)


@pytest.mark.parametrize("compression", ["none", "cam", "cim"])
def test_der_runs_with_each_compression(tmp_path, compression):
    summary = run(_tiny(f"compression={compression}"), out_dir=str(tmp_path))
    assert summary["finished"] and summary["phases_done"] == 3
    extra = summary["final"]["extra"]
    assert extra["memory_cost"] <= 12 + 1e-9 and "student_top1" not in extra
    spec = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["learner"]["network"]["spec"]
    assert spec["kind"] == "der" and spec["num_backbones"] == 3  # one backbone per phase, never compressed
    if compression != "none":
        assert extra["box_area_fraction"] is not None
    metrics = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
    assert len(metrics) == 3
    if compression == "cim":  # the run's pictures: stored exemplars (rebuilt bit-exactly) and the learnt rationals
        from training.visualize import main as visualize

        drawn = visualize([str(tmp_path), "--classes", "3", "--per-class", "1"])
        assert drawn["rows"] == 3 and drawn["mismatches"] == 0 and os.path.isfile(drawn["rationals"])


@pytest.mark.parametrize("extra, coef", [((), 0.0), (("der_reg_coef=0.5",), 0.5)])
def test_der_reg_coef_is_the_meta_steps_cam_regulariser(tmp_path, monkeypatch, extra, coef):
    from training.policy import CIMPolicy

    seen = []
    original = CIMPolicy.after_epoch

    def after_epoch(self, phase, network, inner):
        seen.append(inner.reg_coef)
        return original(self, phase, network, inner)

    monkeypatch.setattr(CIMPolicy, "after_epoch", after_epoch)
    run(_tiny("compression=cim", *extra), out_dir=str(tmp_path))
    assert seen and set(seen) == {coef}  # 0 by default: the original DER's outer loss has no CAM term


def _source_tree(name, root):
    """(data root, extra overrides) of a generated tree of source ``name``."""
    from trees import food101_tree, imagenet_tree, tinyimagenet_tree

    from training.data import imagenet100_wnids

    if name == "synthetic":
        return None, ["data_options.num_classes=4", "data_options.train_per_class=6", "data_options.test_per_class=2"]
    if name in ("imagefolder", "imagenet1000"):
        return imagenet_tree(root, ["n01", "n02", "n03", "n04"], per_class=6, size=(20, 18)), []
    if name == "imagenet100":  # all 100 wnids must be there; the run takes four of them
        wnids = imagenet100_wnids()
        imagenet_tree(root, wnids, per_class=6, size=(20, 18))
        return root, [f"data_options.classes={json.dumps(wnids[:4])}"]
    if name == "tinyimagenet":
        return tinyimagenet_tree(root, wnids=("n01", "n02", "n03", "n04"), per_class=6), ["data_options={}"]
    return food101_tree(root, classes=("apple_pie", "ramen", "sushi", "tacos"), train_per_class=6), []


@pytest.mark.parametrize("source", ["synthetic", "imagefolder", "tinyimagenet", "imagenet1000", "imagenet100",
                                    "food101"])
def test_the_cli_runs_der_with_cim_on_every_source(tmp_path, source):
    """``python -m training.run --set learner=der compression=cim`` on each bundled source (its own config)."""
    from training.run import main

    root, extra = _source_tree(source, tmp_path / "data")
    args = ["--dataset", source, "--out", str(tmp_path / "run")] + (["--data-root", str(root)] if root else [])
    overrides = ["learner=der", "compression=cim", "image_size=16", "backbone=resnet8", "init_cls=2", "increment=2",
                 "memory_size=4", "init_epochs=1", "incre_epochs=1", "batch_size=4", "meta_batch_size=2",
                 "cam_batch_size=4", "num_meta_iters=1", "workers=0", "progress=false", "tensorboard=false",
                 "device=cpu", *extra]
    summary = main(args + ["--set", *overrides])
    assert summary["finished"] and summary["phases_done"] == 2
    assert summary["config"]["learner"] == "der" and summary["final"]["extra"]["exemplars"] > 0
