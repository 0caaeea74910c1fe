"""Processes, devices and loaders: one process or many under ``torchrun`` (DistributedDataParallel).

:func:`resolve_runtime` is what ``training.run`` calls. In one process it returns a :class:`ProcessRuntime` with
``world_size == 1``; launched by ``torchrun`` (``WORLD_SIZE > 1`` in the environment) it joins the process group
(NCCL on CUDA, gloo on CPU), puts each process on ``cuda:LOCAL_RANK`` (or the CPU) and returns the runtime of that
rank. Everything rank-aware lives here; the learner only calls the runtime's hooks:

``prepare_model``  device, channels_last and, under torchrun with ``sync_bn``, batch norm over the global batch
                   (:class:`torch.nn.SyncBatchNorm` on CUDA, :class:`GlobalBatchNorm2d` on CPU/gloo)
``wrap``           the DDP wrapper of a network for its gradient steps (cached per network and parameter set);
                   the rational coefficients (phi) are left out of DDP: the CIM meta-step trains them
``loader``         training loaders draw one seeded global order and split every global batch across the ranks
                   (:class:`GlobalBatchSampler`); each sample's random augmentation is seeded from its position in
                   that order (:class:`SeededDataset`), so the ranks together see exactly the batches and augmented
                   images of a one-process run; evaluation/box/feature loaders are not sharded (every rank computes
                   them, so every rank holds the same predictions, boxes and features)
``broadcast_object`` / ``broadcast_tensors``   rank 0's boxes, herding choices and phi, so that tiny numerical
                   differences between devices can never make the ranks' memories or models drift apart

Exactness: DDP averages the ranks' gradients; each rank's loss is a mean over its share of the global batch, and
the shares of the last (partial) batch may differ by one sample, so every output's gradient is scaled by
``world_size * local / global`` (one all-reduce of the batch sizes per step), which makes the averaged gradient the
gradient of the global-batch mean exactly. With ``sync_bn`` the batch statistics are the global batch's too, so a
2-process run equals the 1-process run up to floating-point summation order (tests/test_distributed.py).
Loader options (``pin_memory``, ``persistent_workers``, ``prefetch_factor``) come from the config.
"""
from __future__ import annotations

import atexit
import bisect
import dataclasses
import gc
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, ConcatDataset, DataLoader, Dataset, Sampler, SequentialSampler

from .config import Config, ConfigError
from .runtime import Runtime
from .runtime import resolve_runtime as _resolve_device

__all__ = [
    "ProcessRuntime",
    "resolve_runtime",
    "launch_env",
    "GlobalBatchSampler",
    "SeededDataset",
    "GlobalBatchNorm2d",
    "convert_batchnorm",
    "DeviceDecodedImageSet",
    "DeviceDecodeLoader",
]


