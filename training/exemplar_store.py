"""The exemplar memory's pixels on disk: encoded parts in append-only shard files.

A compressed exemplar is two uint8 images (:func:`cim_ext.compress_parts`): the downsampled image and the
full-resolution crop of its box. :class:`ExemplarStore` encodes each part (PNG by default, lossless, so rebuilt
exemplars stay bit-exact; JPEG or WebP at a quality as lossy options) and writes a class's parts as one shard file,
``<directory>/class<label>-<digest>.bin``: written whole to a temporary file and renamed, never modified afterwards,
named by its content so that writing the same class again (a resumed phase) gives the same file. A part is addressed
by ``(shard, offset, length)`` and carries the crc32 of its bytes, checked on every read: a missing, truncated or
corrupt shard raises :class:`ExemplarStoreError` naming the class, the shard and the repair
(:func:`training.memory_repair.repair_memory`); references from states written before the checksums have none and
are checked for length only. Only the writer (rank 0 under torchrun) writes; every process reads each part on
demand (the shard is opened for that read and closed, so a 1000-class memory holds no open files) and keeps a
bounded cache of decoded parts, so the RAM of a memory is its index plus that cache. Encoding and decoding use PIL.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .files import write_bytes

__all__ = ["CODECS", "PartRef", "ExemplarStore", "ExemplarStoreError", "REPAIR_HINT"]

CODECS = ("png", "jpeg", "webp")

#: How to rebuild damaged shards (:func:`training.memory_repair.repair_memory`).
REPAIR_HINT = ("rebuild it from the training images with `python -m training.run --out RUN --resume --repair-memory` "
               "(training.memory_repair.repair_memory)")


class ExemplarStoreError(ValueError):
    """A stored part cannot be read back as written: its shard is missing, truncated or corrupt."""

    _cim_user_error = True  # training.run prints it as one line, without a traceback


@dataclass(frozen=True)
class PartRef:
    """Where one encoded part lies: shard file name (inside the store's directory), byte offset and length, and the
    crc32 of those bytes (None for references written before the checksums)."""

    shard: str
    offset: int
    length: int
    crc32: int = None


def _shard_class(shard: str):
    """The class label in a shard's name (``class<label>-<digest>.bin``), or None for another name."""
    match = re.match(r"class(\d+)-", shard)
    return int(match.group(1)) if match else None


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

    def write(self, name: str, parts: Sequence[torch.Tensor], *, replace: bool = False) -> list:
        """Encode ``parts`` (uint8 [C, h, w] tensors; empty ones are not stored and give ``None``) into one shard
        file named from ``name`` and the content; returns one :class:`PartRef` (or None) per part. A shard of that
        name already on disk is kept (it holds the same bytes) unless ``replace`` (a repair of a damaged one)."""
        blobs = [None if part.numel() == 0 else _encode(part.contiguous().cpu(), self.codec, self.quality)
                 for part in parts]
        payload = b"".join(blob for blob in blobs if blob)
        shard = f"{name}-{hashlib.sha1(payload).hexdigest()[:16]}.bin"
        refs, offset = [], 0
        for blob in blobs:
            refs.append(None if blob is None else PartRef(shard, offset, len(blob), zlib.crc32(blob)))
            offset += len(blob or b"")
        if self.writer and (replace or not os.path.exists(self.path(shard))):
            write_bytes(self.path(shard), payload)
        return refs

    def path(self, shard: str) -> str:
        """The file of ``shard``."""
        return os.path.join(self.directory, shard)

    def round_trip(self, part: torch.Tensor) -> torch.Tensor:
        """What :meth:`read` gives back for ``part`` once written: the part itself with the lossless codec."""
        return _decode(_encode(part.contiguous().cpu(), self.codec, self.quality))

    def check(self, ref: PartRef) -> "str | None":
        """None when the bytes at ``ref`` are those it was written with (length and crc32; a reference without a
        checksum must decode instead), else what is wrong with its shard: missing, truncated or corrupt."""
        data, problem = self._fetch(ref)
        if problem is None and ref.crc32 is None:
            problem = self._decoded(ref, data)[1]
        return problem

    def read_bytes(self, ref: PartRef) -> bytes:
        """The encoded bytes of ``ref``, checked for length and crc32; :class:`ExemplarStoreError` naming the class,
        the shard and the repair when they are not what was written."""
        data, problem = self._fetch(ref)
        if problem is not None:
            raise self._error(ref, problem)
        return data

    def _error(self, ref: PartRef, problem: str) -> ExemplarStoreError:
        label = _shard_class(ref.shard)
        owner = "" if label is None else f"class {label}: "
        return ExemplarStoreError(f"exemplar store: {owner}shard {self.path(ref.shard)} {problem}; {REPAIR_HINT}")

    def _fetch(self, ref: PartRef):
        """(bytes or None, problem or None) of ``ref``: the length and crc32 checks."""
        try:
            with open(self.path(ref.shard), "rb") as handle:
                handle.seek(ref.offset)
                data = handle.read(ref.length)
        except FileNotFoundError:
            return None, "is missing (was the run directory's memory/ folder moved?)"
        if len(data) != ref.length:
            return data, f"is truncated (needed {ref.length} bytes at offset {ref.offset}, got {len(data)})"
        if ref.crc32 is not None and zlib.crc32(data) != ref.crc32:
            return data, (f"is corrupt (the {ref.length} bytes at offset {ref.offset} have crc32 "
                          f"{zlib.crc32(data):08x}, the index expects {ref.crc32:08x})")
        return data, None

    @staticmethod
    def _decoded(ref: PartRef, data: bytes):
        """(part or None, problem or None): damaged bytes that passed the checks (a reference without a checksum)
        fail to decode."""
        try:
            return _decode(data), None
        except Exception as error:  # PIL raises OSError, ValueError, SyntaxError... for damaged data
            return None, f"is corrupt (the part at offset {ref.offset} cannot be decoded: {error})"

    def read(self, ref: PartRef) -> torch.Tensor:
        """The decoded uint8 [C, h, w] part of ``ref`` (from the cache when it is there: do not modify it)."""
        part = self._cache.get(ref)
        if part is not None:
            self._cache.move_to_end(ref)
            return part
        part, problem = self._decoded(ref, self.read_bytes(ref))
        if problem is not None:
            raise self._error(ref, problem)
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
