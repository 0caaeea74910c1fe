"""The learner contract (PyCIL's) and what every learner shares.

``incremental_train(phase)`` trains one phase as a sequence of resumable stages (a subclass's ``STAGES``, each run by
its ``_run_<stage>`` method, which moves ``self.stage`` on; the last one leaves ``"trained"``), ``eval_task()``
predicts the test images of every seen class, ``after_task()`` closes the phase, and ``state_dict()`` /
``load_state_dict()`` hold everything needed to continue exactly from any batch boundary (the state of an epoch in
progress included). A learner that keeps a memory holds a :class:`~training.policy.CIMPolicy` (the compression
setting); the two bounds keep none. The runner follows it through :class:`Hooks`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Union

import torch

from ..data import build_transform, collate_skip_bad, PhaseDataset
from ..memory import ExemplarMemory
from ..models import network_from_spec, split_parameters
from ..optim import lr_scheduler, theta_optimizer
from ..policy import CIMPolicy
from .passes import new_pass_state, pass_numbers, predict, train_pass
from .steps import NonFiniteLoss

__all__ = ["Learner", "Hooks", "NonFiniteLoss", "build_network", "upgrade_state"]


def _nothing(*args) -> None:
    return None


@dataclass
class Hooks:
    """What a learner tells its runner; every hook is optional.

    ``epoch_end(info)``: after every epoch of every stage (``info``: phase, stage, epoch, epochs, stage_end, the
    epoch's mean losses); ``batch_end(done, total)``: after every training batch of an epoch (progress, and a safe
    point: the learner's state is then consistent, so the runner may checkpoint, or stop by raising);
    ``status(text)``: a one-line report of work between epochs (box refresh, memory update)."""

    epoch_end: Callable[[dict], None] = _nothing
    batch_end: Callable[[int, int], None] = _nothing
    status: Callable[[str], None] = _nothing


class Learner:
    """Base of the learners.

    Args:
        cfg: the run's :class:`~training.config.Config`.
        stream: the :class:`~training.stream.ClassStream` (source, class order, phases).
        runtime: the :class:`~training.runtime.Runtime` (device, precision, distributed hooks).
        image_size: side of the training images after the transforms.
        hooks: the runner's :class:`Hooks` (checkpoints, progress, logging).
        memory_dir: directory of the exemplar store (``None`` keeps the exemplars' pixels in RAM).
    """

    #: ``cfg.learner`` value, recorded in checkpoints.
    NAME = ""
    #: The stages of a phase, in order.
    STAGES: tuple = ()
    #: Whether the learner keeps an exemplar memory (a :class:`~training.policy.CIMPolicy`).
    USES_MEMORY = True
    #: The learner's own schedule of its training stage (``lr_schedule=auto``): ``cosine`` or ``multistep``.
    SCHEDULE = "cosine"

    def __init__(self, *, cfg, stream, runtime, image_size: int, hooks: Union[Hooks, None] = None,
                 memory_dir: Union[str, None] = None):
        self.cfg, self.stream, self.runtime = cfg, stream, runtime
        self.image_size = int(image_size)
        self.hooks = hooks or Hooks()
        self.network = None
        self.generator = torch.Generator()
        self.generator.manual_seed(cfg.seed)
        self.known = self.total = 0
        self.phase_index, self.stage, self.epoch = -1, "done", 0
        self.optimizers: dict = {}
        self.schedulers: dict = {}
        self.partial_epoch: Union[dict, None] = None  # the epoch in progress: see _epoch
        self.transforms = {kind: build_transform(kind, self.image_size, augment=cfg.original_augmentation)
                           for kind in ("train", "test", "cam")}
        self.policy = CIMPolicy(cfg=cfg, stream=stream, runtime=runtime, transforms=self.transforms,
                                loader=self._loader, memory_dir=memory_dir,
                                status=lambda text: self.hooks.status(text)) if self.USES_MEMORY else None
        # the exemplar memory (an empty one for a learner that keeps none)
        self.memory = ExemplarMemory(ratio=cfg.compress_ratio, mode="none") if self.policy is None else \
            self.policy.memory

    # ---------------------------------------------------------------- what the run reports
    @property
    def phase_log(self) -> dict:
        return {} if self.policy is None else self.policy.phase_log

    @property
    def calibration(self) -> Union[dict, None]:
        return None if self.policy is None else self.policy.calibration

    # ---------------------------------------------------------------- PyCIL contract
    def incremental_train(self, phase) -> None:
        """Train phase ``phase`` (resuming inside it if the learner state says so)."""
        if self.phase_index != phase.index:
            if self.stage != "done" or phase.index != self.phase_index + 1:
                raise RuntimeError(f"incremental_train: phase {phase.index} after phase {self.phase_index} "
                                   f"(stage {self.stage!r}); phases run in order")
            self.phase_index, self.total = phase.index, phase.total
            self._begin_phase(phase)
        for stage in self.STAGES:
            if self.stage == stage:
                getattr(self, f"_run_{stage}")(phase)

    def eval_task(self) -> dict:
        """Top-5 predictions on the test images of every seen class: {"predictions": int64 [N, 5], "targets": int64
        [N], "task_classes": labels per phase, ...the learner's extra predictions}."""
        phase = self.stream.phases[self.phase_index]
        loader = self._test_loader(phase)
        predictions, targets = predict(self.network, loader, self.runtime)
        return {"predictions": predictions, "targets": targets, "task_classes": self.stream.task_labels(phase),
                **self._extra_predictions(loader)}

    def after_task(self) -> None:
        """Close the phase."""
        if self.stage != "trained":
            raise RuntimeError(f"after_task: phase {self.phase_index} is in stage {self.stage!r}, not trained")
        self._close_phase()
        self.known = self.total
        self.optimizers, self.schedulers = {}, {}
        if self.policy is not None:
            self.policy.after_task()
        self.stage, self.epoch = "done", 0

    def _epochs(self, phase) -> int:
        """Epochs of the phase's training stage: ``init_epochs`` in phase 0, ``incre_epochs`` later."""
        return self.cfg.init_epochs if phase.index == 0 else self.cfg.incre_epochs

    def epochs_in(self, phase) -> int:
        """Epochs of all the stages of ``phase`` (the run's progress)."""
        return self._epochs(phase)

    # ---------------------------------------------------------------- subclass hooks
    def _begin_phase(self, phase) -> None:
        """Build the phase's network and optimisers; set ``self.stage`` to the first stage."""
        raise NotImplementedError

    def _make_optimizers(self, phase) -> None:
        """The optimisers and schedulers of the current stage (also used when resuming): in the training stage (the
        first of ``STAGES``) theta's, at the phase's ``*_theta_lr`` and ``*_weight_decay``, on :meth:`_schedule`."""
        cfg = self.cfg
        self.optimizers, self.schedulers = {}, {}
        if self.stage == self.STAGES[0]:
            first = phase.index == 0
            theta, _ = split_parameters(self.network)
            opt = theta_optimizer(cfg, theta.values(), cfg.init_theta_lr if first else cfg.incre_theta_lr,
                                  cfg.init_weight_decay if first else cfg.incre_weight_decay)
            self.optimizers["theta"] = opt
            self.schedulers["theta"] = self._schedule(opt, phase)

    def _extra_predictions(self, loader) -> dict:
        return {}

    def _close_phase(self) -> None:
        """What ``after_task`` does beyond the common reset."""

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        """Restore what :meth:`_extra_state` saved."""

    def _phi_scheduler(self, phase) -> Callable:
        """phi's schedule in the phase's training stage: theta's (:meth:`_schedule`)."""
        return lambda optimizer: self._schedule(optimizer, phase)

    def _grow(self, net_class, phase) -> None:
        """The phase's network: a new ``net_class`` in phase 0, grown by one backbone after; on the device."""
        if self.network is None:
            self.network = net_class(backbone=self.cfg.backbone, fc_bias=self.cfg.fc_bias).grow(phase.total)
        else:
            self.network.grow(phase.total)
        self.runtime.prepare_model(self.network)

    # ---------------------------------------------------------------- shared stages and loops
    def _run_memory(self, phase) -> None:
        """Update the memory with the phase's network (boxes -> compressed exemplars -> herding)."""
        self.policy.end_phase(phase, self.network)
        self.stage = "trained"

    def _schedule(self, optimizer, phase):
        """The training stage's schedule: ``lr_schedule``, or with ``auto`` the learner's own (:attr:`SCHEDULE`)
        over the stage's epochs (cosine) or at the phase's milestones (multistep)."""
        cfg = self.cfg
        kind = self.SCHEDULE if cfg.lr_schedule == "auto" else cfg.lr_schedule
        return lr_scheduler(optimizer, kind, epochs=self._epochs(phase), gamma=cfg.lr_decay,
                            milestones=cfg.init_milestones if phase.index == 0 else cfg.incre_milestones)

    def _run_epochs(self, phase, *, stage: str, epochs: int, epoch_fn: Callable[[int], dict],
                    finish: Callable[[], None], evaluate: bool = False) -> None:
        """Epochs ``self.epoch..epochs`` of a stage: ``epoch_fn(epoch)`` trains one and returns its numbers, then
        ``finish()`` after the last one (at once when ``epochs`` is 0); every epoch is reported to
        ``on_epoch_end``."""
        cfg = self.cfg
        for epoch in range(self.epoch, epochs):
            start = time.perf_counter()
            numbers = epoch_fn(epoch)
            self.epoch = epoch + 1
            last = self.epoch == epochs
            if last:
                finish()
            info = {"phase": phase.index, "stage": stage, "epoch": epoch, "epochs": epochs, "stage_end": last,
                    "seconds": time.perf_counter() - start, **numbers}
            if evaluate and cfg.eval_every and (epoch + 1) % cfg.eval_every == 0:
                info["test_top1"] = self._quick_accuracy(self.network, phase)
            self.hooks.epoch_end(info)
        if epochs == 0:
            finish()

    def _epoch(self, network, dataset, step: Callable, *, prefix: str, batch_size: Union[int, None] = None) -> dict:
        """One shuffled pass of ``step(model, images, labels) -> dict`` over ``dataset`` in train mode; mean
        numbers.

        Resumable at any batch: ``partial_epoch`` holds the loader generator's state from before this epoch drew
        its order, the batches done and the running sums, so a run checkpointed after batch k redraws the same
        order and goes on at batch k + 1. A step that returns ``skipped`` (a non-finite loss skipped) counts no
        image; with ``on_nonfinite_loss="error"`` a non-finite loss stops the run with :class:`NonFiniteLoss`."""
        state = self.partial_epoch
        if state is None:
            state = self.partial_epoch = new_pass_state(self.generator)
        else:
            self.generator.set_state(state["generator"])
        loader = self._loader(dataset, batch_size or self.cfg.batch_size, shuffle=True, skip=state["batches"])
        model = self.runtime.wrap(network)
        network.train()
        train_pass(model, loader, step, state, runtime=self.runtime,
                   total=state["batches"] + len(loader), on_batch=self.hooks.batch_end,
                   where=lambda batch: f"at phase {self.phase_index}, stage {self.stage}, epoch {self.epoch + 1}, "
                                       f"batch {batch}")
        self.partial_epoch = None
        return pass_numbers(state, prefix)

    # ---------------------------------------------------------------- data and evaluation
    def _loader(self, dataset, batch_size: int, *, shuffle: bool, shard: bool = True, skip: int = 0):
        return self.runtime.loader(dataset, batch_size, shuffle=shuffle, generator=self.generator,
                                   collate_fn=collate_skip_bad, workers=self.cfg.workers, shard=shard, skip=skip)

    def _test_loader(self, phase):
        stream = self.stream
        return self._loader(PhaseDataset(stream.source.test, stream.test_indices(stream.seen_classes(phase)),
                                         self.transforms["test"], stream.label_map), self.cfg.batch_size, shuffle=False)

    def _quick_accuracy(self, net, phase) -> float:
        preds, targets = predict(net, self._test_loader(phase), self.runtime)
        return float((preds[:, 0] == targets).double().mean() * 100) if len(targets) else float("nan")

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Everything needed to continue exactly from here (at an epoch boundary or between phases)."""
        return {
            "learner": self.NAME,
            "phase_index": self.phase_index,
            "stage": self.stage,
            "epoch": self.epoch,
            "known": self.known,
            "total": self.total,
            "network": _net_state(self.network),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "generator": self.generator.get_state(),
            "partial_epoch": self.partial_epoch,
            "policy": None if self.policy is None else self.policy.state_dict(),
            **self._extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (or a checkpoint written before the learners were split, see
        :meth:`_upgrade`)."""
        state = self._upgrade(state)
        if state["learner"] != self.NAME:
            raise ValueError(f"load_state_dict: the checkpoint is of learner {state['learner']!r}, this run's is "
                             f"{self.NAME!r}")
        self.phase_index, self.stage, self.epoch = state["phase_index"], state["stage"], state["epoch"]
        self.known, self.total = state["known"], state["total"]
        self.network = build_network(state["network"], self.runtime)
        self._load_extra_state(state)
        self.generator.set_state(state["generator"])
        self.partial_epoch = state.get("partial_epoch")
        phase = self.stream.phases[self.phase_index] if self.phase_index >= 0 else None
        self.optimizers, self.schedulers = {}, {}
        self._make_optimizers(phase)
        for key, value in state["optimizers"].items():
            self.optimizers[key].load_state_dict(value)
        for key, value in state["schedulers"].items():
            self.schedulers[key].load_state_dict(value)
        if self.policy is not None:
            self.policy.load_state_dict(state["policy"], phase, self.network,
                                        None if phase is None else self._phi_scheduler(phase))

    def _upgrade(self, state: dict) -> dict:
        return upgrade_state(state, self.NAME, uses_memory=self.USES_MEMORY)


def upgrade_state(state: dict, learner: str, *, uses_memory: bool) -> dict:
    """A learner state written before the learners were split (one flat dict of the FOSTER class, which also ran
    the bounds) in today's layout, for ``learner`` (the run's ``cfg.learner``); today's states unchanged."""
    if "learner" in state:
        return state
    state = dict(state)
    optimizers, schedulers = dict(state.get("optimizers", {})), dict(state.get("schedulers", {}))
    phi = None
    if "phi" in optimizers:
        phi = {"optimizer": optimizers.pop("phi"), "scheduler": schedulers.pop("phi")}
    policy = {key: state.pop(key, None) for key in ("memory", "exemplar_cams", "boxes", "aug_prob", "phase_log",
                                                    "calibration")}
    policy["phi"] = phi
    state.update(learner=learner, optimizers=optimizers, schedulers=schedulers,
                 policy=policy if uses_memory else None)
    return state


def _net_state(net) -> Union[dict, None]:
    return None if net is None else {"spec": net.spec(), "state": net.state_dict()}


def build_network(entry: Union[dict, None], runtime):
    """The network of a checkpoint entry (``{"spec", "state"}``, see :func:`_net_state`) on the run's device."""
    if entry is None:
        return None
    net = network_from_spec(entry["spec"])
    net.load_state_dict(entry["state"])
    return runtime.prepare_model(net)