def launch_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment; (0, 1, 0) in a plain process."""
    def read(name, default):
        value = os.environ.get(name, default)
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"environment variable {name}={value!r}: expected an integer (set by torchrun)") from None

    return read("RANK", "0"), read("WORLD_SIZE", "1"), read("LOCAL_RANK", "0")


def resolve_runtime(cfg: Config) -> "ProcessRuntime":
    """The runtime of this process: device, precision, rank; joins the torchrun process group when launched so."""
    rank, world, local = launch_env()
    if world > 1:
        cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        if cuda:
            if not torch.cuda.is_available():
                raise ConfigError(f"device: {cfg.device!r} under torchrun but CUDA is not available")
            if local >= torch.cuda.device_count():
                raise ConfigError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices are visible; "
                                  "use --nproc_per_node <= the number of GPUs")
            device = f"cuda:{local}"  # one GPU per process, whatever index the config names
        else:
            device = "cpu"
        base = _resolve_device(dataclasses.replace(cfg, device=device))
        _init_process_group(base.device)
    else:
        base = _resolve_device(cfg)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(Runtime)}
    fields.update(rank=rank, world_size=world, decode_on_device=cfg.decode_on_device)
    return ProcessRuntime(**fields, sync_bn=cfg.sync_bn, pin_memory=cfg.pin_memory,
                          persistent_workers=cfg.persistent_workers, prefetch_factor=cfg.prefetch_factor)


def _init_process_group(device: torch.device) -> None:
    if dist.is_initialized():
        return
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- runtime
@dataclass
class ProcessRuntime(Runtime):
    """:class:`training.runtime.Runtime` of one process of a (possibly one-process) run."""

    sync_bn: bool = True
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = 4

    #: DDP wrappers kept per network: the learner alternates between the teacher and the student
    WRAPPERS_KEPT = 2

    def __post_init__(self):
        self._wrapped: dict = {}

    # ---------------------------------------------------------------- models
    def prepare_model(self, model: nn.Module) -> nn.Module:
        super().prepare_model(model)
        if self.distributed and self.sync_bn:
            convert_batchnorm(model, cuda=self.device.type == "cuda")
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` itself in one process; under torchrun its DDP wrapper (rebuilt when its trainable parameters
        change, e.g. after ``IncrementalNet.grow``)."""
        if not self.distributed:
            return model
        trainable = tuple(id(p) for p in model.parameters() if p.requires_grad)
        cached = self._wrapped.get(id(model))
        if cached is not None and cached[0] is model and cached[1] == trainable:
            return cached[2]
        if cached is not None:  # outdated (the network grew): free it now, which removes its autograd hooks
            del self._wrapped[id(model)], cached
            gc.collect()
        from .models import split_parameters

        _, phi = split_parameters(model)
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(phi))
        ddp = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            broadcast_buffers=False,  # batch-norm statistics are global (sync_bn) or rank-local, never rank 0's
        )
        weight: dict = {}
        ddp.register_forward_pre_hook(lambda module, args: weight.update(scale=self._share_scale(args[0])))
        ddp.register_forward_hook(lambda module, args, output: _scale_gradients(output, weight["scale"]))
        while len(self._wrapped) >= self.WRAPPERS_KEPT:
            self._wrapped.pop(next(iter(self._wrapped)))
        self._wrapped[id(model)] = (model, trainable, ddp)
        return ddp

    def _share_scale(self, images: torch.Tensor) -> torch.Tensor:
        """``world_size * local / global`` batch size (a 0-d tensor on the device; one all-reduce)."""
        local = torch.tensor(float(images.shape[0]), dtype=torch.float64, device=self.device)
        total = local.clone()
        dist.all_reduce(total)
        return self.world_size * local / total

    # ---------------------------------------------------------------- data
    def loader(self, dataset, batch_size: int, *, shuffle: bool, generator: Union[torch.Generator, None] = None,
               collate_fn: Union[Callable, None] = None, workers: int = 0, shard: bool = True,
               skip: int = 0) -> DataLoader:
        """A loader over ``dataset``.

        ``shuffle=True`` (training): a seeded global order from ``generator``, global batches of ``batch_size``;
        with ``shard`` (and more than one process) each rank gets its part of every global batch, else every rank
        gets whole batches (the CIM meta-step, which every rank runs on the same batches); the first ``skip``
        batches are left out (the same order, drawn from the same generator state: a resumed epoch).
        ``shuffle=False``: the dataset in order, whole, on every rank."""
        if self.decode_on_device and _device_images(dataset):
            return self._device_loader(dataset, batch_size, shuffle=shuffle, generator=generator,
                                       collate_fn=collate_fn, shard=shard, skip=skip)
        # A private generator for the DataLoader's worker base seed, so that loaders never draw from torch's global
        # RNG (which initialises new heads): workers need no distinct seeds, every item seeds its own augmentation.
        options = {"num_workers": workers, "collate_fn": collate_fn, "generator": torch.Generator(),
                   "pin_memory": self.pin_memory and self.device.type == "cuda"}
        if workers > 0:
            options.update(persistent_workers=self.persistent_workers, prefetch_factor=self.prefetch_factor)
        if not shuffle:
            return DataLoader(dataset, batch_size=batch_size, shuffle=False, **options)
        sharded = shard and self.distributed
        sampler = GlobalBatchSampler(len(dataset), batch_size, generator=generator,
                                     rank=self.rank if sharded else 0, world_size=self.world_size if sharded else 1,
                                     skip=skip)
        return DataLoader(SeededDataset(dataset), batch_sampler=sampler, **options)

    def _device_loader(self, dataset, batch_size, *, shuffle, generator, collate_fn, shard, skip):
        if shuffle:
            sharded = shard and self.distributed
            sampler = GlobalBatchSampler(len(dataset), batch_size, generator=generator,
                                         rank=self.rank if sharded else 0,
                                         world_size=self.world_size if sharded else 1, skip=skip)
            return DeviceDecodeLoader(SeededDataset(dataset), sampler, collate_fn=collate_fn)
        sampler = BatchSampler(SequentialSampler(range(len(dataset))), batch_size, drop_last=False)
        return DeviceDecodeLoader(dataset, sampler, collate_fn=collate_fn)

    def prepare_source(self, source):
        """With ``decode_on_device``: the source's file-backed image sets replaced by :class:`DeviceDecodedImageSet`
        (JPEG decoded on this process's device); otherwise the source unchanged. A source without image files
        (synthetic) turns ``decode_on_device`` off for the run, with a warning."""
        if not self.decode_on_device:
            return source
        from .data import FileImageSet

        wrapped = False
        for split in ("train", "test"):
            images = getattr(source, split)
            if isinstance(images, FileImageSet):
                setattr(source, split, DeviceDecodedImageSet(images, self.device))
                wrapped = True
        if not wrapped:
            warnings.warn(f"decode_on_device: the {source.name!r} source has no image files to decode; ignored")
            self.decode_on_device = False
        return source

    # ---------------------------------------------------------------- collectives
    def broadcast_object(self, obj, src: int = 0):
        """``obj`` of rank ``src`` on every rank (itself in one process); picklable objects."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def broadcast_tensors(self, tensors: Iterable[torch.Tensor], src: int = 0) -> None:
        """Overwrite ``tensors`` (e.g. parameters) in place with rank ``src``'s values."""
        if not self.distributed:
            return
        with torch.no_grad():
            for tensor in tensors:
                dist.broadcast(tensor.data, src=src)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the gradient times ``scale`` backward."""

    @staticmethod
    def forward(ctx, tensor, scale):
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale.to(grad.dtype), None


def _scale_gradients(output, scale: torch.Tensor):
    """The forward's output with every tensor replaced by an identity whose gradient is multiplied by ``scale``
    (None: unchanged; on CPU skipped when ``scale`` is exactly 1; on CUDA the test would wait for the device, and
    multiplying by 1 is exact anyway).

    The outputs are replaced rather than hooked in place: ``logits`` are computed from ``features``, which the
    network returns too, so a hook on each tensor would scale the gradient of every path through both twice."""
    if not torch.is_grad_enabled():
        return None
    if scale.device.type == "cpu" and float(scale) == 1.0:
        return None
    wrap = lambda v: _ScaleGradient.apply(v, scale) if isinstance(v, torch.Tensor) and v.requires_grad else v  # noqa: E731
    if isinstance(output, dict):
        return {key: wrap(value) for key, value in output.items()}
    if isinstance(output, (list, tuple)):
        return type(output)(wrap(value) for value in output)
    return wrap(output)


# ---------------------------------------------------------------------------------------------------- sampling
class GlobalBatchSampler(Sampler):
    """Batches of ``(index, seed)`` keys: one shuffled order of ``size`` items in global batches of ``batch_size``,
    each global batch split into ``world_size`` contiguous near-equal parts, this rank's part yielded.

    The order and a base seed are drawn from ``generator`` (a fresh seed from torch's global RNG if None) when
    iteration starts, the same two draws whatever the world size; item at position p of the order gets seed
    ``base + p``. A last global batch smaller than ``world_size`` is dropped (no rank may get an empty batch), so
    one-process and multi-process runs match whenever ``size % batch_size`` is 0 or at least ``world_size``.
    ``skip``: the first batches are drawn but not yielded (an epoch resumed after that many batches).
    """

    def __init__(self, size: int, batch_size: int, *, generator: Union[torch.Generator, None] = None, rank: int = 0,
                 world_size: int = 1, skip: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.size = int(size)
        self.batch_size = int(batch_size)
        self.generator = generator
        self.rank = rank
        self.world_size = world_size
        self.skip = int(skip)

    def _global_batches(self) -> list[tuple[int, int]]:
        spans = [(start, min(start + self.batch_size, self.size)) for start in range(0, self.size, self.batch_size)]
        return [(a, b) for a, b in spans if b - a >= self.world_size][self.skip:]

    def __len__(self) -> int:
        return len(self._global_batches())

    def __iter__(self):
        generator = self.generator
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(int(torch.randint(0, 2**62, (), dtype=torch.int64)))
        order = torch.randperm(self.size, generator=generator).tolist()
        base = int(torch.randint(0, 2**62, (), dtype=torch.int64, generator=generator))
        for start, stop in self._global_batches():
            count = stop - start
            lo = start + self.rank * count // self.world_size
            hi = start + (self.rank + 1) * count // self.world_size
            yield [(order[p], base + p) for p in range(lo, hi)]


class SeededDataset(Dataset):
    """Items of ``dataset`` by ``(index, seed)`` key, each produced with torch's CPU RNG seeded by ``seed`` (and the
    RNG state restored afterwards): an item's random augmentation depends on its key only, not on the process or
    worker that loads it."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        state = torch.get_rng_state()
        try:
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]
        finally:
            torch.set_rng_state(state)


