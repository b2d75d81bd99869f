"""Recipes: what else training does, around any method.

* :mod:`.tost`: ToST's ghost soft neurons, ghost skips, rescaled initialisation and label smoothing;
* :mod:`.data_efficiency`: MEST's removal of unforgettable examples, for any data loader.
"""

from .data_efficiency import DataEfficiency, ForgettingTracker, KeptSampler, WithIndices
from .tost import ToST

# the factory is ``sparsetrain.tost``; here ``tost`` is the module
__all__ = ["ToST", "DataEfficiency", "ForgettingTracker", "KeptSampler", "WithIndices"]
