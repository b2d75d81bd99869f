"""Execution: how the forward and backward passes of sparse layers run.

* :mod:`.backends`: masked dense, CSR products, direct sparse convolutions, condensed Linear layers, compacted
  channels, 2:4 (:func:`apply_backend` swaps a model's masked layers onto one of them; :func:`settle_layout` is
  ``auto``'s whole-step check of the layout);
* :mod:`.channel_pairs`: channel pruning that shrinks both sides (the BatchNorm channel and the next layer's inputs);
* :mod:`.compact`: layers that store only their kept weights (and their gradients and optimizer state);
* :mod:`.swat_layers`: SWAT's layers (top-K weights in both passes, compressed top-K inputs);
* :mod:`.activations`: the ReLU that saves one bit per element;
* :mod:`.bits`: bit-packing shared by the two above;
* :mod:`.native`: the C kernels behind them, built on first use.
"""

from .backends import BACKENDS, apply_backend, settle_layout
from .channel_pairs import shrink_both_sides
from .compact import compact_layers

__all__ = ["BACKENDS", "apply_backend", "compact_layers", "settle_layout", "shrink_both_sides"]
