"""Dynamic sparse training at a constant parameter budget: SET, RigL and MEST.

All three start from a random mask of the configured distribution and scheme, and
periodically prune active units and grow inactive ones (:meth:`Scheme.update`).
Grown weights start at zero with their optimizer state reset (``MaskSet.set_mask``).
Masks are broadcast from rank 0 after every update, so data-parallel ranks agree.

* SET (Mocanu et al., 2018): every ``update_every_steps``, drop the smallest-magnitude
  share of active weights and grow as many at random.
* RigL (Evci et al., 2020): the same drop, growth by dense-gradient magnitude, taken only
  at update steps (its cost is counted); update share cosine-decayed, no updates after
  ``update_end`` of training.
* MEST (Yuan et al., 2021): every ``mest.every_epochs`` epochs, prune by |w| + λ|g| (g the
  gradient of the last batch, read before it is zeroed) and grow at random; the share
  decays by phase (Elastic Mutation); with the Soft Memory Bound it grows first (share
  plus an excess), trains with the extra weights until the next mutation and prunes
  back to the target then. Needs no dense gradient and no dense optimizer state.
"""

from __future__ import annotations

import math

import torch

from .config import SparsityConfig
from .methods import Method, SetupContext, initial_masks

__all__ = ["SET", "RigL", "MEST", "phase_value"]


def phase_value(phases: list[list[float]], t: float) -> float:
    """Value of a piecewise-constant schedule [[from_fraction, value], ...] at training fraction ``t``."""
    value = phases[0][1]
    for start, v in phases:
        if t >= start:
            value = v
    return value


class _Dynamic(Method):
    """Shared machinery: initial random mask, update counts in units, generator state, broadcast."""

    def __init__(self, cfg: SparsityConfig):
        self.cfg = cfg
        self.generator = torch.Generator()
        self.updates = 0

    def setup(self, ctx: SetupContext) -> None:
        self.ctx = ctx
        self.generator.manual_seed(int(torch.randint(0, 2**62, (1,), generator=ctx.generator)))
        self.maskset, self.scheme = initial_masks(self.cfg, ctx, init="random")
        self.target_units = {n: self._active_units(n) for n in self.maskset.masks}

    def _active_units(self, name: str) -> int:
        return int(self.scheme.group(self.maskset.masks[name]).any(1).sum())

    def _swappable(self, name: str, share: float) -> int:
        """Units to prune and regrow for ``share`` of the active ones: no more than can be regrown
        elsewhere (a dense layer swaps nothing), so the count stays constant."""
        units = self.scheme.group(self.maskset.masks[name])
        active = int(units.any(1).sum())
        return min(round(share * active), units.shape[0] - active)

    def _replace(self, optimizer, fraction: float, grow_from_grad: bool) -> None:
        for n in self.maskset.masks:
            k = self._swappable(n, fraction)
            if not k:
                continue
            w, g = self.maskset.weight_and_grad(n)
            new = self.scheme.update(self.maskset.masks[n], w.abs(), k, k, g if grow_from_grad else None, self.generator)
            self.maskset.set_mask(n, new, optimizer)
        self.maskset.broadcast(optimizer=optimizer)
        self.updates += 1

    def _update_fraction(self, step: int) -> float:
        """Share replaced at ``step``; 0 when this is no update step."""
        end = self.cfg.update_end * self.ctx.total_steps
        if step % self.cfg.update_every_steps or step >= end:
            return 0.0
        if self.cfg.update_decay == "constant":
            return self.cfg.update_fraction
        return self.cfg.update_fraction / 2 * (1 + math.cos(math.pi * step / end))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "generator": self.generator.get_state(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])
        self.updates = int(state["updates"])

    def summary(self) -> dict:
        return {"mask_updates": self.updates}


class SET(_Dynamic):
    """SET: magnitude prune and random grow every ``update_every_steps`` (see the module docstring)."""
    name = "set"

    def after_step(self, step, optimizer):
        f = self._update_fraction(step)
        if f:
            self._replace(optimizer, f, grow_from_grad=False)
        return bool(f)


class RigL(_Dynamic):
    """RigL: magnitude prune, grow by dense-gradient magnitude at update steps (see the module docstring)."""
    name = "rigl"

    def before_step(self, step, optimizer):
        # gradients are still dense here: the MaskSet masks them in the optimizer's pre-step hook
        f = self._update_fraction(step + 1)
        self.took_dense_gradient = bool(f)
        if f:
            self._replace(optimizer, f, grow_from_grad=True)
        return bool(f)


class MEST(_Dynamic):
    """MEST with elastic mutation and, optionally, the soft memory bound (see the module docstring)."""
    name = "mest"

    def __init__(self, cfg: SparsityConfig):
        super().__init__(cfg)
        self.expanded = False
        self.peak_active = 0
        self.last_grad_abs_sum = 0.0  # of the gradient the last prune score saw (tests: must be > 0)

    def setup(self, ctx):
        super().setup(ctx)
        self.peak_active = self._active_total()

    def _active_total(self) -> int:
        return sum(int(m.sum()) for m in self.maskset.masks.values())

    def _score(self, name: str) -> torch.Tensor:
        w, g = self.maskset.weight_and_grad(name)
        return w.abs() + self.cfg.mest.prune_lambda * (g.detach().abs() if g is not None else torch.zeros_like(w))

    def end_epoch(self, epochs_done, optimizer):
        total = self.ctx.epochs
        at_end = epochs_done >= total
        if epochs_done % self.cfg.mest.every_epochs and not at_end:
            return False
        t = epochs_done / total
        ratio = 0.0 if at_end else phase_value(self.cfg.mest.mutation_ratio, t)
        excess = phase_value(self.cfg.mest.excess, t) if (self.cfg.mest.soft_bound and not at_end) else 0.0
        if not ratio and not excess and not self.expanded:
            return False
        grads = [self.maskset.weight_and_grad(n)[1] for n in self.maskset.masks]
        self.last_grad_abs_sum = sum(float(g.abs().sum()) for g in grads if g is not None)
        for n, mask in list(self.maskset.masks.items()):
            target = self.target_units[n]
            n_units = self.scheme.group(mask).shape[0]
            active = self._active_units(n)
            mutate = min(round(ratio * target), n_units - target)
            extra = self.scheme.units_for(mask.numel(), excess, n_units) if excess else 0
            if self.cfg.mest.soft_bound:  # prune back to the target (what the last growth added), then grow anew
                n_prune, n_grow = active - target, mutate + extra
            else:
                n_prune, n_grow = mutate, mutate
            new = self.scheme.update(mask, self._score(n), n_prune, n_grow, None, self.generator)
            self.maskset.set_mask(n, new, optimizer)
        self.maskset.broadcast(optimizer=optimizer)
        self.expanded = self.cfg.mest.soft_bound and (ratio > 0 or excess > 0)
        self.peak_active = max(self.peak_active, self._active_total())
        self.updates += 1
        return True

    def state_dict(self):
        return {**super().state_dict(), "expanded": self.expanded, "peak_active": self.peak_active}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.expanded, self.peak_active = bool(state["expanded"]), int(state["peak_active"])

    def summary(self):
        total = sum(m.numel() for m in self.maskset.masks.values())
        return {**super().summary(), "peak_active": self.peak_active, "peak_density": self.peak_active / total}
