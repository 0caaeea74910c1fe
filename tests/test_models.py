"""training.models: backbones with the per-call ReLU/rational switch, FosterNet growth, fast weights, specs."""
import pytest
import torch

from cim_ext.nn import Rational
from training.models import (
    CifarResNet,
    FosterNet,
    ResNet18,
    functional_forward,
    rational_modules,
    split_parameters,
)


def _sites(module):
    return len(list(rational_modules(module)))


def test_activation_sites_one_rational_each():
    assert _sites(CifarResNet(depth=32)) == 31  # stem + 2 per block x 15 blocks
    assert _sites(ResNet18(width=8)) == 17  # stem + 2 per block x 8 blocks (as in the original)
    rationals = [id(m) for _, m in rational_modules(CifarResNet(depth=8))]
    assert len(set(rationals)) == len(rationals)


def test_resnet18_shapes_imagenet_stem():
    net = ResNet18(width=8).eval()
    out = net(torch.randn(2, 3, 64, 64))
    assert out["fmaps"].shape == (2, 64, 2, 2) and out["features"].shape == (2, 64)
    assert ResNet18().out_dim == 512


def test_resnet32_shapes():
    out = CifarResNet(depth=32).eval()(torch.randn(2, 3, 32, 32))
    assert out["fmaps"].shape == (2, 64, 8, 8) and out["features"].shape == (2, 64)
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(depth=33)


def test_activation_switch_per_call():
    torch.manual_seed(0)
    net = FosterNet(backbone="resnet8", backbone_kwargs={"width": 4})
    net.grow(3)
    net.eval()
    x = torch.randn(2, 3, 16, 16)
    relu = net(x)["logits"]
    rational = net(x, activation="rational")["logits"]
    assert not torch.allclose(relu, rational)
    # The ReLU branch does not depend on phi; the rational branch does.
    with torch.no_grad():
        for _, module in rational_modules(net):
            module.numerator.mul_(1.5)
    assert torch.equal(net(x)["logits"], relu)
    assert not torch.allclose(net(x, activation="rational")["logits"], rational)
    with pytest.raises(ValueError, match="activation"):
        net(x, activation="gelu")


def test_split_parameters():
    net = FosterNet(backbone="resnet8")
    net.grow(4)
    theta, phi = split_parameters(net)
    assert phi and all(".rational." in name for name in phi)
    assert theta and not any(".rational." in name for name in theta)
    assert len(theta) + len(phi) == len(list(net.parameters()))


def test_functional_call_fast_weights():
    torch.manual_seed(0)
    net = FosterNet(backbone="resnet8", backbone_kwargs={"width": 4})
    net.grow(3)
    net.eval()
    x = torch.randn(2, 3, 16, 16)
    theta, _ = split_parameters(net)
    fast = {name: p + 0.01 for name, p in theta.items()}
    got = functional_forward(net, fast, x, "relu")["logits"]
    reference = FosterNet(backbone="resnet8", backbone_kwargs={"width": 4})
    reference.grow(3)
    reference.load_state_dict(net.state_dict())
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name in fast:
                p.copy_(fast[name])
    torch.testing.assert_close(got, reference.eval()(x)["logits"])
    # the module's own parameters are untouched
    assert torch.equal(functional_forward(net, {}, x)["logits"], net(x)["logits"])


def test_grow_keeps_old_classes_and_freezes_old_backbone():
    torch.manual_seed(0)
    net = FosterNet(backbone="resnet8", backbone_kwargs={"width": 4})
    net.grow(3)
    old_fc = net.fc.weight.detach().clone()
    net.grow(5)
    assert len(net.backbones) == 2 and net.fc.weight.shape == (5, 32) and net.fe_fc.weight.shape == (5, 16)
    assert net.old_fc.weight.shape == (3, 16)
    torch.testing.assert_close(net.fc.weight[:3, :16], old_fc)
    torch.testing.assert_close(net.old_fc.weight, old_fc)
    # the old backbone is frozen whole, rational coefficients included (the original's behaviour)
    assert any(".rational." in name for name, _ in net.backbones[0].named_parameters())
    assert not any(p.requires_grad for p in net.backbones[0].parameters())
    assert all(p.requires_grad for p in net.backbones[1].parameters())
    assert net.fc.bias is None and net.fe_fc.bias is None  # bias-free heads like the original's SimpleLinear
    assert not any(p.requires_grad for p in net.old_fc.parameters())
    # the new backbone starts as a copy of the old one
    for (n0, p0), (n1, p1) in zip(net.backbones[0].state_dict().items(), net.backbones[1].state_dict().items()):
        assert n0 == n1 and torch.equal(p0, p1)
    net.train()
    assert not net.backbones[0].training and net.backbones[1].training
    out = net(torch.randn(2, 3, 16, 16))
    assert out["logits"].shape == (2, 5) and out["fe_logits"].shape == (2, 5) and out["old_logits"].shape == (2, 3)
    assert out["fmaps"].shape[1] == 32
    with pytest.raises(ValueError, match="more than"):
        net.grow(5)


def test_student_starts_from_old_backbone():
    net = FosterNet(backbone="resnet8", backbone_kwargs={"width": 4})
    net.grow(3)
    net.grow(5)
    student = net.student()
    assert len(student.backbones) == 1 and student.num_classes == 5 and student.fe_fc is None
    for (_, a), (_, b) in zip(student.backbones[0].state_dict().items(), net.backbones[0].state_dict().items()):
        assert torch.equal(a, b)
    torch.testing.assert_close(student.fc.weight[:3], net.old_fc.weight)
    assert all(p.requires_grad for p in student.parameters())


def test_spec_round_trip():
    net = FosterNet(backbone="resnet8", backbone_kwargs={"width": 4})
    net.grow(3)
    net.grow(6)
    clone = FosterNet.from_spec(net.spec())
    clone.load_state_dict(net.state_dict())
    assert clone.spec() == net.spec()
    assert [p.requires_grad for p in clone.parameters()] == [p.requires_grad for p in net.parameters()]
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(clone.eval()(x)["logits"], net.eval()(x)["logits"])


def test_weight_align():
    net = FosterNet(backbone="resnet8", backbone_kwargs={"width": 4})
    net.grow(4)
    with torch.no_grad():
        net.fc.weight[2:] *= 3
    gamma = net.weight_align(2, 2)
    norms = net.fc.weight.norm(dim=1)
    torch.testing.assert_close(norms[2:].mean(), norms[:2].mean())
    assert gamma < 1


def test_rational_is_cim_ext_module():
    net = CifarResNet(depth=8)
    assert all(isinstance(m, Rational) for _, m in rational_modules(net))
