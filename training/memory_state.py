"""The exemplar memory as tensors for checkpoints: one row of metadata per exemplar (label, source index, box, sizes,
cost) and either the parts' references into the exemplar store (``shards``, ``refs``: shard, offset, length and
crc32 of each part; no pixels) or, for a memory without a store, the packed pixels (``kept``, ``crops``). A state
with pixels loaded into a memory with a store moves them there; a state with references needs a store with the same
codec. A reference table from before the checksums (three columns per part) loads with no crc32."""
from __future__ import annotations

import torch

from .exemplar_store import PartRef
from .memory import _Stored

__all__ = ["memory_state", "load_memory_state"]

_REF_COLUMNS = 4  # shard number, offset, length, crc32 (-1: none)
_NO_CRC = -1
_NO_REF = (-1, 0, 0, _NO_CRC)


def memory_state(memory) -> dict:
    """Tensors (and plain values) describing the whole memory; see :func:`load_memory_state`. With a store it holds
    the part references (``shards``, ``refs``), no pixels; without one the packed pixels (``kept``, ``crops``)."""
    records = list(memory._records())
    meta = torch.tensor([[label, r.index, *r.box, *r.size, *r.small_size] for label, r in records],
                        dtype=torch.int64).reshape(-1, 10)
    state = {
        "mode": memory.mode,
        "ratio": memory.ratio,
        "channels": memory.channels,
        "labels": torch.tensor(memory.classes(), dtype=torch.int64),
        "meta": meta,  # label, index, y0, y1, x0, x1, H, W, h, w
        "costs": torch.tensor([r.cost for _, r in records], dtype=torch.float64),
        "kept_numel": torch.tensor([r.kept_numel for _, r in records], dtype=torch.int64),
    }
    if memory.store is None:
        empty = torch.zeros(0, dtype=torch.uint8)
        state["kept"] = torch.cat([r.kept for _, r in records]) if records else empty
        state["crops"] = torch.cat([r.crop for _, r in records]) if records else empty
        return state
    shards = list(dict.fromkeys(ref.shard for _, r in records for ref in r.refs if ref is not None))
    number = {name: n for n, name in enumerate(shards)}
    rows = [[field for ref in r.refs for field in (_NO_REF if ref is None else (
        number[ref.shard], ref.offset, ref.length, _NO_CRC if ref.crc32 is None else ref.crc32))] for _, r in records]
    state.update(store={"codec": memory.store.codec, "quality": memory.store.quality}, shards=shards,
                 refs=torch.tensor(rows, dtype=torch.int64).reshape(-1, 2 * _REF_COLUMNS))  # small, then crop
    return state


def load_memory_state(memory, state) -> None:
    """Restore :func:`memory_state` into ``memory`` (an :class:`~training.memory.ExemplarMemory` of the same mode,
    ratio and channels)."""
    if (state["mode"], float(state["ratio"]), int(state["channels"])) != (memory.mode, memory.ratio, memory.channels):
        raise ValueError(f"load_state_dict: checkpoint memory is mode={state['mode']!r} ratio={state['ratio']} "
                         f"channels={state['channels']}, this one mode={memory.mode!r} ratio={memory.ratio} "
                         f"channels={memory.channels}")
    stored = state.get("store")
    if stored is not None and (memory.store is None or (stored["codec"], stored["quality"]) !=
                               (memory.store.codec, memory.store.quality)):
        have = "no store" if memory.store is None else f"codec {memory.store.codec!r} quality {memory.store.quality}"
        raise ValueError(f"load_state_dict: the checkpoint's exemplars are in a store (codec {stored['codec']!r} "
                         f"quality {stored['quality']}), this memory has {have}")
    classes = {int(label): [] for label in state["labels"].tolist()}
    kept_offset = crop_offset = 0
    for row, (label, index, y0, y1, x0, x1, height, width, small_h, small_w) in enumerate(state["meta"].tolist()):
        kept_numel = int(state["kept_numel"][row])
        crop_numel = memory.channels * (y1 - y0) * (x1 - x0)
        record = _Stored(index=index, box=(y0, y1, x0, x1), size=(height, width), small_size=(small_h, small_w),
                         cost=float(state["costs"][row]), kept_numel=kept_numel, crop_numel=crop_numel)
        if stored is None:
            record.kept = state["kept"][kept_offset:kept_offset + kept_numel].clone()
            record.crop = state["crops"][crop_offset:crop_offset + crop_numel].clone()
        else:
            record.refs = tuple(_part_ref(state["shards"], values) for values in
                                state["refs"][row].view(2, -1).tolist())
        classes[label].append(record)
        kept_offset += kept_numel
        crop_offset += crop_numel
    if stored is None and (kept_offset != state["kept"].numel() or crop_offset != state["crops"].numel()):
        raise ValueError("load_state_dict: pixel payload does not match the exemplar table")
    if stored is None and memory.store is not None:
        for label, records in classes.items():
            if records:
                memory._to_store(label, records)
    memory._classes = classes


def _part_ref(shards, values):
    """A :class:`PartRef` from one part's columns of the reference table (3 columns before the checksums, 4 with)."""
    if values[0] < 0:
        return None
    crc32 = values[3] if len(values) == _REF_COLUMNS and values[3] != _NO_CRC else None
    return PartRef(shards[values[0]], values[1], values[2], crc32)
