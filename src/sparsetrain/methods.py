"""Sparsity methods: how a run's masks are made and how they change during training.

A method is a small object that the trainer calls at fixed points: ``setup`` once,
``before_step`` after the backward pass (dense gradients still in ``.grad``),
``after_step`` after the optimizer step, ``end_epoch`` at the end of each epoch. Dense
training is the base class; masks come from the axes in their own modules
(:mod:`~sparsetrain.distributions`, :mod:`~sparsetrain.schemes`, :mod:`~sparsetrain.scores`),
so a method is a short composition of them. Dynamic methods live in
:mod:`~sparsetrain.dynamic`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from .config import Config, SparsityConfig
from .distributions import layer_densities
from .masks import LayerSparsity, MaskSet
from .schemes import Scheme, parse_scheme
from .scores import SCORERS, masks_from_scores, synflow_masks

__all__ = ["Method", "StaticMask", "SetupContext", "initial_masks", "METHOD_BUILDERS", "build_method"]


@dataclass
class SetupContext:
    """What a method may use to make its masks."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    input_shape: tuple[int, ...]
    steps_per_epoch: int
    epochs: int
    batches: Callable[[], list[tuple[torch.Tensor, torch.Tensor]]] = field(default=lambda: [])
    given_masks: dict[str, torch.Tensor] | None = None  # e.g. a lottery ticket's mask

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs


class Method:
    """Dense training: no masks, no per-step work."""

    name = "dense"
    maskset: MaskSet | None = None
    took_dense_gradient = False  # True on steps where a dense weight gradient was used (RigL's growth)

    def setup(self, ctx: SetupContext) -> None:
        """Called once before training (and before a resume restores state)."""

    def before_step(self, step: int, optimizer: torch.optim.Optimizer) -> bool:
        """After backward, before the optimizer step (gradients are dense here); True if masks changed."""
        return False

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> bool:
        """After the optimizer step; True if masks changed."""
        return False

    def end_epoch(self, epochs_done: int, optimizer: torch.optim.Optimizer) -> bool:
        """At the end of an epoch (the last batch's gradient is still in ``.grad``); True if masks changed."""
        return False

    def weight_density(self) -> dict[str, float] | None:
        return self.maskset.densities() if self.maskset else None

    def grad_density(self) -> dict[str, float] | None:
        """Density of each layer's weight gradient (only kept weights need one under masked training)."""
        return self.weight_density()

    def layer_sparsity(self) -> list[LayerSparsity]:
        """Per-layer weight sparsity of the model as it would be exported."""
        return self.maskset.layers() if self.maskset else []

    def global_sparsity(self) -> float:
        layers = self.layer_sparsity()
        total = sum(ls.numel for ls in layers)
        return 1.0 - sum(ls.nonzeros for ls in layers) / total if total else 0.0

    def export_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The weights to publish as the run's final model (a plain state dict of the architecture)."""
        return model.state_dict()

    def summary(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"masks": self.maskset.state_dict()} if self.maskset else {}

    def load_state_dict(self, state: dict) -> None:
        if self.maskset:
            self.maskset.load_state_dict(state["masks"])


def initial_masks(cfg: SparsityConfig, ctx: SetupContext, init: str | None = None) -> tuple[MaskSet, Scheme]:
    """A MaskSet over the selected layers with masks from ``init`` (default ``cfg.init``), the
    distribution's per-layer densities and the scheme; identical on every data-parallel rank."""
    maskset = MaskSet.for_model(ctx.model, cfg.dense_layers)
    scheme = parse_scheme(cfg.scheme)
    for n, p in maskset.params.items():
        scheme.check(tuple(p.shape), n)
    shapes = {n: tuple(p.shape) for n, p in maskset.params.items()}
    densities = layer_densities(cfg.distribution, shapes, cfg.sparsity, cfg.custom_sparsity)
    init = init or cfg.init
    if ctx.given_masks is not None:
        masks = ctx.given_masks
    elif init == "synflow":
        masks = synflow_masks(ctx.model, list(shapes), densities, ctx.input_shape, scheme, cfg.global_ranking, cfg.synflow_rounds)
    else:
        scores = SCORERS[init](ctx.model, maskset.params, ctx.batches() if init in ("snip", "grasp") else [], ctx.generator)
        masks = masks_from_scores(scores, densities, scheme, cfg.global_ranking)
    for n, m in masks.items():
        maskset.set_mask(n, m)
    maskset.broadcast()
    maskset.attach(ctx.optimizer)
    return maskset, scheme


class StaticMask(Method):
    """A mask fixed at initialisation and kept exact through training."""

    def __init__(self, cfg: SparsityConfig):
        self.cfg = cfg
        self.name = "static" if cfg.init == "random" else cfg.init

    def setup(self, ctx: SetupContext) -> None:
        self.maskset, self.scheme = initial_masks(self.cfg, ctx)


def _swat(cfg: Config) -> Method:
    from .swat import SWATMethod

    return SWATMethod(cfg.sparsity)


def _dynamic(kind: str) -> Callable[[Config], Method]:
    def build(cfg: Config) -> Method:
        from . import dynamic

        return {"set": dynamic.SET, "rigl": dynamic.RigL, "mest": dynamic.MEST}[kind](cfg.sparsity)

    return build


METHOD_BUILDERS: dict[str, Callable[[Config], Method]] = {
    "dense": lambda cfg: Method(),
    "static": lambda cfg: StaticMask(cfg.sparsity),
    "lottery": lambda cfg: StaticMask(cfg.sparsity),  # each round trains a static mask; see sparsetrain.lottery
    "set": _dynamic("set"),
    "rigl": _dynamic("rigl"),
    "mest": _dynamic("mest"),
    "swat": _swat,
}


def build_method(cfg: Config) -> Method:
    """The method object named by ``cfg.sparsity.method``."""
    return METHOD_BUILDERS[cfg.sparsity.method](cfg)
