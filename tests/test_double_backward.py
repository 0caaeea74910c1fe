"""How cim_ext's differentiable ops reach second order: first-order gradients run the compiled backward kernels only,
and a graph built through them (create_graph=True) is differentiated through cim_ext.reference."""
import pytest
import torch

import cim_ext
from cim_ext import reference


def _inputs():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 9, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    fmaps = torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    numerator = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    denominator = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    return images, fmaps, weight, numerator, denominator


def _pipeline(images, fmaps, weight, numerator, denominator):
    """rational -> cam -> soft_compress, as in the CIM meta-step."""
    activated = cim_ext.rational(fmaps, numerator, denominator)
    cams = cim_ext.cam(activated, weight, torch.tensor([1, 3]))
    return cim_ext.soft_compress(images, cams, 4.0)


def _refuse(*args, **kwargs):
    raise AssertionError("the reference was called")


@pytest.fixture
def no_reference(monkeypatch):
    for name in ("cam", "soft_compress", "rational"):
        monkeypatch.setattr(reference, name, _refuse)


def test_first_order_gradients_never_touch_the_reference(no_reference):
    inputs = _inputs()
    grads = torch.autograd.grad(_pipeline(*inputs).square().sum(), inputs)
    assert all(torch.isfinite(g).all() for g in grads)
    # create_graph=True still computes the first-order values with the kernels
    grads = torch.autograd.grad(_pipeline(*inputs).square().sum(), inputs, create_graph=True)
    assert all(g.requires_grad for g in grads)
    with pytest.raises(AssertionError, match="the reference was called"):  # second order does use it
        torch.autograd.grad(grads[1].sum(), inputs[3])


def test_second_order_through_the_pipeline_equals_the_reference():
    inputs = _inputs()

    def reference_pipeline(images, fmaps, weight, numerator, denominator):
        cams = reference.cam(reference.rational(fmaps, numerator, denominator), weight, torch.tensor([1, 3]))
        return reference.soft_compress(images, cams, 4.0)

    def second(fn):
        grads = torch.autograd.grad(fn(*inputs).square().sum(), inputs[1:], create_graph=True)
        return torch.autograd.grad(sum((g * g).sum() for g in grads), inputs)

    for got, want in zip(second(_pipeline), second(reference_pipeline)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
