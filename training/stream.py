"""The class stream of a run: the seeded class order over a :class:`~training.data.Source` and its phases (PyCIL's
data manager role). Labels seen by the networks are positions in the class order (``label_map``: source class id ->
position)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import class_order, phase_classes

__all__ = ["Phase", "ClassStream"]


@dataclass(frozen=True)
class Phase:
    """One phase: its index, the source class ids it introduces, and the classes known before / seen after."""

    index: int
    classes: tuple
    known: int
    total: int

    @property
    def new_classes(self) -> int:
        return self.total - self.known


class ClassStream:
    """The seeded class order of a source and its phases (``init_cls`` classes, then ``increment`` per phase)."""

    def __init__(self, source, *, init_cls: int, increment: int, order_seed: int = 1993):
        self.source = source
        if init_cls > source.num_classes:
            raise ValueError(f"init_cls: {init_cls} exceeds the {source.num_classes} classes of {source.name!r}")
        self.order = [int(c) for c in class_order(source.num_classes, seed=order_seed)]
        self.label_map = {cls: pos for pos, cls in enumerate(self.order)}
        self.phases: list[Phase] = []
        known = 0
        for index, positions in enumerate(phase_classes(source.num_classes, init_cls, increment)):
            classes = tuple(self.order[p] for p in positions)
            self.phases.append(Phase(index=index, classes=classes, known=known, total=known + len(classes)))
            known += len(classes)
        self._train_targets = np.asarray(source.train.targets)
        self._test_targets = np.asarray(source.test.targets)

    def __len__(self) -> int:
        return len(self.phases)

    def train_indices(self, classes) -> np.ndarray:
        return np.flatnonzero(np.isin(self._train_targets, list(classes)))

    def test_indices(self, classes) -> np.ndarray:
        return np.flatnonzero(np.isin(self._test_targets, list(classes)))

    def seen_classes(self, phase: Phase) -> list:
        return self.order[: phase.total]

    def task_labels(self, phase: Phase) -> list:
        """Model labels introduced in each phase 0..phase."""
        return [list(range(p.known, p.total)) for p in self.phases[: phase.index + 1]]

    def train_count(self, cls: int) -> int:
        """Training images of source class ``cls``."""
        return int((self._train_targets == cls).sum())
