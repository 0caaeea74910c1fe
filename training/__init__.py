"""Class-incremental learning with CIM exemplar compression (CVPR 2023) on FOSTER, built on the cim_ext ops.

Entry point: ``python -m training.run`` (see :mod:`training.run` and docs/training.md). Modules: ``config``
(typed config, runtime), ``data`` (sources, transforms, phases), ``models`` (backbones with ReLU/rational switch,
FOSTER network), ``foster`` (learner), ``cim`` (meta-step, CAM boxes), ``memory`` (compressed exemplars, herding),
``metrics`` (accuracy bookkeeping and loggers), ``checkpoint`` (atomic checkpoints, RNG state).
"""

__all__ = ["config", "data", "models", "foster", "cim", "memory", "metrics", "checkpoint", "run"]
