"""torch.compile(fullgraph=True) of the two paths training compiles: CAM -> boxes -> compressed exemplars and their
cost, and a conv + Rational block forward and backward. A graph break (a host sync such as ``int(tensor)`` in a
wrapper, or an op without a fake kernel) fails these tests."""
import pytest
import torch

import cim_ext
from conftest import cpu_and_cuda

BACKENDS = ["eager", "aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]


def _pipeline_inputs(device):
    gen = torch.Generator().manual_seed(0)
    fmaps = torch.rand(4, 8, 7, 7, generator=gen).to(device)
    weight = torch.randn(5, 8, generator=gen).to(device)
    labels = torch.tensor([0, 4, 2, 2], device=device)
    images = torch.randint(0, 256, (4, 3, 40, 36), generator=gen, dtype=torch.uint8).to(device)
    return fmaps, weight, labels, images


def _pipeline(fmaps, weight, labels, images):
    size = (images.shape[2], images.shape[3])
    boxes = cim_ext.cam_to_boxes(fmaps, weight, labels, size, 0.6)
    return boxes, cim_ext.compress(images, boxes, 4.0), cim_ext.compress_cost(boxes, size, 4.0)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("backend", BACKENDS)
def test_boxes_compress_cost_compile_without_graph_breaks(device, backend):
    inputs = _pipeline_inputs(device)
    torch._dynamo.reset()
    compiled = torch.compile(_pipeline, backend=backend, fullgraph=True)
    for got, expected in zip(compiled(*inputs), _pipeline(*inputs)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_rational_block_compiles_forward_and_backward(device, backend, channels_last):
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), cim_ext.nn.Rational()).to(device)
    x = torch.randn(2, 3, 9, 7, device=device)
    if channels_last:
        block = block.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)

    def loss(module, inputs):
        return module(inputs).square().mean()

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend=backend, fullgraph=True)
    got = compiled(block, x)
    got_grads = torch.autograd.grad(got, list(block.parameters()))
    expected = loss(block, x)
    expected_grads = torch.autograd.grad(expected, list(block.parameters()))
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e)
