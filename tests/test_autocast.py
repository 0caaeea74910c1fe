"""Autocast: cam, cam_to_boxes and soft_compress run in float32 under torch.autocast (like torchvision's
roi_align), so half-precision inputs beside float32 ones just work; outside autocast mixed dtypes still raise."""
import pytest
import torch

import cim_ext

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _cam_inputs(device, generator):
    fmaps = torch.randn(5, 7, 3, 4, generator=generator).to(device)
    weight = torch.randn(6, 7, generator=generator).to(device)
    labels = torch.tensor([0, 5, 2, 2, 3], device=device)
    return fmaps, weight, labels


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_cam_and_boxes_compute_in_float32_under_autocast(device, half):
    fmaps, weight, labels = _cam_inputs(device, torch.Generator().manual_seed(0))
    low = fmaps.to(half)
    with torch.autocast(device, dtype=torch.bfloat16):
        cams = cim_ext.cam(low, weight, labels)
        boxes = cim_ext.cam_to_boxes(low, weight, labels, (13, 17), 0.6)
        otsu = cim_ext.cam_to_boxes(low, weight, labels, (13, 17), "otsu")
    assert cams.dtype == torch.float32
    torch.testing.assert_close(cams, cim_ext.cam(low.float(), weight, labels), rtol=0, atol=0)
    assert torch.equal(boxes, cim_ext.cam_to_boxes(low.float(), weight, labels, (13, 17), 0.6))
    assert torch.equal(otsu, cim_ext.cam_to_boxes(low.float(), weight, labels, (13, 17), "otsu"))
    with pytest.raises(ValueError, match="fmaps|weight"):
        cim_ext.cam(low, weight, labels)  # no autocast: no half precision on CPU, matching dtypes on CUDA


@pytest.mark.parametrize("device", DEVICES)
def test_soft_compress_under_autocast_and_its_gradient(device):
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 9, 11, generator=generator).to(device).to(torch.bfloat16).requires_grad_()
    cams = torch.rand(2, 3, 4, generator=generator).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = cim_ext.soft_compress(images, cams, 4.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, cim_ext.soft_compress(images.detach().float(), cams, 4.0), rtol=0, atol=0)
    out.sum().backward()
    assert images.grad is not None and images.grad.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="images|cams"):  # outside autocast: CPU kernels take no bf16 at all
        cim_ext.soft_compress(images.detach(), cams, 4.0)


def test_float64_is_not_cast_and_still_must_match():
    fmaps, weight, labels = _cam_inputs("cpu", torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cim_ext.cam(fmaps.double(), weight.double(), labels).dtype == torch.float64
        with pytest.raises(ValueError, match="weight"):
            cim_ext.cam(fmaps.double(), weight, labels)
