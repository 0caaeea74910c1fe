"""The boxes a compression setting stores exemplars with, and how good they are.

``cam``: CAM boxes of the ReLU branch; ``cim``: of the rational branch; ``gt``: the source's own object boxes;
``downsample``: empty boxes (the whole image downsampled); ``none``: no boxes. The threshold is the config's, or with
``threshold="calibrated"`` the fixed threshold chosen at the end of phase 0 on held-out images of the phase-0
classes (:func:`training.cim.calibrate_threshold`).
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch

from .. import cim as cim_lib
from ..config import ConfigError
from ..data.boxes import centred_boxes

__all__ = ["BoxFinder", "box_quality", "check_box_sources"]


def box_quality(table: cim_lib.BoxTable, truth) -> dict:
    """Mean box area fraction of a box table and, where the source has true object boxes (``truth``), the mean IoU
    of the boxes with them beside two baselines: the whole-image box, and the centre prior (a centred box of the same
    area as each box: what the box size alone buys)."""
    quality = {"box_area": table.area_fraction()}
    if truth is not None and len(table):
        whole = torch.zeros_like(table.boxes)
        whole[:, 1], whole[:, 3] = table.sizes[:, 0], table.sizes[:, 1]
        scores = truth.best_iou(table.indices, table.boxes)
        if not bool(scores.isnan().all()):  # images without a true box are left out of the means
            quality["box_iou"] = float(scores.nanmean())
            quality["box_iou_whole_image"] = float(truth.best_iou(table.indices, whole).nanmean())
            centred = centred_boxes(table.boxes, table.sizes)
            quality["box_iou_centre_prior"] = float(truth.best_iou(table.indices, centred).nanmean())
    return quality


def check_box_sources(cfg, source) -> None:
    """One-line errors, before any training, for settings that need what the source may lack."""
    if cfg.compression == "gt" and getattr(source.train, "object_boxes", None) is None:
        raise ConfigError(f"compression=gt stores exemplars with the source's own object boxes, and {source.name!r} "
                          "has none (synthetic, tinyimagenet and ImageNet with its localisation files have them)")
    if cfg.threshold == "calibrated" and cfg.compression in ("cam", "cim"):
        heldout = getattr(source, "heldout", None)
        if heldout is None or heldout.object_boxes is None:
            raise ConfigError(f"threshold=calibrated chooses the threshold on held-out images with object boxes, and "
                              f"{source.name!r} has none: set data_options.heldout_per_class (synthetic, "
                              "tinyimagenet)")


class BoxFinder:
    """Boxes of a phase's new-class training images for one compression setting.

    Args:
        cfg, stream, runtime: the run's config, class stream and runtime.
        transform: the CAM transform (whole image resized, no crop).
        loader: ``loader(dataset, batch_size, shuffle=...)``, the learner's seeded loaders.
    """

    def __init__(self, *, cfg, stream, runtime, transform, loader):
        self.cfg, self.stream, self.runtime = cfg, stream, runtime
        self.transform = transform
        self.loader = loader
        self.calibration: Union[dict, None] = None  # threshold="calibrated": the choice made at the end of phase 0

    @property
    def threshold(self) -> Union[float, str]:
        """The config's threshold, or the calibrated one (``mask_threshold`` until phase 0 has chosen it)."""
        if self.cfg.threshold != "calibrated":
            return self.cfg.cam_threshold
        return self.cfg.mask_threshold if self.calibration is None else self.calibration["threshold"]

    def cam_boxes(self, network, phase, activation: str) -> cim_lib.BoxTable:
        """CAM boxes of the new-class training images on one branch; every rank uses rank 0's."""
        dataset = cim_lib.CamDataset(self.stream.source.train, self.stream.train_indices(phase.classes),
                                     self.transform, self.stream.label_map)
        table = cim_lib.compute_boxes(network, self.loader(dataset, self.cfg.cam_batch_size, shuffle=False),
                                      activation=activation, threshold=self.threshold, runtime=self.runtime)
        return self.runtime.broadcast_object(table)

    def final(self, network, phase) -> Union[cim_lib.BoxTable, None]:
        """The boxes the phase's exemplars are stored with (None: uncompressed)."""
        mode = self.cfg.compression
        if mode in ("cam", "cim") and self.cfg.threshold == "calibrated" and self.calibration is None:
            self.calibrate(network, phase, "rational" if mode == "cim" else "relu")
        if mode == "gt":
            return cim_lib.truth_boxes(self.stream.source.train, self.stream.train_indices(phase.classes))
        if mode == "cim":
            return self.cam_boxes(network, phase, "rational")
        if mode == "cam":
            return self.cam_boxes(network, phase, "relu")
        if mode == "downsample":
            return cim_lib.BoxTable.empty_boxes(self.stream.train_indices(phase.classes))
        return None

    def calibrate(self, network, phase, activation: str) -> None:
        """Choose the threshold on the held-out images of ``phase``'s classes."""
        heldout = self.stream.source.heldout
        indices = np.flatnonzero(np.isin(np.asarray(heldout.targets), list(phase.classes)))
        dataset = cim_lib.CamDataset(heldout, indices, self.transform, self.stream.label_map)
        result = cim_lib.calibrate_threshold(network, self.loader(dataset, self.cfg.cam_batch_size, shuffle=False),
                                             heldout.object_boxes, activation=activation, runtime=self.runtime)
        self.calibration = self.runtime.broadcast_object(result)

    def quality(self, table) -> dict:
        return box_quality(table, getattr(self.stream.source.train, "object_boxes", None))
