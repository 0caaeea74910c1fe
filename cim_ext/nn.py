"""``torch.nn`` modules built on the cim_ext operators."""
import torch
from torch import nn

from . import ops

__all__ = ["Rational", "RELU_INIT"]

#: Published fit of the version-A Padé (5, 4) rational function to ReLU on [-3, 3] (rational_activations).
RELU_INIT = {
    "numerator": (
        0.029963801610813613,
        0.6168978366891341,
        2.37534759733888,
        3.0659900472408443,
        1.5246831881677423,
        0.2528070864040542,
    ),
    "denominator": (-1.191550121923625, 4.4080487697236626, 0.9110357113686055, 0.34884977946384615),
}

_INITS = {"relu": RELU_INIT}


class Rational(nn.Module):
    """Learnable rational activation ``P(x) / (1 + |b1 x| + ... + |b4 x^4|)`` (version A, degrees 5/4).

    Args:
        init (str): coefficient initialisation; ``"relu"`` is the published ReLU fit.
    """

    def __init__(self, init="relu"):
        super().__init__()
        if init not in _INITS:
            raise ValueError(f"init: expected one of {sorted(_INITS)}, got {init!r}")
        self.init = init
        coefficients = _INITS[init]
        self.numerator = nn.Parameter(torch.tensor(coefficients["numerator"], dtype=torch.float32))
        self.denominator = nn.Parameter(torch.tensor(coefficients["denominator"], dtype=torch.float32))

    def forward(self, x):
        return ops.rational(x, self.numerator, self.denominator)

    def extra_repr(self):
        return f"init={self.init!r}, degrees=({self.numerator.numel() - 1}, {self.denominator.numel()})"
