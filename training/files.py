"""Atomic file writes that follow the process umask, for every file a run (or the ablation, or visualize) writes.

A file is written to a temporary file in its own directory, flushed and fsync'ed, then moved over the target with
``os.replace`` (atomic on POSIX): a kill at any moment leaves either the old or the new file, never a torn one. The
temporary file is created with mode 0o666, which the kernel reduces by the umask exactly as for a plain ``open``
(0644 under umask 022, 0600 under 077); ``tempfile.mkstemp`` would make it 0600 whatever the umask.
"""
from __future__ import annotations

import json
import os
import secrets
from typing import BinaryIO, Callable

__all__ = ["atomic_write", "write_bytes", "write_text", "save_figure", "read_json"]


def _create_temporary(directory: str, name: str) -> tuple[int, str]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        path = os.path.join(directory, f".tmp-{secrets.token_hex(6)}-{name}")
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable (where the file system supports fsync on a directory)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(handle)
    except OSError:  # pragma: no cover - file systems without directory fsync
        pass
    finally:
        os.close(handle)


def atomic_write(path: str, write: Callable[[BinaryIO], object]) -> str:
    """Write ``path`` atomically: ``write(stream)`` fills a binary stream (``torch.save``, ``figure.savefig``, ...)
    that becomes ``path`` once flushed to disk. The directory is created if needed; returns ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = _create_temporary(directory, os.path.basename(path))
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)
    return path


def write_bytes(path: str, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda stream: stream.write(data))


def write_text(path: str, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write`)."""
    return write_bytes(path, text.encode("utf-8"))


def save_figure(figure, path: str) -> str:
    """Save a matplotlib ``figure`` as a PNG at ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda stream: figure.savefig(stream, format="png"))


def read_json(path: str):
    """The JSON value in ``path``, or None when the file is missing or not valid JSON (e.g. an older run's)."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None
