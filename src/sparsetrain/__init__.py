"""sparsetrain: sparse neural-network training in PyTorch.

Every method is a factory that wraps your model and optimizer and returns a sparsifier with
one lifecycle (:mod:`sparsetrain.methods.base`)::

    import sparsetrain as st
    sp = st.rigl(model, optimizer, sparsity=0.9, total_steps=len(loader) * epochs)
    ...  # your loop, unchanged: updates happen inside optimizer.step()
    plain = sp.remove()

The pieces, one concept per subpackage or module: :mod:`~sparsetrain.core.masks` (the sparse core),
:mod:`~sparsetrain.methods` (the factories and their registry), the axes
(:mod:`~sparsetrain.core.distributions`, :mod:`~sparsetrain.core.schemes`, :mod:`~sparsetrain.core.scores`),
:mod:`~sparsetrain.recipes` (ToST, data efficiency), :mod:`~sparsetrain.execution` (backends,
compact and SWAT layers, native kernels), :mod:`~sparsetrain.data.images`, :mod:`~sparsetrain.models`,
:mod:`~sparsetrain.core.accounting`, :mod:`~sparsetrain.app` (our Trainer, a client of the same
factories), :mod:`~sparsetrain.integrations` (Hugging Face, Lightning), :mod:`~sparsetrain.app.config`
and :mod:`~sparsetrain.app.cli`.
"""

from .core.accounting import FlopMeter, measure_layer_costs, saved_tensor_bytes
from .app.config import Config, ConfigError, load_config
from .data.images import load_dataset
from .core.masks import LayerSparsity, MaskSet
from .methods import METHODS, Sparsifier, make_masks, round_sparsities
from .methods.base import dense
from .methods.dynamic import rigl
from .methods.dynamic import set_sparsifier as set  # noqa: A001 - the method is called SET: `sparsetrain.set(...)`
from .methods.lottery import lottery
from .methods.mest import mest
from .methods.static import static
from .methods.swat import swat
from .models import build_model
from .recipes import DataEfficiency, WithIndices
from .recipes.tost import tost
from .app import Trainer

__version__ = "0.1.0"

# ``set`` (SET's factory) stays out of __all__: ``from sparsetrain import *`` must not shadow the builtin
__all__ = [
    "dense", "static", "rigl", "mest", "swat", "lottery", "tost", "METHODS", "Sparsifier", "make_masks",
    "round_sparsities", "DataEfficiency", "WithIndices", "MaskSet", "LayerSparsity",
    "Config", "ConfigError", "load_config", "load_dataset", "build_model",
    "Trainer", "FlopMeter", "measure_layer_costs", "saved_tensor_bytes", "__version__",
]
