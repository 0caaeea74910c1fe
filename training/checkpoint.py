"""Atomic checkpoints and RNG state capture, for ``--resume`` that ends exactly like an uninterrupted run (CPU).

A checkpoint is one ``torch.save`` file written to a temporary file in the same directory, flushed and fsync'ed,
then moved over the old one with ``os.replace`` (atomic on POSIX): a kill at any moment leaves either the previous
or the new checkpoint, never a torn file. Everything in it is tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch

__all__ = ["CHECKPOINT_NAME", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(path: str, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (temporary file + fsync + os.replace)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pt")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # pragma: no cover - e.g. filesystems without directory fsync
        pass


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def rng_state() -> dict:
    """The state of every global RNG: Python ``random``, NumPy, torch CPU and (if present) every CUDA device."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss_next},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore the RNGs captured by :func:`rng_state`."""
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["internal"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached"]))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
