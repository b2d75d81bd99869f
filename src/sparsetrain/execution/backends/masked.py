"""``masked``: masked dense tensors, the reference and the fallback: exact zeros, dense cost.

The layers stay as they are; the method's MaskSet keeps masked weights, their gradients and their optimizer
state at zero. It runs anything, anywhere, and is what every other backend is tested against.
"""

from __future__ import annotations

from .registry import Backend, register

__all__ = ["Masked"]


@register
class Masked(Backend):
    """Masked dense: the layers compute densely on weights whose masked entries are zero."""

    name = "masked"
    rank = 0
    summary = "masked dense tensors (a simulation: exact zeros, dense cost)"
    swaps_layers = False
    own_layers = True  # SWAT's layers run their dense products on the top-K weights

    def candidate(self, layer, x) -> bool:
        return True  # the reference: every layer can run masked dense
