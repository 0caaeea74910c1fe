"""Checking the exemplar store's shards, and rebuilding the classes whose shards are damaged from the training images.

Every stored exemplar keeps its source image's index, its box and its sizes, so its two parts are
:func:`cim_ext.compress_parts` of that image again (:func:`training.memory.compress_exemplars`); encoded with the
store's codec they are the parts that were written (byte for byte with PNG). A repaired class gets a new shard and
new references; the damaged shard is left on disk, unreferenced once the next checkpoint is written.
"""
from __future__ import annotations

import torch

from .exemplar_store import ExemplarStoreError
from .memory import compress_exemplars

__all__ = ["damaged_classes", "repair_memory"]


def damaged_classes(memory) -> dict:
    """``{label: problem}`` for each stored class of ``memory`` with a part that does not read back as written (every
    part's length and crc32 are checked): the first damaged part's shard and what is wrong with it (missing,
    truncated, corrupt), with the number of other damaged parts. Empty without a store."""
    if memory.store is None:
        return {}
    found = {}
    for label, record in memory._records():
        for ref in record.refs:
            problem = None if ref is None else memory.store.check(ref)
            if problem is not None:
                found.setdefault(label, []).append(f"shard {memory.store.path(ref.shard)} {problem}")
    return {label: problems[0] + (f" (and {len(problems) - 1} more damaged parts)" if len(problems) > 1 else "")
            for label, problems in found.items()}


def repair_memory(memory, train_imageset) -> list:
    """Check every stored part of ``memory`` and rebuild each class with a damaged one from ``train_imageset``.

    Args:
        memory (ExemplarMemory): a memory on an exemplar store (loaded from the run's checkpoint).
        train_imageset (ImageSet): the training images the memory was built from (the run's ``source.train``, as
            the run prepares it), indexed like the exemplars' source indices.

    Returns:
        list[int]: the labels of the repaired classes, in the memory's class order (empty when nothing is damaged).

    Raises:
        ExemplarStoreError: a damaged class cannot be rebuilt: a source image is missing, unreadable, of another
            size than the one stored, or (where the class still has intact parts) does not give back those parts;
            the classes repaired before it stay repaired.

    Call it on every process under torchrun (the writer writes the new shards, the others compute the same
    references) and synchronise before reading the memory elsewhere.
    """
    repaired = []
    for label in damaged_classes(memory):
        _rebuild_class(memory, label, train_imageset)
        repaired.append(label)
    return repaired


def _source_images(memory, label, records, imageset):
    images = []
    for record in records:
        where = f"cannot repair class {label}: its exemplar of training image {record.index}"
        if not 0 <= record.index < len(imageset):
            raise ExemplarStoreError(f"{where} is outside the {len(imageset)} training images (is the data root "
                                     "the run's, with its data_options?)")
        image = imageset.load(record.index)
        if image is None:
            path = imageset.path(record.index) if hasattr(imageset, "path") else f"image {record.index}"
            raise ExemplarStoreError(f"{where}: {path} cannot be read")
        shape = (memory.channels, *record.size)
        if tuple(image.shape) != shape:
            raise ExemplarStoreError(f"{where} was made from a {shape} image, the data root has {tuple(image.shape)} "
                                     "(is the data root the run's, with its data_options?)")
        images.append(image)
    return images


def _rebuild_class(memory, label, imageset):
    """Compress the class's source images again into new records, check them against the parts that are still
    intact, and store them in a new shard."""
    records = memory._classes[label]
    images = _source_images(memory, label, records, imageset)
    boxes = torch.tensor([record.box for record in records], dtype=torch.int64).reshape(-1, 4)
    exemplars = compress_exemplars(images, boxes, memory.ratio, memory.mode, indices=[r.index for r in records],
                                   label=label)
    rebuilt = []
    for exemplar, record in zip(exemplars, records):
        exemplar.cost = record.cost  # the cost charged at selection (the same value unless the cost rule changed)
        rebuilt.append(memory._pack(exemplar))
    store = memory.store
    for old, new in zip(records, rebuilt):
        y0, y1, x0, x1 = new.box
        parts = (memory._unpack_small(new), new.crop.view(memory.channels, y1 - y0, x1 - x0))
        for ref, part in zip(old.refs, parts):
            intact = ref is not None and store.check(ref) is None
            if intact and not torch.equal(store.read(ref), store.round_trip(part)):
                raise ExemplarStoreError(f"cannot repair class {label}: training image {old.index} does not give "
                                         f"back its intact stored exemplar (is the data root the run's, with its "
                                         f"data_options?)")
    memory._to_store(label, rebuilt, replace=True)
    memory._classes[label] = rebuilt
