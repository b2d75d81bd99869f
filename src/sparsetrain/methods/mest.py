"""MEST (Yuan et al., NeurIPS 2021): memory-economic sparse training with elastic mutation.

Every ``every_epochs`` epochs (at the epoch's end, inside the last step's ``optimizer.step()``,
with that batch's gradient still in ``.grad``), each layer prunes its active units with the
lowest |w| + λ|g| and grows as many inactive ones at random. The share decays by phase
(Elastic Mutation: ``mutation_ratio`` as ``[[fraction_of_training, share], ...]``). With the Soft
Memory Bound (``soft_bound``) it grows first (the share plus an ``excess``), trains with the
extra weights until the next mutation and prunes back to the target then. No dense gradient
and no dense optimizer state are needed.
"""

from __future__ import annotations

import torch

from ..core import sharding
from .base import register_method, warn_caller
from .dynamic import PruneAndGrow
from .knobs import EPOCHS, MASK_KNOBS, REQUIRED, SEED, STEPS_PER_EPOCH, TOTAL_STEPS, Knob

__all__ = ["MEST", "mest", "phase_value", "check_phases"]


def phase_value(phases: list[list[float]], t: float) -> float:
    """Value of a piecewise-constant schedule [[from_fraction, value], ...] at training fraction ``t``."""
    value = phases[0][1]
    for start, v in phases:
        if t >= start:
            value = v
    return value


def check_phases(name: str, v) -> list[list[float]]:
    """A piecewise-constant schedule [[fraction of training, value in [0, 1)], ...], fractions rising from 0."""
    v = [list(p) for p in v]
    if not v or any(len(p) != 2 for p in v):
        raise ValueError(f"{name} must be a list of [fraction_of_training, value] pairs, got {v!r}")
    fr = [p[0] for p in v]
    if fr[0] != 0 or fr != sorted(fr) or not all(0 <= f <= 1 for f in fr):
        raise ValueError(f"{name}: fractions must start at 0, rise, and stay within [0, 1]; got {fr}")
    if any(not 0 <= p[1] < 1 for p in v):
        raise ValueError(f"{name}: values must be in [0, 1); got {[p[1] for p in v]}")
    return v


EVERY_EPOCHS = Knob("every_epochs", 5, int, "epochs between mutations (the paper's delta T)", {"gt": 0}, section="mest")
MUTATION_RATIO = Knob(
    "mutation_ratio",
    ((0.0, 0.2), (0.56, 0.1), (0.75, 0.0)),
    list[list[float]],
    "[fraction of training, share of active weights mutated]; a single [[0, r]] disables elastic mutation",
    section="mest",
    check=check_phases,
)
SOFT_BOUND = Knob(
    "soft_bound", False, bool, "grow the excess first and prune it back at the next mutation", section="mest"
)
EXCESS = Knob(
    "excess",
    ((0.0, 0.05), (0.56, 0.025), (0.75, 0.0)),
    list[list[float]],
    "soft memory bound: extra density grown before the prune, by phase",
    section="mest",
    check=check_phases,
)
PRUNE_LAMBDA = Knob("prune_lambda", 1.0, float, "prune score |w| + lambda * |g|", {"ge": 0}, section="mest")


