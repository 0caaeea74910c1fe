"""cim-ext: fused CPU/CUDA kernels for class-incremental exemplar compression (CIM) and rational activations."""
import torch  # loads libtorch, which the extension links against

try:
    from . import _C  # noqa: F401  (registers torch.ops.cim_ext)
except ImportError as error:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "cim_ext's compiled extension (cim_ext._C) is missing or does not match this torch. Build it with "
        "`pip install --no-build-isolation -e .` in the repository (README: Install), after installing torch. "
        f"Original error: {error}"
    ) from error

from . import _registrations  # noqa: F401
from . import nn, reference
from .ops import *  # noqa: F401,F403
from .ops import __all__ as _ops_all

__version__ = "0.1.0"
__all__ = list(_ops_all) + ["cuda_compiled", "nn", "reference"]


def cuda_compiled():
    """Whether this build of the extension carries the CUDA kernels."""
    return bool(torch.ops.cim_ext._cuda_compiled())
