"""Experiments built on the ``training`` package.

``python -m training.experiments.ablation``: compressed vs uncompressed exemplars at equal memory on the synthetic
data (none, whole-image downsampling, CAM boxes with a fixed or Otsu threshold, CIM), at a small and a large budget,
over several seeds; see :mod:`training.experiments.ablation` and docs/ablation.md.
"""

__all__ = ["ablation"]
