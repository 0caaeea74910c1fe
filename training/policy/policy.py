"""The CIM memory policy of a run: what its compression setting (``none`` / ``downsample`` / ``cam`` / ``cim`` /
``gt``) does to a learner's exemplar memory and training data, apart from any learner.

A learner drives it through one phase as follows (docs/learners.md):

1. ``begin_phase(phase, network, phi_scheduler)`` when the phase's network is built;
2. each epoch of its training stage: ``before_epoch(...)`` (with ``cim``, the boxes of the new-class images are
   refreshed every ``cam_update_interval`` epochs and the box-compression augmentation probability grows),
   ``train_dataset(phase, transform)`` (new-class images, box-compressed at that probability, plus the memory),
   ``after_epoch(phase, network, inner)`` (with ``cim``, the meta-iterations that train phi, with the learner's
   :class:`~training.policy.InnerStep`);
3. ``end_training()`` when that stage is over, ``end_phase(phase, network)`` to update the memory (boxes ->
   compressed exemplars -> cost-aware herding), ``after_task()``.

What it needs from the network: ``network(x, activation="relu"|"rational")`` returning ``features``, ``fmaps`` and
``logits``, and ``network.fc`` whose weight rows map the channels of ``fmaps`` to the classes (the CAM).
"""
from __future__ import annotations

from typing import Callable, Union

from torch.utils.data import ConcatDataset, Dataset

from .. import cim as cim_lib
from ..exemplar_store import ExemplarStore
from ..memory import ExemplarMemory
from .boxes import BoxFinder, check_box_sources
from .exemplars import update_memory
from .meta import InnerStep, PhiLearner

__all__ = ["CIMPolicy", "memory_mode"]


def memory_mode(compression: str) -> str:
    """ExemplarMemory mode of a compression setting."""
    return {"none": "none", "downsample": "downsample", "cam": "cam", "cim": "cam", "gt": "cam"}[compression]


def _quality_text(quality: dict) -> str:
    text = f"area {quality['box_area']:.3f}"
    if "box_iou" in quality:
        text += (f", IoU with the true boxes {quality['box_iou']:.3f} (whole image {quality['box_iou_whole_image']:.3f}, "
                 f"centre prior {quality['box_iou_centre_prior']:.3f})")
    return text


class _Transformed(Dataset):
    """Items (image, label, index) of a dataset of uint8 images, with ``transform`` applied to the image."""

    def __init__(self, dataset, transform):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label, index = self.dataset[i]
        return self.transform(image), label, index