# ---------------------------------------------------------------------------------------------------- batch norm
class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient of every rank's input is the sum of the ranks' output
    gradients."""

    @staticmethod
    def forward(ctx, tensor):
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the global batch over all ranks (sums all-reduced with
    a differentiable all-reduce, in float64). For CPU/gloo runs, where :class:`torch.nn.SyncBatchNorm` is not
    available; outside a multi-process group or in eval mode it is plain BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        wide = x.double()
        count = torch.full((1,), float(x.numel() // channels), dtype=torch.float64, device=x.device)
        stats = _AllReduceSum.apply(torch.cat([wide.sum((0, 2, 3)), (wide * wide).sum((0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:channels] / n
        var = (stats[channels:2 * channels] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased.to(self.running_var.dtype))
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            shift = self.bias.double() - mean * scale * self.weight.double()
            scale = scale * self.weight.double()
        else:
            shift = -mean * scale
        out = wide * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        return out.to(x.dtype)


def convert_batchnorm(module: nn.Module, *, cuda: bool) -> nn.Module:
    """Replace every BatchNorm2d of ``module`` (in place; parameters and buffers shared) by SyncBatchNorm (CUDA) or
    :class:`GlobalBatchNorm2d` (CPU). Already converted layers are left alone."""
    target = nn.SyncBatchNorm if cuda else GlobalBatchNorm2d
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm2d:
            if cuda:
                replacement = nn.SyncBatchNorm.convert_sync_batchnorm(child)
            else:
                replacement = GlobalBatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum,
                                                affine=child.affine, track_running_stats=child.track_running_stats)
                if child.affine:
                    replacement.weight, replacement.bias = child.weight, child.bias
                replacement.running_mean = child.running_mean
                replacement.running_var = child.running_var
                replacement.num_batches_tracked = child.num_batches_tracked
                replacement.train(child.training)
            setattr(module, name, replacement)
        elif not isinstance(child, target):
            convert_batchnorm(child, cuda=cuda)
    return module


# ---------------------------------------------------------------------------------------------------- device decoding
JPEG_SUFFIXES = (".jpg", ".jpeg")


class DeviceDecodedImageSet(Dataset):
    """A :class:`training.data.FileImageSet` whose JPEG files are decoded on ``device`` with
    ``torchvision.io.decode_jpeg`` (nvJPEG on CUDA), a batch at a time.

    :class:`DeviceDecodeLoader` calls :meth:`prefetch` with the indices of a batch (files read by a thread pool,
    one batched decode); :meth:`load` then returns the decoded uint8 [3, H, W] image on the device, so the
    transforms, box compression and collation of the learner's datasets run on the device. Other formats and files
    the decoder rejects go through the wrapped set's own ``load`` (PIL, its bad-image policy), moved to the device.
    """

    def __init__(self, files, device: torch.device, *, threads: int = 8):
        self.files = files
        self.targets = files.targets
        self.object_boxes = getattr(files, "object_boxes", None)
        self.device = torch.device(device)
        self.threads = threads
        self._ready: dict = {}
        self._pool = None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        return self.load(i), int(self.targets[i])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pool"], state["_ready"] = None, {}
        return state

    @property
    def bad_count(self) -> int:
        return self.files.bad_count

    def path(self, i) -> str:
        return self.files.path(i)

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="jpeg-read")
        return self._pool

    def read(self, indices) -> list:
        """Futures of the raw bytes (uint8 tensors) of the JPEG files among ``indices``: [(index, future)]."""
        from torchvision.io import read_file

        jobs = []
        for i in indices:
            path = self.files.path(i)
            if path.lower().endswith(JPEG_SUFFIXES):
                jobs.append((int(i), self._executor().submit(read_file, path)))
        return jobs

    def prefetch(self, jobs) -> None:
        """Decode the files of :meth:`read` (one batched call; one at a time if the batch fails)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        data = []
        for i, future in jobs:
            try:
                data.append((i, future.result()))
            except OSError:
                pass  # unreadable: load() falls back to the wrapped set, which applies the bad-image policy
        if not data:
            return
        try:
            images = decode_jpeg([d for _, d in data], mode=ImageReadMode.RGB, device=self.device)
            self._ready.update((i, image) for (i, _), image in zip(data, images))
        except RuntimeError:
            for i, raw in data:
                try:
                    self._ready[i] = decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device)
                except RuntimeError:
                    pass

    def load(self, i):
        image = self._ready.pop(int(i), None)
        if image is None:
            image = self.files.load(i)
            if image is not None:
                image = image.to(self.device)
        return image


