"""Methods: one registry of factories, each returning a :class:`~.base.Sparsifier` with one lifecycle.

``METHODS`` maps a method name to its factory; the config (``sparsity.method``), the CLI, the
Trainer and the integrations all build methods through it, so adding a method is one entry
here. Every factory takes ``(model, optimizer, *, <length of training>, <the method's knobs>)``;
:mod:`.base` documents the lifecycle.
"""

from __future__ import annotations

from typing import Callable

from ..core.lifecycle import MethodTraits
from . import dynamic, lottery, mest, static, swat
from .base import Clock, Dense, Sparsifier, dense
from .dynamic import SET, RigL
from .lottery import Lottery, round_sparsities
from .mest import MEST
from .static import Static, make_masks
from .swat import SWAT

# The factories are ``sparsetrain.static``, ``.set``, ``.rigl``, ...; here the names are the modules.
__all__ = [
    "METHODS",
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
]

METHODS: dict[str, Callable[..., Sparsifier]] = {
    "dense": dense,
    "static": static.static,
    "lottery": lottery.lottery,
    "set": dynamic.set_sparsifier,
    "rigl": dynamic.rigl,
    "mest": mest.mest,
    "swat": swat.swat,
}

# what each method is, for execution: the backends accept or refuse a method by these (the config asks them too)
TRAITS: dict[str, MethodTraits] = {cls.name: cls.traits for cls in (Dense, Static, Lottery, SET, RigL, MEST, SWAT)}

DESCRIPTIONS: dict[str, str] = {
    "dense": "no sparsity: every weight trains",
    "static": "a mask fixed at initialisation (init: random, magnitude, snip, grasp, synflow)",
    "lottery": "lottery ticket: iterative magnitude pruning with rewinding, one round per run",
    "set": "SET: magnitude prune, random grow every update_every_steps",
    "rigl": "RigL: magnitude prune, grow by dense-gradient magnitude at update steps",
    "mest": "MEST: |w| + lambda|g| prune, random grow every every_epochs; elastic mutation; optional soft memory bound",
    "swat": "SWAT: top-K weights in forward and backward, top-K activations saved for backward, dense update",
}
