"""Data for class-incremental training: image sources, class order and phases, transforms, phase datasets.

See docs/data.md for the layouts each source expects and the measured properties of the synthetic set.
"""
from .phases import PhaseDataset, class_indices, class_order, collate_skip_bad, phase_classes
from .sources import (
    SOURCES,
    BadImageError,
    BadImageWarning,
    DataRootError,
    FileImageSet,
    ImageSet,
    Source,
    TensorImageSet,
    decode_image,
    imagenet100_wnids,
    load_source,
)
from .synthetic import SyntheticSpec, class_glyphs
from .transforms import TRANSFORM_KINDS, build_transform

__all__ = [
    "ImageSet",
    "FileImageSet",
    "TensorImageSet",
    "Source",
    "SOURCES",
    "load_source",
    "imagenet100_wnids",
    "decode_image",
    "DataRootError",
    "BadImageError",
    "BadImageWarning",
    "class_order",
    "phase_classes",
    "class_indices",
    "PhaseDataset",
    "collate_skip_bad",
    "build_transform",
    "TRANSFORM_KINDS",
    "SyntheticSpec",
    "class_glyphs",
]
