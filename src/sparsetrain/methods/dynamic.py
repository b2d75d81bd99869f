"""Dynamic sparse training at a constant parameter budget: SET and RigL.

Both start from a random mask of the given distribution and scheme and, every
``update_every_steps`` optimizer steps until ``update_end`` of training, drop the
smallest-magnitude share of active units and grow as many inactive ones
(:meth:`Scheme.update`). Grown weights start at zero with their optimizer state reset
(``MaskSet.set_mask``). Masks are broadcast from rank 0 after every update, so
data-parallel ranks agree.

* SET (Mocanu et al., 2018): growth at random, after the step.
* RigL (Evci et al., 2020): growth by dense-gradient magnitude, read before the step
  (the gradient the optimizer is about to use; its cost is counted at update steps only);
  the update share decays with a cosine.

MEST lives in :mod:`.mest`; it shares :class:`PruneAndGrow`.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

from ..core.lifecycle import MethodTraits
from .base import Sparsifier, check_fraction, register_method, warn_caller
from .knobs import CLOCK, MASK_KNOBS, SEED, Knob
from .static import make_masks

__all__ = ["PruneAndGrow", "SET", "RigL", "set_sparsifier", "rigl", "UPDATE_DECAYS"]


UPDATE_EVERY_STEPS = Knob("update_every_steps", 100, int, "SET/RigL: steps between mask updates", {"gt": 0})
UPDATE_FRACTION = Knob(
    "update_fraction", 0.3, float, "SET/RigL: share of active weights replaced at the first update", {"ge": 0, "lt": 1}
)
UPDATE_DECAY = Knob("update_decay", "cosine", Literal["cosine", "constant"], "SET/RigL: how the replaced share decays")
UPDATE_END = Knob("update_end", 0.75, float, "SET/RigL: no updates after this fraction of training", {"gt": 0, "le": 1})
NEURON_ABLATION = Knob(
    "neuron_ablation",
    0.0,
    float,
    "RigL with scheme fan_in: SRigL's neuron ablation threshold (0: off; the paper uses 0.3)",
    {"ge": 0, "lt": 1},
)
UPDATE_DECAYS = get_args(UPDATE_DECAY.kind)
SCHEDULE_KNOBS = (UPDATE_EVERY_STEPS, UPDATE_FRACTION, UPDATE_DECAY, UPDATE_END)


class PruneAndGrow(Sparsifier):
    """Shared machinery: a random initial mask, unit counts per layer, the growth generator, broadcast."""

    traits = MethodTraits(compactable=True, regrows=True)
    reads_gradients = True  # prunes or grows by the weights' gradients (RigL, MEST); SET does not

    def __init__(
        self, model, optimizer, *, sparsity: float, seed: int, total_steps, steps_per_epoch, epochs, **mask_kw
    ):
        super().__init__(model, optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch, epochs=epochs)
        scheme = mask_kw["scheme"]
        if isinstance(scheme, str) and scheme.startswith("nm_"):
            raise ValueError(
                f"{self.name} prunes and grows whole units; N:M scheme {scheme!r} supports static masks only"
            )
        self.target = sparsity
        start = torch.Generator().manual_seed(seed)
        self.generator = torch.Generator()
        self.generator.manual_seed(int(torch.randint(0, 2**62, (1,), generator=start)))
        self.maskset, self.scheme = make_masks(model, sparsity=sparsity, **mask_kw, init="random", generator=start)
        frozen = [n for n, p in self.maskset.params.items() if not p.requires_grad]
        if frozen and self.reads_gradients:
            raise ValueError(
                f"{self.name} reads the gradients of its sparse weights, but {frozen[:4]} are frozen "
                "(requires_grad=False): unfreeze them, or keep them dense with dense_layers"
            )
        self.target_units = {n: self._active_units(n) for n in self.maskset.masks}
        self.updates = 0

    def _active_units(self, name: str) -> int:
        return self.scheme.active_units(self.maskset.masks[name])

    def _swappable(self, name: str, share: float) -> int:
        """Units to prune and regrow for ``share`` of the active ones: no more than can be regrown
        elsewhere (a dense layer swaps nothing), so the count stays constant."""
        mask = self.maskset.masks[name]
        active = self.scheme.active_units(mask)
        return min(round(share * active), self.scheme.units_in(tuple(mask.shape)) - active)

    def _replace(self, fraction: float, grow_from_grad: bool) -> None:
        for n in self.maskset.masks:
            k = self._swappable(n, fraction)
            if not k:
                continue
            w, g = self.maskset.weight_and_grad(n)
            if grow_from_grad and g is None:
                raise RuntimeError(
                    f"{self.name} grows by the dense gradient, but {n} has none at this update "
                    "(call loss.backward() before optimizer.step(); with a closure-based loop set "
                    "manual_pre_step and call pre_step() after backward)"
                )
            new = self._new_mask(n, k, w, g if grow_from_grad else None)
            self.maskset.set_mask(n, new, self.optimizer)
        self.maskset.broadcast(optimizer=self.optimizer)
        self.updates += 1

    def _new_mask(self, name: str, k: int, weight: torch.Tensor, grow_score: torch.Tensor | None) -> torch.Tensor:
        """Layer ``name``'s mask after replacing ``k`` of its units: prune by magnitude, grow by ``grow_score``
        (None: at random)."""
        return self.scheme.update(self.maskset.masks[name], weight.abs(), k, k, grow_score, self.generator)

    def _state_keys(self) -> list[str]:
        return [*super()._state_keys(), *["generator", "updates"]]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "generator": self.generator.get_state(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])
        self.updates = int(state["updates"])

    def summary(self) -> dict:
        return {"mask_updates": self.updates}


class _Scheduled(PruneAndGrow):
    """Updates every ``update_every_steps`` steps until ``update_end`` of training, share decaying."""

    def __init__(
        self,
        model,
        optimizer,
        *,
        update_every_steps: int,
        update_fraction: float,
        update_decay: str,
        update_end: float,
        **kw,
    ):
        super().__init__(model, optimizer, **kw)
        if not isinstance(update_every_steps, int) or update_every_steps < 1:
            raise ValueError(f"update_every_steps must be a positive integer, got {update_every_steps!r}")
        if update_decay not in UPDATE_DECAYS:
            raise ValueError(f"unknown update_decay {update_decay!r}; allowed: {list(UPDATE_DECAYS)}")
        if not 0 < update_end <= 1:
            raise ValueError(f"update_end must be in (0, 1], got {update_end!r}")
        self.update_every_steps, self.update_decay, self.update_end = update_every_steps, update_decay, update_end
        self.update_fraction = check_fraction("update_fraction", update_fraction)
        self.clock.require_total(self.name)
        last = int(self.update_end * self.clock.total_steps)  # no update at or after it
        if update_every_steps >= max(last, 1) or not self.update_fraction:
            warn_caller(
                f"{self.name} updates its mask every {update_every_steps} steps until step {last} of "
                f"{self.clock.total_steps} (update_end={update_end}): no update will happen and the mask stays "
                f"static; set update_every_steps below {max(last, 1)}"
            )
        self._attach()

    def _update_fraction(self, step: int) -> float:
        """Share replaced at (1-based) ``step``; 0 when this is no update step."""
        end = self.update_end * self.clock.total_steps
        if step % self.update_every_steps or step >= end:
            return 0.0
        if self.update_decay == "constant":
            return self.update_fraction
        return self.update_fraction / 2 * (1 + math.cos(math.pi * step / end))

    def _knobs(self) -> str:
        return f"every={self.update_every_steps}, fraction={self.update_fraction}, decay={self.update_decay!r}, updates={self.updates}"


@register_method
class SET(_Scheduled):
    """SET (exported as ``sparsetrain.set``): every ``update_every_steps`` optimizer steps until
    ``update_end`` of training, drop ``update_fraction`` (cosine-decayed by default) of each layer's
    active weights by magnitude and grow as many at random, after the step."""

    name = "set"
    rank = 30
    knobs = (*MASK_KNOBS, *SCHEDULE_KNOBS, SEED, *CLOCK)
    reads_gradients = False

    def _after_update(self) -> None:
        f = self._update_fraction(self.clock.step)
        if f:
            self._replace(f, grow_from_grad=False)


@register_method
class RigL(_Scheduled):
    """RigL: every ``update_every_steps`` optimizer steps until ``update_end`` of training, drop
    ``update_fraction`` (cosine-decayed) of each layer's active weights by magnitude and grow as many
    where the dense gradient of that step is largest (read inside ``optimizer.step()``, before the
    masked entries are zeroed). With ``scheme="fan_in"`` this is SRigL's rule (the same count in every
    row); ``neuron_ablation`` > 0 adds SRigL's neuron ablation: at each update, neurons with fewer than
    that share of their fan-in in salient weights lose all their weights and the others share them
    (the paper's threshold is 0.3)."""

    name = "rigl"
    rank = 40
    knobs = (*MASK_KNOBS, *SCHEDULE_KNOBS, NEURON_ABLATION, SEED, *CLOCK)

    def __init__(self, model, optimizer, *, neuron_ablation: float, **kw):
        if not isinstance(neuron_ablation, (int, float)) or not 0 <= neuron_ablation < 1:
            raise ValueError(f"neuron_ablation must be in [0, 1) (0: off; SRigL uses 0.3), got {neuron_ablation!r}")
        if neuron_ablation and kw.get("scheme") != "fan_in":
            raise ValueError(
                f"neuron_ablation is SRigL's rule for constant fan-in masks; it needs scheme 'fan_in', "
                f"got {kw.get('scheme')!r}"
            )
        self.neuron_ablation = float(neuron_ablation)
        super().__init__(model, optimizer, **kw)
        self._arm()

    @classmethod
    def sharding_reasons(cls, knobs, compact_state):
        if compact_state and knobs.get("neuron_ablation", NEURON_ABLATION.default):
            return [
                "neuron ablation changes how many weights a layer keeps, which a sharded compact layer "
                "cannot; use compact_state=false"
            ]
        return []

    def _arm(self) -> None:
        """Tell the layers whose sparse products give only kept weights a gradient (``csr``, ``direct``,
        ``condensed``, compact storage) whether the coming step is an update step, whose growth needs their full
        weight gradient (computed then, and only then)."""
        self.maskset.start_capture(bool(self._update_fraction(self.clock.step + 1)))

    def _after_update(self) -> None:
        self._arm()

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._arm()

    def _new_mask(self, name, k, weight, grow_score):
        if not self.neuron_ablation:
            return super()._new_mask(name, k, weight, grow_score)
        mask = self.maskset.masks[name]
        live_rows, fan, _ = self.scheme.row_counts(mask)
        kept, live, new_fan = self.scheme.ablate(mask, weight.abs(), grow_score, k, self.neuron_ablation)
        p = k // max(1, live_rows)
        return self.scheme.prune_and_grow_rows(
            kept, weight.abs(), p, p + new_fan - fan, grow_score, self.generator, live
        )

    def _knobs(self) -> str:
        return super()._knobs() + (f", neuron_ablation={self.neuron_ablation}" if self.neuron_ablation else "")

    def _before_update(self) -> bool:
        f = self._update_fraction(self.clock.step + 1)
        if f:
            self.maskset.reduce_captured()
            self._replace(f, grow_from_grad=True)
        self.maskset.adopt_captured()
        return bool(f)


set_sparsifier = SET.factory
rigl = RigL.factory