class CIMPolicy:
    """The exemplar memory, boxes and phi training of one run.

    Args:
        cfg, stream, runtime: the run's config, class stream and runtime.
        transforms: the learner's ``{"train", "test", "cam"}`` transforms.
        loader: ``loader(dataset, batch_size, *, shuffle, shard=True)``, the learner's seeded loaders.
        memory_dir: directory of the exemplar store (encoded exemplars on disk, ``cfg.memory_codec``); None keeps
            the exemplars' pixels in RAM.
        status: ``status(text)`` for one-line reports (box refresh, memory update).
    """

    def __init__(self, *, cfg, stream, runtime, transforms: dict, loader: Callable,
                 memory_dir: Union[str, None] = None, status: Callable[[str], None] = lambda text: None):
        check_box_sources(cfg, stream.source)
        self.cfg, self.stream, self.runtime = cfg, stream, runtime
        self.transforms = transforms
        self.loader = loader
        self.status = status
        store = None if memory_dir is None else ExemplarStore(memory_dir, codec=cfg.memory_codec,
                                                              quality=cfg.memory_quality, writer=runtime.is_main)
        self.memory = ExemplarMemory(ratio=cfg.compress_ratio, mode=memory_mode(cfg.compression), store=store)
        self.exemplar_cams: dict = {}  # class id -> {"indices", "cams"} of its exemplars at selection (visualize)
        self.finder = BoxFinder(cfg=cfg, stream=stream, runtime=runtime, transform=transforms["cam"], loader=loader)
        self.phi = PhiLearner(cfg=cfg, runtime=runtime, loader=loader)
        self.boxes: Union[cim_lib.BoxTable, None] = None  # cim: the latest in-phase boxes (augmentation)
        self.aug_prob = 0.0
        self.phase_log: dict = {}
        self.refreshed: Union[dict, None] = None  # the last refresh: phase, epoch, quality (asked again on resume)
        self._memory_view = None

    @property
    def learns_phi(self) -> bool:
        return self.cfg.compression == "cim"

    @property
    def calibration(self) -> Union[dict, None]:
        return self.finder.calibration

    # ---------------------------------------------------------------- phase
    def begin_phase(self, phase, network, phi_scheduler: Callable) -> None:
        """A new phase: no boxes yet; with ``cim``, phi's optimiser scheduled by ``phi_scheduler(optimizer)``."""
        self.boxes, self.aug_prob = None, 0.0
        self.phase_log = {"boxes_area": None}
        self._memory_view = None
        if self.learns_phi:
            self.phi.begin(phase, network, phi_scheduler)

    def before_epoch(self, phase, network, epoch: int, epochs: int) -> dict:
        """With ``cim``: refresh the boxes when due (quality of the new boxes returned, and logged). Asked again for
        the same epoch (a run resumed inside it) it returns that refresh's quality and changes nothing."""
        cfg = self.cfg
        if not (self.learns_phi and cim_lib.refresh_due(epoch, epochs, cfg.cam_update_interval)):
            return {}
        if self.refreshed is not None and (self.refreshed["phase"], self.refreshed["epoch"]) == (phase.index, epoch):
            return dict(self.refreshed["quality"])
        self.boxes = self.finder.cam_boxes(network, phase, "rational")
        self.aug_prob = min(1.0, (epoch // cfg.cam_update_interval) * cfg.randombbxblur_prob_incre)
        refreshed = self.finder.quality(self.boxes)
        self.phase_log.setdefault("box_refreshes", []).append({"epoch": epoch, **refreshed})
        self.refreshed = {"phase": phase.index, "epoch": epoch, "quality": refreshed}
        self.status(f"phase {phase.index} epoch {epoch + 1}: boxes refreshed on the rational branch "
                    f"({_quality_text(refreshed)}); box-compression augmentation p = {self.aug_prob:g}")
        return refreshed

    def train_dataset(self, phase, transform):
        """New-class training images (box-compressed with probability ``aug_prob``) and the memory's exemplars."""
        parts = [self.new_class_dataset(phase, transform, boxes=self.boxes, prob=self.aug_prob)]
        memory = self.memory_dataset(transform)
        if memory is not None:
            parts.append(memory)
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    def after_epoch(self, phase, network, inner: InnerStep) -> dict:
        """With ``cim``: the epoch's meta-iterations with the learner's inner step (mean losses returned)."""
        if not self.learns_phi:
            return {}

        def dataset():
            new = self.new_class_dataset(phase, self.transforms["train"], prob=0.0)
            memory = self.memory_dataset(self.transforms["train"])
            return new if memory is None else ConcatDataset([new, memory])

        return self.phi.epoch(phase, network, dataset, inner)

    def end_training(self) -> None:
        """The learner's training stage is over: phi is no longer trained this phase."""
        self.phi.end()

    def end_phase(self, phase, network) -> None:
        """Update the memory with ``network`` (its boxes and ReLU-branch features)."""
        self.status(f"phase {phase.index}: memory update ({self.cfg.compression} exemplars of "
                    f"{len(phase.classes)} new classes)")
        table = self.finder.final(network, phase)
        if self.finder.calibration is not None and phase.index == 0:
            self.status(f"phase 0: calibrated threshold {self.finder.calibration['threshold']:g} (box IoU "
                        f"{self.finder.calibration['iou'][self.finder.calibration['threshold']]:.3f} on "
                        f"{self.finder.calibration['images']} held-out images)")
        if table is not None and self.cfg.compression in ("cam", "cim", "gt"):
            quality = self.finder.quality(table)
            self.phase_log["boxes_area"] = quality["box_area"]
            for key in ("box_iou", "box_iou_whole_image", "box_iou_centre_prior"):
                if key in quality:
                    self.phase_log[key] = quality[key]
            self.status(f"phase {phase.index}: boxes of the new-class images ({_quality_text(quality)})")
        update_memory(self.memory, network, phase, table, cfg=self.cfg, stream=self.stream, runtime=self.runtime,
                      transform=self.transforms["test"], loader=self.loader, exemplar_cams=self.exemplar_cams)

    def after_task(self) -> None:
        self.boxes, self.aug_prob = None, 0.0

    # ---------------------------------------------------------------- data
    def new_class_dataset(self, phase, transform, *, prob: float, boxes=None):
        return cim_lib.ImageBoxDataset(self.stream.source.train, self.stream.train_indices(phase.classes), transform,
                                       self.stream.label_map, boxes=boxes, prob=prob, ratio=self.cfg.compress_ratio)

    def memory_dataset(self, transform):
        """The rebuilt exemplars as a dataset (None when the memory is empty); built once per phase, since the
        memory only changes in ``end_phase``."""
        if not len(self.memory):
            return None
        if self._memory_view is None:
            # Rebuild all exemplars once (batched) when they fit in 1 GiB (bound: every exemplar uncompressed);
            # otherwise each item is read from the store and rebuilt on access, on the GPU with decode_on_device.
            full_bytes = self.memory.cost_bytes() * max(1.0, self.cfg.compress_ratio)
            device = self.runtime.device if self.runtime.decode_on_device else None
            self._memory_view = self.memory.dataset(None, self.stream.label_map, cache=full_bytes <= 2**30,
                                                    device=device)
        return _Transformed(self._memory_view, transform)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {
            "memory": self.memory.state_dict(),
            "exemplar_cams": self.exemplar_cams,
            "boxes": None if self.boxes is None else self.boxes.state_dict(),
            "aug_prob": self.aug_prob,
            "phase_log": dict(self.phase_log),
            "calibration": self.calibration,
            "refreshed": self.refreshed,
            "phi": self.phi.state_dict(),
        }

    def load_state_dict(self, state: dict, phase, network, phi_scheduler: Callable) -> None:
        """Restore :meth:`state_dict`; ``phase``/``network``/``phi_scheduler`` rebuild phi's optimiser if it was
        live."""
        self.memory.load_state_dict(state["memory"])
        self.exemplar_cams = dict(state.get("exemplar_cams") or {})
        self.boxes = cim_lib.BoxTable.from_state(state["boxes"])
        self.aug_prob = state["aug_prob"]
        self.phase_log = dict(state["phase_log"])
        self.finder.calibration = state.get("calibration")
        self.refreshed = state.get("refreshed")
        self._memory_view = None
        self.phi.load_state_dict(state.get("phi"), phase, network, phi_scheduler)
