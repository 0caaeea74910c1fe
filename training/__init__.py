"""Class-incremental learning with CIM exemplar compression (CVPR 2023) on FOSTER or DER, built on the cim_ext ops.

Entry point: ``python -m training.run`` (see :mod:`training.run` and docs/training.md). Imports run one way:
``learners`` (FOSTER, DER, the bounds) -> ``policy`` (the CIM memory policy: boxes, phi's meta-training, herding) ->
``cim`` (meta-step, CAM boxes) / ``memory`` (compressed exemplars, herding) / ``exemplar_store`` -> the cim_ext ops.
Beside them: ``config`` (typed config, runtime), ``data`` (sources, transforms, phases), ``stream`` (class order and
phases), ``models`` (backbones with a ReLU/rational switch, the growing networks), ``optim``, ``metrics`` (accuracy
bookkeeping and loggers), ``checkpoint`` (atomic checkpoints, RNG state), ``memory_repair`` (damaged store shards
rebuilt from the training images), ``files`` (atomic writes with the umask's permissions) and ``messages`` (bounded
lists and suggestions for error messages).
"""

__all__ = ["config", "data", "stream", "models", "optim", "learners", "policy", "cim", "memory", "metrics",
           "checkpoint", "run"]
