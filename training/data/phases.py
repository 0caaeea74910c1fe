"""Class order, phases, and the dataset that feeds one phase."""
import numpy as np
from torch.utils.data import Dataset, default_collate

__all__ = ["class_order", "phase_classes", "class_indices", "PhaseDataset", "collate_skip_bad"]


def class_order(num_classes, seed=1993) -> list[int]:
    """Shuffled class ids, ``np.random.RandomState(seed).permutation(num_classes)`` (PyCIL's order for a seed)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return np.random.RandomState(seed).permutation(num_classes).tolist()


def phase_classes(num_classes, init_cls, increment) -> list[list[int]]:
    """Positions in the class order learnt in each phase: ``init_cls`` first, then ``increment`` at a time.

    As in PyCIL, a last phase smaller than ``increment`` takes the remainder.
    """
    if not 1 <= init_cls <= num_classes:
        raise ValueError(f"init_cls must be in 1..{num_classes} (num_classes), got {init_cls}")
    if increment < 1:
        raise ValueError(f"increment must be >= 1, got {increment}")
    phases = [list(range(init_cls))]
    start = init_cls
    while start < num_classes:
        stop = min(start + increment, num_classes)
        phases.append(list(range(start, stop)))
        start = stop
    return phases


def class_indices(imageset, classes) -> np.ndarray:
    """Indices of the images of ``imageset`` whose class id is in ``classes`` (ascending)."""
    return np.flatnonzero(np.isin(imageset.targets, np.asarray(list(classes), dtype=np.int64)))


class PhaseDataset(Dataset):
    """Images ``indices`` of ``imageset``, transformed, with labels mapped by ``label_map`` (class id -> label).

    Items are ``(image, label, index)`` with ``index`` the position in ``imageset``; an unreadable image gives
    ``None`` (drop it with :func:`collate_skip_bad`).
    """

    def __init__(self, imageset, indices, transform, label_map):
        self.imageset = imageset
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        self.transform = transform
        self.label_map = {int(k): int(v) for k, v in label_map.items()}

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        index = int(self.indices[k])
        image = self.imageset.load(index)
        if image is None:
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, self.label_map[int(self.imageset.targets[index])], index


def collate_skip_bad(batch):
    """``default_collate`` of the non-``None`` items; ``None`` when every item of the batch was unreadable."""
    kept = [item for item in batch if item is not None]
    if not kept:
        return None
    return default_collate(kept)
