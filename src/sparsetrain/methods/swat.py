"""SWAT (Raihan & Aamodt, NeurIPS 2020) as a method: budgets per layer, the SWAT layers, SWAT-M's rebalancing.

The layers themselves (top-K weights in both passes, top-K inputs saved compressed for a
dense weight gradient) are in :mod:`sparsetrain.execution.backends.swat`; this module decides
their budgets. SWAT-U gives every selected layer the same budget; SWAT-ERK takes ERK budgets
once; SWAT-M re-distributes the budgets at every epoch end but the last in proportion to the
mean momentum magnitude of each layer's kept weights (capped at ``m_max_density``, so no layer
silently turns dense); structured SWAT keeps whole kernels (or output channels) by L1 norm,
with unstructured top-K activations.
"""

from __future__ import annotations

from typing import Iterable, Literal, get_args

import torch
import torch.nn as nn

from ..core.distributions import layer_densities
from ..core.lifecycle import MethodTraits
from ..core.masks import LayerSparsity, select_parameters
from ..core.sharding import local, sum_over_ranks
from ..execution.activations import BitReLU, compact_pools, replace_activations
from ..execution.backends.swat import SWAT_BUFFERS, convert, harden, swat_layers
from .base import Sparsifier, check_fraction, register_method
from .knobs import CLOCK, DENSE_LAYERS, SPARSITY, Knob

__all__ = ["SWAT", "swat", "VARIANTS", "STRUCTURES"]


VARIANT = Knob(
    "variant",
    "u",
    Literal["u", "erk", "m", "structured"],
    "budgets: uniform, ERK, momentum, or structured",
    section="swat",
)
ACTIVATION_SPARSITY = Knob(
    "activation_sparsity",
    None,
    float | None,
    "kept share of layer inputs is 1 - this; default: the weight sparsity",
    {"ge": 0, "lt": 1},
    section="swat",
)
TOPK_PERIOD = Knob(
    "topk_period", 20, int, "iterations between exact top-K threshold updates", {"gt": 0}, section="swat"
)
STRUCTURE = Knob(
    "structure",
    "kernel",
    Literal["kernel", "channel_out"],
    "unit kept by structured SWAT (by L1 norm). 'kernel', as the authors' released runs: with 'channel_out' a "
    "removed filter's output is a constant channel, BatchNorm scales its gradient by 1/sqrt(eps), and the dense "
    "update then inflates the removed filters",
    section="swat",
)
M_MAX_DENSITY = Knob(
    "m_max_density",
    0.95,
    float,
    "SWAT-M guard: no layer's budget passes this density",
    {"gt": 0, "le": 1},
    section="swat",
)
COMPACT_RELU = Knob(
    "compact_relu", True, bool, "ReLUs save a 1-bit mask for backward instead of their float output", section="swat"
)
COMPACT_POOL = Knob(
    "compact_pool",
    True,
    bool,
    "2x2 stride-2 max-pools save one byte per output for backward (where the maximum was) instead of their input "
    "and int64 indices",
    section="swat",
)

VARIANTS = get_args(VARIANT.kind)
STRUCTURES = get_args(STRUCTURE.kind)


