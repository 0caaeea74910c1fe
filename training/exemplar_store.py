"""The exemplar memory's pixels on disk: encoded parts in append-only shard files.

A compressed exemplar is two uint8 images (:func:`cim_ext.compress_parts`): the downsampled image and the
full-resolution crop of its box. :class:`ExemplarStore` encodes each part (PNG by default, lossless, so rebuilt
exemplars stay bit-exact; JPEG or WebP at a quality as lossy options) and writes a class's parts as one shard file,
``<directory>/class<label>-<digest>.bin``: written whole to a temporary file and renamed, never modified afterwards,
named by its content so that writing the same class again (a resumed phase) gives the same file. A part is addressed
by ``(shard, offset, length)``. Only the writer (rank 0 under torchrun) writes; every process reads each part on
demand (the shard is opened for that read and closed, so a 1000-class memory holds no open files) and keeps a
bounded cache of decoded parts, so the RAM of a memory is its index plus that cache. Encoding and decoding use PIL.
"""
from __future__ import annotations

import hashlib
import io
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .files import write_bytes

__all__ = ["CODECS", "PartRef", "ExemplarStore"]

CODECS = ("png", "jpeg", "webp")


@dataclass(frozen=True)
class PartRef:
    """Where one encoded part lies: shard file name (inside the store's directory), byte offset and length."""

    shard: str
    offset: int
    length: int


def _encode(image: torch.Tensor, codec: str, quality: int) -> bytes:
    array = image.permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    options = {"format": "PNG"} if codec == "png" else {"format": codec.upper(), "quality": quality}
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(buffer, **options)
    return buffer.getvalue()


def _decode(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image)
    return torch.from_numpy(array.reshape(*array.shape[:2], -1).copy()).permute(2, 0, 1).contiguous()


class ExemplarStore:
    """Encoded exemplar parts in shard files under ``directory``.

    Args:
        directory: where the shards live (created on the first write); under torchrun it must be shared by the
            ranks (the run directory is).
        codec: ``"png"`` (lossless, the default), ``"jpeg"`` or ``"webp"`` (lossy, at ``quality``).
        quality: 1-100, for the lossy codecs.
        writer: whether this process writes shards (rank 0); the others compute the same references and read.
        cache_bytes: bound of the decoded-part cache, in bytes.
    """

    def __init__(self, directory: str, *, codec: str = "png", quality: int = 90, writer: bool = True,
                 cache_bytes: int = 16 * 2**20):
        if codec not in CODECS:
            raise ValueError(f"codec: expected one of {', '.join(CODECS)}, got {codec!r}")
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"quality: expected an int in [1, 100], got {quality!r}")
        self.directory = str(directory)
        self.codec = codec
        self.quality = quality
        self.writer = writer
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict = OrderedDict()
        self._cached = 0

    @property
    def lossless(self) -> bool:
        return self.codec == "png"

    def __getstate__(self):
        # DataLoader workers get a copy without cached pixels
        state = dict(self.__dict__)
        state.update(_cache=OrderedDict(), _cached=0)
        return state

    def write(self, name: str, parts: Sequence[torch.Tensor]) -> list:
        """Encode ``parts`` (uint8 [C, h, w] tensors; empty ones are not stored and give ``None``) into one shard
        file named from ``name`` and the content; returns one :class:`PartRef` (or None) per part."""
        blobs = [None if part.numel() == 0 else _encode(part.contiguous().cpu(), self.codec, self.quality)
                 for part in parts]
        payload = b"".join(blob for blob in blobs if blob)
        shard = f"{name}-{hashlib.sha1(payload).hexdigest()[:16]}.bin"
        refs, offset = [], 0
        for blob in blobs:
            refs.append(None if blob is None else PartRef(shard, offset, len(blob)))
            offset += len(blob or b"")
        if self.writer and not os.path.exists(self.path(shard)):
            write_bytes(self.path(shard), payload)
        return refs

    def path(self, shard: str) -> str:
        return os.path.join(self.directory, shard)

    def read(self, ref: PartRef) -> torch.Tensor:
        """The decoded uint8 [C, h, w] part of ``ref`` (from the cache when it is there: do not modify it)."""
        part = self._cache.get(ref)
        if part is not None:
            self._cache.move_to_end(ref)
            return part
        try:
            with open(self.path(ref.shard), "rb") as handle:
                handle.seek(ref.offset)
                data = handle.read(ref.length)
        except FileNotFoundError:
            raise FileNotFoundError(f"exemplar store: shard {self.path(ref.shard)} is missing (the memory's index "
                                    "points to it; was the run directory's memory/ folder moved?)") from None
        if len(data) != ref.length:
            raise ValueError(f"exemplar store: {self.path(ref.shard)} is truncated (needed {ref.length} bytes at "
                             f"offset {ref.offset}, got {len(data)})")
        part = _decode(data)
        if part.numel() <= self.cache_bytes:
            self._cache[ref] = part
            self._cached += part.numel()
            while self._cached > self.cache_bytes:
                _, dropped = self._cache.popitem(last=False)
                self._cached -= dropped.numel()
        return part

    def file_bytes(self) -> int:
        """Bytes of every shard file in the directory (live exemplars and those trimmed since)."""
        if not os.path.isdir(self.directory):
            return 0
        return sum(entry.stat().st_size for entry in os.scandir(self.directory)
                   if entry.is_file() and entry.name.endswith(".bin"))
