"""training.cim: the bilevel meta-step (phi only; its exact gradient against a plain-PyTorch build of the original's
meta-objective and against finite differences), CAM boxes, box datasets."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import cim_ext
from cim_ext import reference
from training.cim import (
    BoxTable,
    CamDataset,
    ImageBoxDataset,
    compute_boxes,
    inner_parameter_names,
    meta_objective,
    meta_step,
    num_meta_iters,
    refresh_due,
)
from training.runtime import Runtime
from training.data import build_transform, collate_skip_bad
from training.learners.foster import foster_loss
from training.models import FosterNet, split_parameters


def _toy(num_classes=3, width=2, dtype=torch.float32, seed=0, grow_twice=False):
    """A tiny FosterNet whose BatchNorm statistics are calibrated (the meta-step runs BN in eval mode)."""
    torch.manual_seed(seed)
    net = FosterNet(backbone="resnet8", backbone_kwargs={"width": width})
    net.grow(num_classes)
    if grow_twice:
        net.grow(num_classes + 2)
    net = net.to(dtype).train()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average
    with torch.no_grad():
        for backbone in net.backbones:
            backbone.train()(torch.randn(32, 3, 8, 8, dtype=dtype))
    return net


def _batches(n=4, size=8, classes=3, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, 3, size, size, generator=gen, dtype=dtype)
    x2 = torch.randn(n, 3, size, size, generator=gen, dtype=dtype)
    y1 = torch.randint(0, classes, (n,), generator=gen)
    y2 = torch.randint(0, classes, (n,), generator=gen)
    return (x1, y1), (x2, y2)


def test_counts_and_schedule():
    assert num_meta_iters(0.5, 10) == 5 and num_meta_iters(0.5, 1) == 0
    assert [e for e in range(10) if refresh_due(e, 10, 3)] == [3, 6]
    assert [e for e in range(9) if refresh_due(e, 9, 4)] == [4]  # not at the last epoch


def test_inner_parameters_exclude_heads_phi_and_frozen():
    net = _toy(grow_twice=True)
    names = inner_parameter_names(net)
    assert names and all(n.startswith("backbones.1.") for n in names)
    assert not any(".rational." in n for n in names)


@pytest.mark.parametrize("boosting", [False, True])
def test_meta_step_changes_phi_only(boosting):
    net = _toy(grow_twice=boosting)
    net.train()
    _, phi = split_parameters(net)
    optimizer = torch.optim.Adam(list(phi.values()), lr=0.01)
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in net.named_buffers()}
    batch, next_batch = _batches(classes=net.num_classes)
    out = meta_step(net, batch, next_batch, phi_optimizer=optimizer, inner_lr=0.01, compress_ratio=4.0,
                    div_coef=0.2, reg_coef=0.1, max_grad_norm=1.0)
    assert all(torch.isfinite(v).all() for v in out.values())
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, params[n])}
    assert changed and changed <= set(phi)
    assert all(torch.equal(b, buffers[n]) for n, b in net.named_buffers())  # BN statistics untouched
    assert net.training  # mode restored
    # theta received no gradient at all
    assert all(p.grad is None for n, p in net.named_parameters() if n not in phi)


def test_meta_step_clips_phi_gradient():
    net = _toy()
    _, phi = split_parameters(net)
    optimizer = torch.optim.SGD(list(phi.values()), lr=0.0)
    batch, next_batch = _batches()
    out = meta_step(net, batch, next_batch, phi_optimizer=optimizer, inner_lr=0.1, compress_ratio=4.0,
                    div_coef=0.2, reg_coef=0.1, max_grad_norm=1e-3)
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in phi.values() if p.grad is not None]))
    assert float(out["phi_grad_norm"]) > 1e-3
    assert float(total) == pytest.approx(1e-3, rel=1e-4)


def test_meta_objective_phi_gradient_matches_finite_differences():
    """d outer / d phi (through cam -> soft_compress -> inner step -> fast weights -> outer loss, plus div and reg)
    against central differences of the same objective, in float64 on a toy network."""
    net = _toy(dtype=torch.float64, width=2, seed=3)
    batch, next_batch = _batches(dtype=torch.float64, seed=4)
    kwargs = dict(inner_lr=0.1, compress_ratio=4.0, div_coef=0.2, reg_coef=0.1)
    _, phi = split_parameters(net)
    phi_list = list(phi.values())
    outer, _ = meta_objective(net, batch, next_batch, **kwargs)
    grads = torch.autograd.grad(outer, phi_list)
    # the soft-compression path really contributes: the gradient differs from that of div + reg alone
    direct = torch.autograd.grad(meta_objective(net, batch, next_batch, **{**kwargs, "inner_lr": 0.0})[0], phi_list)
    assert any(not torch.allclose(g, d) for g, d in zip(grads, direct))

    def value():
        return float(meta_objective(net, batch, next_batch, **kwargs)[0].detach())

    gen = torch.Generator().manual_seed(5)
    eps = 1e-6
    for _ in range(3):
        directions = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in phi_list]
        with torch.no_grad():
            for p, d in zip(phi_list, directions):
                p.add_(eps * d)
        plus = value()
        with torch.no_grad():
            for p, d in zip(phi_list, directions):
                p.sub_(2 * eps * d)
        minus = value()
        with torch.no_grad():
            for p, d in zip(phi_list, directions):
                p.add_(eps * d)
        numeric = (plus - minus) / (2 * eps)
        analytic = float(sum((g * d).sum() for g, d in zip(grads, directions)))
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def _original_phi_gradient(net, batch, next_batch, *, inner_lr, ratio, div_coef, reg_coef, inner_loss):
    """phi's gradient of the original's meta-objective (xfflzl/CIM-CIL models/foster.py, the meta-iteration), built
    from plain PyTorch: the cim_ext.reference ops (rational, cam via bmm, bilinear upsampling, down_up) and autograd,
    theta detached nowhere. Requires the Rational modules to evaluate cim_ext.reference.rational (monkeypatched)."""
    (x, y), (x2, y2) = batch, next_batch
    params = dict(net.named_parameters())
    phi = {n: p for n, p in params.items() if p.requires_grad and ".rational." in n}
    theta = {n: p for n, p in params.items() if p.requires_grad and ".rational." not in n and "fc" not in n}
    net.eval()
    ratl = net(x, activation="rational")
    div = torch.nn.functional.cross_entropy(ratl["logits"], y)
    fmaps = ratl["fmaps"]
    bz, nc, h, w = fmaps.shape
    cams = torch.bmm(net.fc.weight[y].detach().unsqueeze(1), fmaps.reshape(bz, nc, h * w)).reshape(bz, 1, h, w)
    cams = cams - cams.amin(dim=(2, 3), keepdim=True)
    cams = cams / cams.amax(dim=(2, 3), keepdim=True)
    reg = torch.nn.functional.mse_loss(cams, torch.zeros_like(cams))
    up = torch.nn.functional.interpolate(cams, size=x.shape[-2:], mode="bilinear", align_corners=False)
    hybrid = up * x + (1.0 - up) * reference.down_up(x, ratio)
    inner = inner_loss(net(hybrid, activation="relu"), y)
    grads = torch.autograd.grad(inner, list(theta.values()), create_graph=True)
    fast = {n: p - inner_lr * g for (n, p), g in zip(theta.items(), grads)}
    logits = torch.func.functional_call(net, fast, (x2,), {"activation": "relu"}, strict=False)["logits"]
    outer = torch.nn.functional.cross_entropy(logits, y2) + div_coef * div + reg_coef * reg
    return dict(zip(phi, torch.autograd.grad(outer, list(phi.values()))))


def _meta_step_phi_gradient(net, batch, next_batch, *, meta_gradient="exact", **kwargs):
    _, phi = split_parameters(net)
    optimizer = torch.optim.SGD(list(phi.values()), lr=0.0)
    meta_step(net, batch, next_batch, phi_optimizer=optimizer, max_grad_norm=None, meta_gradient=meta_gradient,
              **kwargs)
    return {n: p.grad for n, p in phi.items()}


@pytest.mark.parametrize("boosting", [False, True])
def test_meta_step_gradient_is_the_original(boosting, monkeypatch):
    """meta_step's phi gradient (kernels, double backward through rational, cam and soft_compress) equals the
    original's meta-gradient built from plain PyTorch, in phase 0 (CE inner loss) and in a boosting phase (the FOSTER
    inner loss, old backbone frozen whole); the first-order variant does not."""
    net = _toy(num_classes=3, width=2, dtype=torch.float64, seed=7, grow_twice=boosting)
    classes = net.num_classes
    batch, next_batch = _batches(n=6, size=12, classes=classes, dtype=torch.float64, seed=8)
    if boosting:
        weights = torch.linspace(0.5, 1.5, classes, dtype=torch.float64)
        inner_loss = lambda out, y: foster_loss(out, y, class_weights=weights, T=2.0, lambda_okd=1.0)[0]  # noqa: E731
    else:
        inner_loss = lambda out, y: torch.nn.functional.cross_entropy(out["logits"], y)  # noqa: E731
    kwargs = dict(inner_lr=0.05, div_coef=0.2, reg_coef=0.1, inner_loss=inner_loss)
    got = _meta_step_phi_gradient(net, batch, next_batch, compress_ratio=4.0, **kwargs)
    first_order = _meta_step_phi_gradient(net, batch, next_batch, compress_ratio=4.0, meta_gradient="first_order",
                                          **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(cim_ext.ops, "rational", reference.rational)
        expected = _original_phi_gradient(net, batch, next_batch, ratio=4.0, **kwargs)
    assert expected and sorted(got) == sorted(expected)
    if boosting:
        assert all(n.startswith("backbones.1.") for n in expected)  # the old backbone's rationals are frozen
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-12, msg=name)
    flat = lambda grads: torch.cat([grads[n].flatten() for n in sorted(expected)])  # noqa: E731
    assert not torch.allclose(flat(first_order), flat(expected), rtol=1e-3, atol=0)


class _SizedImages:
    """A minimal ImageSet with images of different sizes."""

    def __init__(self, sizes, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.images = [torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8) for h, w in sizes]
        self.targets = np.arange(len(sizes), dtype=np.int64) % 2

    def __len__(self):
        return len(self.images)

    def load(self, i):
        return None if i == 3 else self.images[i]  # image 3 is "unreadable"


@pytest.mark.parametrize("threshold", [0.5, "otsu"])
@pytest.mark.parametrize("activation", ["relu", "rational"])
def test_compute_boxes_at_original_size(threshold, activation):
    images = _SizedImages([(20, 30), (16, 16), (40, 24), (18, 18), (33, 17)])
    net = _toy(num_classes=2, width=2)
    net.train()
    dataset = CamDataset(images, range(5), build_transform("cam", 16, augment=False), {0: 0, 1: 1})
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_skip_bad)
    table = compute_boxes(net, loader, activation=activation, threshold=threshold,
                          runtime=Runtime(device=torch.device("cpu")))
    assert net.training
    assert sorted(table.indices.tolist()) == [0, 1, 2, 4]
    for index in table.indices.tolist():
        h, w = images.images[index].shape[1:]
        y0, y1, x0, x1 = table.box(index).tolist()
        assert 0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w
    assert table.sizes.tolist() == [list(images.images[i].shape[1:]) for i in table.indices.tolist()]
    # equal to the public op on the same inputs
    net.eval()
    x = torch.stack([dataset[i][0] for i in (0, 1)])
    fmaps = net(x, activation=activation)["fmaps"]
    expected = cim_ext.cam_to_boxes(fmaps, net.fc.weight.detach(), torch.tensor([0, 1]),
                                     torch.tensor([[20, 30], [16, 16]]), threshold)
    assert torch.equal(torch.stack([table.box(0), table.box(1)]), expected)
    restored = BoxTable.from_state(table.state_dict())
    assert torch.equal(restored.box(2), table.box(2)) and 0 <= table.area_fraction() <= 1


def test_image_box_dataset_compresses_with_the_box():
    images = _SizedImages([(16, 16), (16, 16), (16, 16)])
    boxes = BoxTable(torch.tensor([0, 1]), torch.tensor([[2, 10, 4, 12], [0, 0, 0, 0]]),
                     torch.tensor([[16, 16], [16, 16]]))
    identity = lambda x: x  # noqa: E731
    always = ImageBoxDataset(images, [0, 1, 2], identity, {0: 0, 1: 1}, boxes=boxes, prob=1.0, ratio=4.0,
                             return_size=True)
    image, label, index, size = always[0]
    assert torch.equal(image, cim_ext.compress(images.images[0][None], boxes.box(0)[None], 4.0)[0])
    assert (label, index, size.tolist()) == (0, 0, [16, 16])
    assert torch.equal(always[2][0], images.images[2])  # no box: unchanged
    never = ImageBoxDataset(images, [0], identity, {0: 0, 1: 1}, boxes=boxes, prob=0.0, ratio=4.0)
    assert torch.equal(never[0][0], images.images[0])
    torch.manual_seed(0)
    sometimes = ImageBoxDataset(images, [0] * 200, identity, {0: 0, 1: 1}, boxes=boxes, prob=0.3, ratio=4.0)
    hits = sum(not torch.equal(sometimes[i][0], images.images[0]) for i in range(200))
    assert 30 < hits < 90