@register_method
class SWAT(Sparsifier):
    """SWAT: the forward pass uses each layer's top-K weights; backward uses them for the input
    gradient and the layer's top-K inputs (kept share ``1 - activation_sparsity``, default the weight
    share; saved compressed) for a dense weight gradient, so the dense update can bring pruned
    weights back. ``variant``: ``u`` (uniform budgets), ``erk``, ``m`` (budgets follow momentum at
    epoch ends; needs ``steps_per_epoch`` and ``epochs``) or ``structured`` (whole ``structure``
    units of convolutions by L1 norm). Exact top-K every ``topk_period`` steps. ``compact_relu``
    makes ReLUs save one bit per element for backward, ``compact_pool`` 2x2 max-pools one byte per output. The
    classifier is sparse by default (``dense_layers=("first",)``), as in the paper. Layers are converted in place,
    parameters unchanged."""

    name = "swat"
    rank = 60
    traits = MethodTraits(own_layers=True)
    knobs = (
        SPARSITY,
        *CLOCK,
        VARIANT,
        ACTIVATION_SPARSITY,
        TOPK_PERIOD,
        STRUCTURE,
        M_MAX_DENSITY,
        COMPACT_RELU,
        COMPACT_POOL,
        DENSE_LAYERS.but(default=("first",)),
    )
    config_hints = {
        "distribution": "SWAT's budgets come from sparsity.swat.variant (u, erk, m, structured)",
        "scheme": "structured SWAT is sparsity.swat.variant=structured with sparsity.swat.structure",
    }

    @classmethod
    def flops_densities(cls, shapes, sparsity, distribution, activation_sparsity):
        """Weight densities as masked methods; the weight gradient from the top-K activations (their share)."""
        density, _ = super().flops_densities(shapes, sparsity, distribution, activation_sparsity)
        act = sparsity if activation_sparsity is None else activation_sparsity
        return density, {n: 1.0 - act for n in density}

    def __init__(
        self,
        model,
        optimizer,
        *,
        sparsity: float,
        variant: str,
        activation_sparsity: float | None,
        topk_period: int,
        structure: str,
        m_max_density: float,
        compact_relu: bool,
        compact_pool: bool,
        dense_layers: Iterable[str],
        total_steps,
        steps_per_epoch,
        epochs,
    ):
        super().__init__(model, optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch, epochs=epochs)
        check_fraction("sparsity", sparsity, low_open=True)
        if variant not in VARIANTS:
            raise ValueError(f"unknown swat variant {variant!r}; allowed: {list(VARIANTS)}")
        if structure not in STRUCTURES:
            raise ValueError(f"unknown swat structure {structure!r}; allowed: {list(STRUCTURES)}")
        if not isinstance(topk_period, int) or topk_period < 1:
            raise ValueError(f"topk_period must be a positive integer, got {topk_period!r}")
        if not 0 < m_max_density <= 1:
            raise ValueError(f"m_max_density must be in (0, 1], got {m_max_density!r}")
        if activation_sparsity is not None:
            check_fraction("activation_sparsity", activation_sparsity)
        if variant == "m":
            self.clock.require_epochs("swat variant 'm' (budgets move at epoch ends)")
        self.target, self.variant, self.period, self.m_max_density = sparsity, variant, topk_period, m_max_density
        params = select_parameters(model, dense_layers)
        shapes = {n: tuple(p.shape) for n, p in params.items()}
        self.numel = {n: p.numel() for n, p in params.items()}
        dens = layer_densities("erk" if variant == "erk" else "uniform", shapes, sparsity)
        act = None if activation_sparsity is None else 1.0 - activation_sparsity
        convert(model, dens, act, topk_period, structure if variant == "structured" else None)
        if compact_relu:
            replace_activations(model, nn.ReLU, lambda old: BitReLU(inplace=old.inplace))
        if compact_pool:
            compact_pools(model)
        self.layers = swat_layers(model)
        self._attach()

    @property
    def label(self) -> str:
        return f"swat-{self.variant}"

    def _after_update(self) -> None:
        # the layers refresh their thresholds every topk_period forward passes: the weights in use move then
        if self.clock.step % self.period == 1 or self.period == 1:
            self._bumps += 1

    def _end_epoch(self) -> None:
        # not after the last epoch: nothing would train on the new budgets, and the final evaluation
        # would see BatchNorm statistics gathered under the old ones
        if self.variant == "m" and self.clock.epoch < self.clock.epochs:
            self.rebalance()
            self._bumps += 1

    @torch.no_grad()
    def rebalance(self) -> dict[str, float]:
        """SWAT-M: budgets proportional to each layer's mean momentum magnitude over its kept weights."""
        score = {}
        for n, m in self.layers.items():
            buf = self.optimizer.state.get(m.weight, {}).get("momentum_buffer")
            if buf is None:
                buf = self.optimizer.state.get(m.weight, {}).get("exp_avg")  # Adam's first moment
            kept = m.current_mask()
            if buf is None:
                score[n] = 0.0
                continue
            # this rank's rows when sharded: the mean over the whole layer is the ratio of two sums over ranks
            count = sum_over_ranks(int(local(kept).sum()), kept)
            score[n] = sum_over_ranks(float(local(buf)[local(kept)].abs().sum()), kept) / count if count else 0.0
        budget = (1.0 - self.target) * sum(self.numel.values())
        cap = self.m_max_density
        if cap * sum(self.numel.values()) < budget:
            raise ValueError(f"swat m_max_density {cap} cannot hold the budget of sparsity {self.target}")
        fixed: dict[str, float] = {}
        while True:
            rest = [n for n in self.layers if n not in fixed]
            left = budget - sum(fixed[n] * self.numel[n] for n in fixed)
            total = sum(score[n] * self.numel[n] for n in rest)
            if total <= 0:  # no signal: keep the remaining budget uniform
                dens = {n: left / sum(self.numel[r] for r in rest) for n in rest}
            else:
                dens = {n: left * score[n] / total for n in rest}
            over = [n for n in rest if dens[n] > cap]
            if not over:
                break
            fixed.update({n: cap for n in over})
        dens.update(fixed)
        for n, m in self.layers.items():
            m.density = max(dens[n], 1.0 / self.numel[n])
            m.refresh_weights()
        return dens

    def weight_density(self) -> dict[str, float]:
        return {n: m.weight_density() for n, m in self.layers.items()}

    def grad_density(self) -> dict[str, float]:
        """The weight gradient is computed from the top-K inputs: its cost scales with the activation density."""
        return {n: float(m.act_kept) if float(m.act_kept) > 0 else m.act_density for n, m in self.layers.items()}

    def activation_sparsity(self) -> float:
        """Share of layer-input entries dropped for backward at the last refresh, weighted by layer size."""
        kept = self.grad_density()
        total = sum(self.numel.values())
        return 1.0 - sum(kept[n] * self.numel[n] for n in kept) / total

    def _sparse_weight_names(self) -> list[str]:
        return list(self.layers)

    def report(self) -> list[LayerSparsity]:
        if self.removed:
            return self._plain_report()
        return [
            LayerSparsity(n, tuple(m.weight.shape), m.weight.numel(), m.kept_weights()) for n, m in self.layers.items()
        ]

    def model_state_keys(self) -> list[str]:
        return [f"{n.rsplit('.', 1)[0]}.{b}" if "." in n else b for n in self.layers for b in SWAT_BUFFERS]

    def export_state(self) -> dict[str, torch.Tensor]:
        """The plain architecture's state dict with each layer's exact top-K as the weights (the hard-pruned model,
        at exactly the layer budgets: what :meth:`remove` gives)."""
        state = {k: v for k, v in self.model.state_dict().items() if not k.endswith(SWAT_BUFFERS)}
        for n, m in self.layers.items():
            state[n] = (m.weight * m.export_mask()).detach().clone()
        return state

    def summary(self) -> dict:
        return {"activation_sparsity": self.activation_sparsity(), "variant": self.variant}

    def _knobs(self) -> str:
        return f"variant={self.variant!r}, topk_period={self.period}"

    def _state_keys(self) -> list[str]:
        return [*super()._state_keys(), *["densities", "buffers"]]

    def state_dict(self) -> dict:
        """Clock, budgets, and each layer's SWAT buffers (thresholds, kept units, step counts), so the state
        is whole even where a framework saves only the plain model's weights."""
        buffers = {n: {b: getattr(m, b).clone() for b in SWAT_BUFFERS} for n, m in self.layers.items()}
        return {**super().state_dict(), "densities": {n: m.density for n, m in self.layers.items()}, "buffers": buffers}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for n, d in state["densities"].items():
            self.layers[n].density = float(d)
        with torch.no_grad():
            for n, bufs in state["buffers"].items():
                for b, v in bufs.items():
                    getattr(self.layers[n], b).copy_(v)

    def remove(self) -> nn.Module:
        """Hooks off, every layer pruned to its budget and turned back into a plain Conv2d/Linear."""
        super().remove()
        replace_activations(self.model, BitReLU, lambda old: nn.ReLU(inplace=old.inplace))
        compact_pools(self.model, undo=True)
        return harden(self.model)


swat = SWAT.factory
