"""Value checks without host syncs: CPU kernels raise at once (the host reads the data for free); CUDA kernels record
the first bad value in mapped host memory, write a defined result for that sample, and the error is raised at the
next cim_ext call on CUDA or by cim_ext.check_errors() (never a device assert, which would kill the CUDA context)."""
import pytest
import torch

import cim_ext
from conftest import needs_cuda


def _cam_inputs(device):
    gen = torch.Generator().manual_seed(0)
    fmaps = torch.randn(3, 4, 5, 6, generator=gen).to(device)
    weight = torch.randn(3, 4, generator=gen).to(device)
    return fmaps, weight


def test_cpu_bad_values_raise_at_once_and_check_errors_is_a_no_op():
    fmaps, weight = _cam_inputs("cpu")
    bad = torch.tensor([0, 3, 1])
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 3\).*3 at index 1"):
        cim_ext.cam(fmaps, weight, bad)
    with pytest.raises(ValueError, match="labels"):
        cim_ext.cam_to_boxes(fmaps, weight, bad, (10, 12), 0.6)
    with pytest.raises(ValueError, match="sizes"):
        cim_ext.cam_boxes(torch.rand(2, 3, 3), torch.tensor([[4, 4], [0, 5]]), 0.5)
    cim_ext.check_errors()


def _run(op, fmaps, weight, labels):
    if op == "cam":
        return cim_ext.cam(fmaps, weight, labels)
    if op == "cam_backward":  # the backward kernel alone (a forward call would record the error first)
        grad = torch.ones(fmaps.shape[0], fmaps.shape[2], fmaps.shape[3], device=fmaps.device)
        return torch.ops.cim_ext._cam_backward(grad, fmaps, weight, labels, True, True, True)[0]
    return cim_ext.cam_to_boxes(fmaps, weight, labels, (10, 12), 0.6)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("op", ["cam", "cam_backward", "cam_to_boxes"])
def test_cuda_bad_labels_are_deferred_not_fatal(op):
    fmaps, weight = _cam_inputs("cuda")
    out = _run(op, fmaps, weight, torch.tensor([0, 3, 1], device="cuda"))
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 3\).*3 at index 1"):
        cim_ext.check_errors()
    cim_ext.check_errors()  # reported once, then cleared
    expected = _run(op, fmaps, weight, torch.tensor([0, 0, 1], device="cuda"))  # the CUDA context is alive
    assert not out[1].any()  # the bad sample gets a defined zero result
    torch.testing.assert_close(out[[0, 2]], expected[[0, 2]], rtol=0, atol=0)
    cim_ext.check_errors()


@needs_cuda
@pytest.mark.cuda
def test_cuda_deferred_error_surfaces_at_the_next_call():
    fmaps, weight = _cam_inputs("cuda")
    cim_ext.cam(fmaps, weight, torch.tensor([0, -1, 1], device="cuda"))
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="labels.*-1 at index 1"):
        cim_ext.cam(fmaps, weight, torch.tensor([0, 1, 1], device="cuda"))
    sizes = torch.tensor([[4, 4], [0, 5]], device="cuda")
    boxes = cim_ext.cam_boxes(torch.rand(2, 3, 3, device="cuda"), sizes, 0.5)
    with pytest.raises(ValueError, match="sizes: expected positive"):
        cim_ext.check_errors()
    assert boxes[1].tolist() == [0, 0, 0, 0]


@needs_cuda
@pytest.mark.cuda
def test_cuda_calls_never_wait_for_the_device():
    fmaps, weight = _cam_inputs("cuda")
    labels = torch.tensor([0, 2, 1], device="cuda")
    images = torch.randint(0, 256, (3, 3, 20, 24), dtype=torch.uint8, device="cuda")
    x = torch.randn(2, 5, 6, 7, device="cuda", requires_grad=True)
    rational = cim_ext.nn.Rational().cuda()
    cim_ext.cam(fmaps, weight, labels)  # first calls allocate the error report and load kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        boxes = cim_ext.cam_to_boxes(fmaps, weight, labels, (20, 24), 0.6)
        cim_ext.cam_to_boxes(fmaps, weight, labels, (20, 24), "otsu")
        cim_ext.compress(images, boxes, 4.0)
        cim_ext.compress_cost(boxes, (20, 24), 4.0)
        cim_ext.soft_compress(images.float(), cim_ext.cam(fmaps, weight, labels), 4.0)
        rational(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