def _locate(dataset, i: int):
    """(DeviceDecodedImageSet, index) that item ``i`` of a (nested) dataset loads, or None."""
    while True:
        if isinstance(dataset, ConcatDataset):
            part = bisect.bisect_right(dataset.cumulative_sizes, i)
            i -= dataset.cumulative_sizes[part - 1] if part else 0
            dataset = dataset.datasets[part]
            continue
        images, indices = getattr(dataset, "imageset", None), getattr(dataset, "indices", None)
        if isinstance(images, DeviceDecodedImageSet) and indices is not None:
            return images, int(indices[i])
        inner = getattr(dataset, "dataset", None)
        if inner is None:
            return None
        dataset = inner


def _device_images(dataset) -> bool:
    """Whether any item of ``dataset`` comes from a DeviceDecodedImageSet."""
    if isinstance(dataset, ConcatDataset):
        return any(_device_images(d) for d in dataset.datasets)
    if isinstance(getattr(dataset, "imageset", None), DeviceDecodedImageSet):
        return True
    inner = getattr(dataset, "dataset", None)
    return inner is not None and _device_images(inner)


class DeviceDecodeLoader:
    """Batches of a dataset built in this process, with the JPEG files of each batch read by threads one batch
    ahead and decoded on the device in one call (see :class:`DeviceDecodedImageSet`); used instead of a DataLoader
    (no worker processes: the device cannot be shared with forked workers)."""

    def __init__(self, dataset, batch_sampler, *, collate_fn=None):
        from torch.utils.data import default_collate

        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.collate_fn = collate_fn or default_collate

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def _plan(self, keys):
        groups: dict = {}
        for key in keys:
            index = key[0] if isinstance(key, tuple) else key
            found = _locate(self.dataset.dataset if isinstance(self.dataset, SeededDataset) else self.dataset, index)
            if found is not None:
                groups.setdefault(id(found[0]), (found[0], []))[1].append(found[1])
        return [(images, images.read(indices)) for images, indices in groups.values()]

    def __iter__(self):
        batches = iter(self.batch_sampler)
        keys = next(batches, None)
        plan = self._plan(keys) if keys is not None else None
        while keys is not None:
            following = next(batches, None)
            following_plan = self._plan(following) if following is not None else None  # reads overlap this batch
            for images, jobs in plan:
                images.prefetch(jobs)
            yield self.collate_fn([self.dataset[key] for key in keys])
            keys, plan = following, following_plan
