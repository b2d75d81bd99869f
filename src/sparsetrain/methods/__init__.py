"""Methods: one registry of method classes, each with its factory, its knobs and its traits.

A method is a :class:`~.base.Sparsifier` subclass in a module of this package, decorated with
:func:`~.base.register_method`: that makes its factory from the knobs it declares (:mod:`.knobs`) and adds both to
:data:`METHODS` (name -> factory) and :data:`METHOD_CLASSES` (name -> class). The configuration
(``sparsity.method`` and its keys), the CLI, the Trainer and the integrations all build methods through them, so
adding a method is its module in this package (every module here is imported below and registers its methods).
Every factory takes ``(model, optimizer, *, <the method's knobs>, <execution options>)``; :mod:`.base` documents
the lifecycle.
"""

from __future__ import annotations

import importlib as _importlib
import pkgutil as _pkgutil

from ..core.lifecycle import MethodTraits
from .base import METHOD_CLASSES, METHODS, Clock, Dense, Sparsifier, dense
from .dynamic import SET, RigL
from .lottery import Lottery, round_sparsities
from .mest import MEST
from .static import Static, make_masks
from .swat import SWAT

for _module in _pkgutil.iter_modules(__path__):  # each method's module registers it (in its declared rank)
    _importlib.import_module(f"{__name__}.{_module.name}")

# The factories are ``sparsetrain.static``, ``.set``, ``.rigl``, ...; here the names are the modules.
__all__ = [
    "METHODS",
    "METHOD_CLASSES",
    "DESCRIPTIONS",
    "TRAITS",
    "Sparsifier",
    "Clock",
    "Dense",
    "Static",
    "SET",
    "RigL",
    "MEST",
    "SWAT",
    "Lottery",
    "make_masks",
    "round_sparsities",
    "dense",
]

# what each method is, for execution: the backends accept or refuse a method by these (the config asks them too)
TRAITS: dict[str, MethodTraits] = {name: cls.traits for name, cls in METHOD_CLASSES.items()}

# one line per method (the first sentence of its docstring), for listings
DESCRIPTIONS: dict[str, str] = {
    name: " ".join((cls.__doc__ or name).split("\n\n")[0].split()) for name, cls in METHOD_CLASSES.items()
}
