"""Sparsity methods: how a run's masks are made and how they change during training.

A method is a small object that the trainer calls at fixed points. The base class is
dense training; a method with masks owns a :class:`~sparsetrain.masks.MaskSet`. New
methods subclass :class:`Method` and register under a name in :data:`METHOD_BUILDERS`
(and :data:`sparsetrain.config.METHODS`, so configs may name them).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .config import Config
from .masks import MaskSet, random_masks

__all__ = ["Method", "StaticMask", "METHOD_BUILDERS", "build_method"]


class Method:
    """Dense training: no masks, no per-step work."""

    name = "dense"
    maskset: MaskSet | None = None

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
        """Called once before training, after the optimizer exists and before any resume."""

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> bool:
        """Called after every optimizer step; returns True if the masks changed."""
        return False

    def weight_density(self) -> dict[str, float] | None:
        return self.maskset.densities() if self.maskset else None

    def grad_density(self) -> dict[str, float] | None:
        """Density of each layer's weight gradient (only kept weights need one under masked training)."""
        return self.weight_density()

    def state_dict(self) -> dict:
        return {"masks": self.maskset.state_dict()} if self.maskset else {}

    def load_state_dict(self, state: dict) -> None:
        if self.maskset:
            self.maskset.load_state_dict(state["masks"])


class StaticMask(Method):
    """A mask fixed at initialisation (here: uniformly random per layer), kept exact through training."""

    name = "static-random"

    def __init__(self, sparsity: float, dense_layers: list[str]):
        self.sparsity, self.dense_layers = sparsity, dense_layers

    def setup(self, model, optimizer, generator):
        self.maskset = MaskSet.for_model(model, self.dense_layers)
        random_masks(self.maskset, self.sparsity, generator)
        self.maskset.broadcast()
        self.maskset.attach(optimizer)


METHOD_BUILDERS: dict[str, Callable[[Config], Method]] = {
    "dense": lambda cfg: Method(),
    "static-random": lambda cfg: StaticMask(cfg.sparsity.sparsity, cfg.sparsity.dense_layers),
}


def build_method(cfg: Config) -> Method:
    return METHOD_BUILDERS[cfg.sparsity.method](cfg)
