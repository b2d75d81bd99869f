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

import importlib
import importlib.util

__version__ = "0.1.0"

# name -> (module, attribute): imported on first use (PEP 562), so that `sparsetrain --help` and other light uses
# import no torch; `import sparsetrain as st; st.rigl(...)` works as if everything were imported here
_LAZY = {
    "FlopMeter": ("core.accounting", "FlopMeter"),
    "measure_layer_costs": ("core.accounting", "measure_layer_costs"),
    "saved_tensor_bytes": ("core.accounting", "saved_tensor_bytes"),
    "Config": ("app.config", "Config"),
    "ConfigError": ("app.config", "ConfigError"),
    "load_config": ("app.config", "load_config"),
    "load_dataset": ("data.images", "load_dataset"),
    "LayerSparsity": ("core.masks", "LayerSparsity"),
    "MaskSet": ("core.masks", "MaskSet"),
    "METHODS": ("methods", "METHODS"),
    "Sparsifier": ("methods", "Sparsifier"),
    "make_masks": ("methods", "make_masks"),
    "round_sparsities": ("methods", "round_sparsities"),
    "dense": ("methods.base", "dense"),
    "rigl": ("methods.dynamic", "rigl"),
    "set": ("methods.dynamic", "set_sparsifier"),  # the method is called SET: `sparsetrain.set(...)`
    "lottery": ("methods.lottery", "lottery"),
    "mest": ("methods.mest", "mest"),
    "static": ("methods.static", "static"),
    "swat": ("methods.swat", "swat"),
    "build_model": ("models", "build_model"),
    "DataEfficiency": ("recipes", "DataEfficiency"),
    "WithIndices": ("recipes", "WithIndices"),
    "tost": ("recipes.tost", "tost"),
    "ExecutionOptions": ("execution.options", "ExecutionOptions"),
    "keep_freed_memory": ("execution.allocator", "keep_freed_memory"),
    "save_sparse": ("app.artifact", "save_sparse"),
    "load_sparse": ("app.artifact", "load_sparse"),
    "for_inference": ("app.inference", "for_inference"),
    "Trainer": ("app.trainer", "Trainer"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is None:
        # a method registered by its module (methods/) is reachable by its name too (submodules are not methods)
        methods = importlib.import_module(".methods", __name__).METHODS
        if name in methods:
            return methods[name]
    raise AttributeError(f"module 'sparsetrain' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_LAZY})


# ``set`` (SET's factory) stays out of __all__: ``from sparsetrain import *`` must not shadow the builtin
__all__ = [
    "dense",
    "static",
    "rigl",
    "mest",
    "swat",
    "lottery",
    "tost",
    "METHODS",
    "Sparsifier",
    "make_masks",
    "round_sparsities",
    "DataEfficiency",
    "WithIndices",
    "MaskSet",
    "LayerSparsity",
    "Config",
    "ConfigError",
    "load_config",
    "load_dataset",
    "build_model",
    "save_sparse",
    "load_sparse",
    "for_inference",
    "Trainer",
    "ExecutionOptions",
    "keep_freed_memory",
    "FlopMeter",
    "measure_layer_costs",
    "saved_tensor_bytes",
    "__version__",
]