@register_method
class MEST(PruneAndGrow):
    """MEST: every ``every_epochs`` epochs prune by |w| + ``prune_lambda``·|g| and grow at random;
    the mutated share follows ``mutation_ratio`` by phase (elastic mutation; ``[[0, r]]`` keeps it
    constant); ``soft_bound`` grows ``excess`` extra density first and prunes it back at the next
    mutation. Needs ``steps_per_epoch`` and ``epochs``: it acts at epoch ends."""

    name = "mest"
    rank = 50
    knobs = (
        *MASK_KNOBS,
        EVERY_EPOCHS,
        MUTATION_RATIO,
        SOFT_BOUND,
        EXCESS,
        PRUNE_LAMBDA,
        SEED,
        TOTAL_STEPS,
        STEPS_PER_EPOCH.but(default=REQUIRED),
        EPOCHS.but(default=REQUIRED),
    )

    def __init__(
        self,
        model,
        optimizer,
        *,
        every_epochs: int,
        mutation_ratio,
        soft_bound: bool,
        excess,
        prune_lambda: float,
        **kw,
    ):
        super().__init__(model, optimizer, **kw)
        self.clock.require_epochs("mest")
        if not isinstance(every_epochs, int) or every_epochs < 1:
            raise ValueError(f"every_epochs must be a positive integer, got {every_epochs!r}")
        if prune_lambda < 0:
            raise ValueError(f"prune_lambda must be >= 0, got {prune_lambda!r}")
        self.every_epochs, self.soft_bound, self.prune_lambda = every_epochs, bool(soft_bound), float(prune_lambda)
        if self.clock.epochs <= every_epochs:  # mutations happen at epoch ends before the last one
            warn_caller(
                f"mest mutates every {every_epochs} epoch(s), but training lasts {self.clock.epochs}: no mutation "
                f"will happen and the mask stays static; set every_epochs below {self.clock.epochs}"
            )
        self.mutation_ratio = check_phases("mutation_ratio", mutation_ratio)
        self.excess = check_phases("excess", excess)
        self.expanded = False
        self.peak_active = self._active_total()
        self.last_grad_abs_sum = 0.0  # of the gradient the last prune score saw (tests: must be > 0)
        self._attach()

    def _active_total(self) -> int:
        return sum(ls.nonzeros for ls in self.maskset.layers())

    def _score(self, name: str) -> torch.Tensor:
        w, g = self.maskset.weight_and_grad(name)
        if g is None:
            raise RuntimeError(
                f"mest prunes by |w| + lambda|g| but {name} has no gradient at this epoch's end "
                "(the mutation runs inside the epoch's last optimizer.step(), after loss.backward())"
            )
        return w.abs() + self.prune_lambda * g.detach().abs()

    def _end_epoch(self) -> None:
        done, total = self.clock.epoch, self.clock.epochs
        at_end = done >= total
        if done % self.every_epochs and not at_end:
            return
        t = done / total
        ratio = 0.0 if at_end else phase_value(self.mutation_ratio, t)
        excess = phase_value(self.excess, t) if (self.soft_bound and not at_end) else 0.0
        if not ratio and not excess and not self.expanded:
            return
        grads = [self.maskset.weight_and_grad(n)[1] for n in self.maskset.masks]
        self.last_grad_abs_sum = sum(
            sharding.sum_over_ranks(float(sharding.local(g).abs().sum()), g) for g in grads if g is not None
        )
        for n, mask in list(self.maskset.masks.items()):
            target = self.target_units[n]
            n_units = self.scheme.units_in(tuple(mask.shape))
            active = self._active_units(n)
            mutate = min(round(ratio * target), n_units - target)
            extra = self.scheme.units_for(mask.numel(), excess, n_units) if excess else 0
            if self.soft_bound:  # prune back to the target (what the last growth added), then grow anew
                n_prune, n_grow = active - target, mutate + extra
            else:
                n_prune, n_grow = mutate, mutate
            new = self.scheme.update(mask, self._score(n), n_prune, n_grow, None, self.generator)
            self.maskset.set_mask(n, new, self.optimizer)
        self.maskset.broadcast(optimizer=self.optimizer)
        self.expanded = self.soft_bound and (ratio > 0 or excess > 0)
        self.peak_active = max(self.peak_active, self._active_total())
        self.updates += 1

    def _knobs(self) -> str:
        return f"every_epochs={self.every_epochs}, soft_bound={self.soft_bound}, mutations={self.updates}"

    def _state_keys(self) -> list[str]:
        return [*super()._state_keys(), *["expanded", "peak_active"]]

    def state_dict(self):
        return {**super().state_dict(), "expanded": self.expanded, "peak_active": self.peak_active}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.expanded, self.peak_active = bool(state["expanded"]), int(state["peak_active"])

    @classmethod
    def sharding_reasons(cls, knobs, compact_state):
        if compact_state and knobs.get("soft_bound", SOFT_BOUND.default):
            return [
                "MEST's soft bound changes how many weights a layer keeps, but FSDP shards a compact layer's "
                "kept weights at a fixed count; use sparsity.mest.soft_bound=false or compact_state=false"
            ]
        return []

    def summary(self):
        total = sum(m.numel() for m in self.maskset.masks.values())
        return {**super().summary(), "peak_active": self.peak_active, "peak_density": self.peak_active / total}


mest = MEST.factory
