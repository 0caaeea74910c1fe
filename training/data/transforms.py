"""Image transforms (torchvision.transforms.v2 on uint8 Tensor[3, H, W]) as in the original, scaled to size S.

Original (ImageNet, S = 224): train RandomResizedCrop(224) + horizontal flip + ColorJitter(brightness=63/255) +
AutoAugment (ImageNet policy); test Resize(256) + CenterCrop(224); CAM Resize((224, 224)); then ToTensor +
Normalize(ImageNet mean/std). Here 256 becomes round(S * 256 / 224).

``augment=False`` selects the light pipeline for small native-size images (the synthetic set, fast CPU runs), which
never resamples an image that is already S x S, so one-pixel detail survives: train Resize(S) + RandomCrop(S,
padding=S/8) + flip; test Resize(S) + CenterCrop(S). Resize of an S x S image is the identity.
"""
import torch
from torchvision.transforms import v2

__all__ = ["build_transform", "TRANSFORM_KINDS", "IMAGENET_MEAN", "IMAGENET_STD"]

TRANSFORM_KINDS = ("train", "test", "cam")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transform(kind, image_size, *, augment=True):
    """Transform of uint8 Tensor[3, H, W] (any H, W) to float32 normalised Tensor[3, S, S], S = ``image_size``.

    Args:
        kind: ``"train"``, ``"test"`` or ``"cam"`` (the input of box computation: Resize((S, S)), no crop).
        image_size: S.
        augment: the original augmentation (True) or the light pipeline for small native-size images (False).
    """
    if kind not in TRANSFORM_KINDS:
        raise ValueError(f"transform kind must be one of {', '.join(TRANSFORM_KINDS)}, got {kind!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    size = image_size
    if kind == "train":
        if augment:
            steps = [
                v2.RandomResizedCrop(size, antialias=True),
                v2.RandomHorizontalFlip(),
                v2.ColorJitter(brightness=63 / 255),
                v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET),
            ]
        else:
            steps = [
                v2.Resize(size, antialias=True),
                v2.RandomCrop(size, padding=max(1, size // 8)),
                v2.RandomHorizontalFlip(),
            ]
    elif kind == "test":
        resize = round(size * 256 / 224) if augment else size
        steps = [v2.Resize(resize, antialias=True), v2.CenterCrop(size)]
    else:
        steps = [v2.Resize((size, size), antialias=True)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)
