"""Where and how a process computes: :class:`Runtime` resolves the device, distributed rank and precision settings
once; learners receive it and never pick devices, wrap models or build samplers themselves
(:class:`training.distributed.ProcessRuntime` is the one ``training.run`` uses)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Union

import torch

from .config import Config, ConfigError

__all__ = ["Runtime", "resolve_runtime"]

@dataclass
class Runtime:
    """Where and how a process computes: the one place that knows devices, ranks and precision.

    Learners call :meth:`autocast`, :meth:`to_device`, :meth:`prepare_model`, :meth:`wrap`, :meth:`loader` and
    :meth:`broadcast_object` / :meth:`broadcast_tensors`; :class:`training.distributed.ProcessRuntime` (what
    ``training.run`` uses) overrides them for torchrun.
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: Union[torch.dtype, None] = None
    channels_last: bool = False
    deterministic: bool = False
    decode_on_device: bool = False  # images decoded, transformed and rebuilt on ``device`` (training.distributed)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        """Autocast context for forward passes (bf16 on CUDA when amp is on; a no-op otherwise)."""
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, tensor: torch.Tensor, *, image: bool = False) -> torch.Tensor:
        tensor = tensor.to(self.device, non_blocking=True)
        if image and self.channels_last and tensor.dim() == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move a model to the device (and to channels_last when enabled), in place."""
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to call for gradient steps: the model itself in one process (DDP wrapping goes here)."""
        return model

    def loader(self, dataset, batch_size: int, *, shuffle: bool, generator=None, collate_fn=None, workers: int = 0,
               shard: bool = True, skip: int = 0):
        """A DataLoader over ``dataset`` (shuffled with ``generator`` when ``shuffle``; ``shard`` only matters with
        several processes; ``skip``, resuming inside an epoch, needs :class:`training.distributed.ProcessRuntime`)."""
        from torch.utils.data import DataLoader

        if skip:
            raise ValueError("skip: resuming inside an epoch needs training.distributed.ProcessRuntime")
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator if shuffle else None,
                          collate_fn=collate_fn, num_workers=workers, pin_memory=self.device.type == "cuda")

    def broadcast_object(self, obj, src: int = 0):
        """Rank ``src``'s ``obj`` on every rank: the object itself in one process."""
        return obj

    def broadcast_tensors(self, tensors, src: int = 0) -> None:
        """Overwrite ``tensors`` with rank ``src``'s values: nothing to do in one process."""


def resolve_runtime(cfg: Config) -> Runtime:
    """Resolve ``cfg.device`` (auto -> cuda if available), AMP/channels_last (CUDA only) and determinism."""
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device: {cfg.device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    on_cuda = device.type == "cuda"
    if on_cuda and device.index is not None:
        torch.cuda.set_device(device)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif on_cuda:
        torch.backends.cudnn.benchmark = True
    return Runtime(
        device=device,
        amp_dtype=torch.bfloat16 if (cfg.amp and on_cuda) else None,
        channels_last=bool(cfg.channels_last and on_cuda),
        deterministic=cfg.deterministic,
    )
