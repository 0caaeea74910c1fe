"""cim_ext.nn.Rational: ReLU initialisation, repr, parameters, state_dict, use inside a compiled model."""
import pytest
import torch
from torch import nn

import cim_ext
from cim_ext import reference
from cim_ext.nn import RELU_INIT, Rational

from conftest import cpu_and_cuda

# The published version-A (5, 4) fit to ReLU on [-3, 3] is off by at most a0 = 0.02996 (at x = 0), 0.0036 on average.
RELU_FIT_MAX_ERROR = 0.0301
RELU_FIT_MEAN_ERROR = 0.004


def test_relu_init_approximates_relu():
    module = Rational()
    x = torch.linspace(-3, 3, 60001)
    with torch.no_grad():
        error = (module(x) - x.relu()).abs()
    assert error.max() <= RELU_FIT_MAX_ERROR
    assert error.mean() <= RELU_FIT_MEAN_ERROR


def test_relu_init_coefficients_and_degrees():
    module = Rational(init="relu")
    assert module.numerator.shape == (6,) and module.denominator.shape == (4,)
    torch.testing.assert_close(module.numerator.double(), torch.tensor(RELU_INIT["numerator"], dtype=torch.float64))
    torch.testing.assert_close(
        module.denominator.double(), torch.tensor(RELU_INIT["denominator"], dtype=torch.float64)
    )


def test_repr():
    assert repr(Rational()) == "Rational(init='relu', degrees=(5, 4))"


def test_unknown_init_raises():
    with pytest.raises(ValueError, match="init"):
        Rational(init="tanh")


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_forward_matches_reference(device):
    module = Rational().to(device)
    x = torch.randn(2, 3, 5, 7, device=device) * 2
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference.rational(x, module.numerator, module.denominator))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_parameters_get_grads(device):
    module = Rational().to(device)
    assert [name for name, _ in module.named_parameters()] == ["numerator", "denominator"]
    x = torch.randn(4, 8, 3, device=device, requires_grad=True)
    module(x).square().mean().backward()
    for tensor in (x, module.numerator, module.denominator):
        assert tensor.grad is not None and tensor.grad.shape == tensor.shape
        assert torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


def test_float64_input_with_float32_parameters():
    module = Rational()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    out = module(x)
    assert out.dtype == torch.float64
    out.sum().backward()
    assert module.numerator.grad.dtype == torch.float32 and x.grad.dtype == torch.float64


def test_state_dict_round_trip():
    trained = Rational()
    with torch.no_grad():
        trained.numerator.add_(torch.linspace(-0.1, 0.1, 6))
        trained.denominator.mul_(1.5)
    restored = Rational()
    restored.load_state_dict(trained.state_dict())
    assert set(trained.state_dict()) == {"numerator", "denominator"}
    x = torch.randn(5, 7)
    with torch.no_grad():
        assert torch.equal(restored(x), trained(x))
        assert not torch.equal(Rational()(x), trained(x))


def _small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        Rational(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        Rational(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_small_model_under_torch_compile(backend):
    torch._dynamo.reset()
    eager = _small_model()
    compiled_model = _small_model()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, backend=backend)
    x = torch.randn(2, 3, 9, 11).to(memory_format=torch.channels_last)
    labels = torch.tensor([1, 4])
    losses = []
    for model in (eager, compiled):
        loss = nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0])
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, msg=name)


def test_module_is_exported():
    assert cim_ext.nn.Rational is Rational
