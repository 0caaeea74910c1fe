"""Atomic checkpoints and RNG state capture, for ``--resume`` that ends exactly like an uninterrupted run (CPU).

A checkpoint is one ``torch.save`` file written to a temporary file in the same directory, flushed and fsync'ed,
then moved over the old one with ``os.replace`` (atomic on POSIX): a kill at any moment leaves either the previous
or the new checkpoint, never a torn file. Everything in it is tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from .files import atomic_write

__all__ = ["CHECKPOINT_NAME", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(path: str, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (:func:`training.files.atomic_write`: temporary file + fsync +
    os.replace, with the umask's permissions)."""
    atomic_write(path, lambda stream: torch.save(state, stream))


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
