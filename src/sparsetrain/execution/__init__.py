"""Execution: how the forward and backward passes of sparse layers run.

* :mod:`.plan`: the :class:`~.plan.ExecutionPlan` (per layer: backend, layout, compact storage) and the planner
  that makes and applies it for any sparsifier (``st.rigl(..., execution="auto", compact_state=True)``);
* :mod:`.backends`: one small class per backend (masked dense, CSR products, direct sparse convolutions,
  condensed Linear layers, compacted channels, 2:4, auto), each declaring what it supports; the swapped layers,
  compact storage, channel pruning on both sides and SWAT's layers live beside them;
* :mod:`.activations`: the ReLU that saves one bit per element, the 2x2 max-pool that saves one byte;
* :mod:`.bits`: bit-packing shared by the two above;
* :mod:`.native`: the C kernels behind them, built on first use.
"""

from .backends import BACKENDS
from .plan import ExecutionPlan, LayerPlan

__all__ = ["BACKENDS", "ExecutionPlan", "LayerPlan"]
