"""training.policy.CIMPolicy driven with a stub network and no learner: the interface a learner uses (docs/learners.md)
is enough to refresh boxes, train phi by meta-steps, build the training data and fill the memory under its budget."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cim_ext.nn import Rational
from training.config import load_config
from training.data import build_transform, collate_skip_bad, load_source
from training.distributed import resolve_runtime
from training.models import split_parameters
from training.policy import CIMPolicy, InnerStep
from training.stream import ClassStream


class StubNet(nn.Module):
    """The smallest network the policy accepts: ``forward(x, activation)`` -> features, fmaps, logits; ``fc`` makes
    the CAM from the fmaps' channels."""

    def __init__(self, classes: int, channels: int = 6):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, stride=2, padding=1)
        self.rational = Rational("relu")
        self.fc = nn.Linear(channels, classes, bias=False)
        self.feature_dim = channels

    def forward(self, x, activation="relu"):
        pre = self.conv(x)
        fmaps = F.relu(pre) if activation == "relu" else self.rational(pre)
        features = fmaps.mean((2, 3))
        return {"features": features, "fmaps": fmaps, "logits": self.fc(features)}


def _policy(tmp_path, *overrides):
    cfg = load_config("synthetic", ["data_options.num_classes=4", "data_options.train_per_class=6",
                                    "data_options.test_per_class=2", "image_size=16", "init_cls=2", "increment=2",
                                    "memory_size=8", "cam_batch_size=4", "meta_batch_size=4", "batch_size=4",
                                    "num_meta_iters_per_cls=1", "cam_update_interval=1", "workers=0", "device=cpu",
                                    *overrides])
    source = load_source("synthetic", num_classes=4, train_per_class=6, test_per_class=2, image_size=16)
    stream = ClassStream(source, init_cls=2, increment=2)
    runtime = resolve_runtime(cfg)
    generator = torch.Generator().manual_seed(0)
    loader = lambda dataset, batch_size, *, shuffle, shard=True: runtime.loader(  # noqa: E731
        dataset, batch_size, shuffle=shuffle, generator=generator, collate_fn=collate_skip_bad, shard=shard)
    transforms = {kind: build_transform(kind, 16, augment=False) for kind in ("train", "test", "cam")}
    policy = CIMPolicy(cfg=cfg, stream=stream, runtime=runtime, transforms=transforms, loader=loader,
                       memory_dir=str(tmp_path / "memory"))
    return policy, stream, transforms


def _constant_lr(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def test_a_phase_of_the_full_method_with_a_stub_network(tmp_path):
    torch.manual_seed(0)
    policy, stream, transforms = _policy(tmp_path, "compression=cim")
    phase = stream.phases[0]
    net = StubNet(phase.total)
    policy.begin_phase(phase, net, _constant_lr)
    assert policy.phi.active
    assert policy.before_epoch(phase, net, 0, 3) == {}  # no refresh at the first epoch
    refreshed = policy.before_epoch(phase, net, 1, 3)
    assert 0 < refreshed["box_area"] <= 1 and "box_iou" in refreshed  # synthetic data has true boxes
    assert len(policy.boxes) == 12 and policy.aug_prob == pytest.approx(0.1)
    assert len(policy.train_dataset(phase, transforms["train"])) == 12  # no memory yet
    theta_before = {k: v.clone() for k, v in split_parameters(net)[0].items()}
    phi_before = {k: v.clone() for k, v in split_parameters(net)[1].items()}
    inner = InnerStep(loss=lambda out, y: F.cross_entropy(out["logits"], y), lr=0.1, max_grad_norm=1.0, reg_coef=0.1)
    stats = policy.after_epoch(phase, net, inner)
    assert {"meta_outer", "meta_inner", "meta_div", "meta_reg"} <= set(stats)
    assert all(torch.equal(v, theta_before[k]) for k, v in split_parameters(net)[0].items()), "theta untouched"
    assert any(not torch.equal(v, phi_before[k]) for k, v in split_parameters(net)[1].items()), "phi learnt"
    policy.end_training()
    policy.end_phase(phase, net)
    counts = policy.memory.counts()
    assert set(counts) == set(phase.classes) and policy.memory.total_cost() <= 8 + 1e-9
    assert policy.phase_log["boxes_area"] is not None and policy.exemplar_cams
    assert len(policy.train_dataset(stream.phases[1], transforms["train"])) == 12 + len(policy.memory)

    again, _, _ = _policy(tmp_path / "again", "compression=cim")
    again.load_state_dict(policy.state_dict(), phase, net, _constant_lr)
    assert again.memory.counts() == counts and again.phi.active is False  # phi stopped with end_training


@pytest.mark.parametrize("compression, mode", [("none", "none"), ("downsample", "downsample"), ("cam", "cam"),
                                               ("gt", "cam")])
def test_every_setting_fills_the_memory_within_budget(tmp_path, compression, mode):
    torch.manual_seed(0)
    policy, stream, _ = _policy(tmp_path, f"compression={compression}")
    assert policy.memory.mode == mode
    for phase in stream.phases:
        net = StubNet(phase.total)
        policy.begin_phase(phase, net, _constant_lr)
        assert not policy.phi.active and policy.before_epoch(phase, net, 1, 3) == {}
        policy.end_phase(phase, net)
        policy.after_task()
        assert policy.memory.total_cost() <= 8 + 1e-9
    assert len(policy.memory.counts()) == 4
    if compression == "gt":
        assert policy.phase_log["box_iou"] == pytest.approx(1.0)  # the true boxes themselves
