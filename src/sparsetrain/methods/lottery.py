"""Lottery tickets (Frankle & Carbin, 2019): one round of iterative magnitude pruning with rewinding.

A round takes the weights a previous round trained, keeps the largest magnitudes of each
layer (per the distribution and scheme), rewinds the model to earlier weights (its
initialisation, or step k of the first round) and trains that mask fixed. The search over
rounds, each an ordinary run, is :func:`sparsetrain.app.lottery.lottery_ticket`
(``sparsetrain train`` with ``sparsity.method=lottery``); from Python, call :func:`lottery`
once per round.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.nn as nn

from ..core.distributions import layer_densities
from ..core.lifecycle import MethodTraits
from ..core.masks import select_parameters
from ..core.schemes import parse_scheme
from ..core.scores import masks_from_scores
from .base import register_method
from .knobs import (
    CLOCK,
    CUSTOM_SPARSITY,
    DENSE_LAYERS,
    DISTRIBUTION,
    MASK_KNOBS,
    REQUIRED,
    SCHEME,
    SPARSITY,
    Knob,
    with_knob_defaults,
)
from .static import GLOBAL_RANKING, Static

__all__ = ["Lottery", "lottery", "round_sparsities", "magnitude_ticket"]


def round_sparsities(sparsity: float, rounds: int) -> list[float]:
    """Sparsity trained in each round 0..rounds: 0, then geometrically to ``sparsity``."""
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    return [1 - (1 - sparsity) ** (r / rounds) for r in range(rounds + 1)]


@with_knob_defaults(*MASK_KNOBS, GLOBAL_RANKING)
def magnitude_ticket(
    model: nn.Module,
    trained: Mapping[str, torch.Tensor],
    *,
    sparsity: float,
    distribution: str,
    custom_sparsity,
    scheme: str,
    dense_layers: Iterable[str],
    global_ranking: bool,
) -> dict[str, torch.Tensor]:
    """Masks keeping the largest-magnitude ``trained`` weights of ``model``'s selected layers."""
    names = list(select_parameters(model, dense_layers))
    missing = [n for n in names if n not in trained]
    if missing:
        raise ValueError(f"trained weights lack the sparse layers {missing[:5]}")
    params = {n: trained[n].detach() for n in names}
    densities = layer_densities(
        distribution, {n: tuple(p.shape) for n, p in params.items()}, sparsity, custom_sparsity or {}
    )
    device = next(model.parameters()).device
    return {
        n: m.to(device)
        for n, m in masks_from_scores(
            {n: p.abs() for n, p in params.items()}, densities, parse_scheme(scheme), global_ranking
        ).items()
    }


ROUNDS = Knob(
    "rounds", 3, int, "prune-retrain rounds to reach the target sparsity", {"gt": 0}, section="lottery", factory=False
)
REWIND_STEP = Knob(
    "rewind_step",
    0,
    int,
    "rewind to the weights at this step (0: initialisation)",
    {"ge": 0},
    section="lottery",
    factory=False,
)
TRAINED = Knob("trained", REQUIRED, "Mapping[str, Tensor]", "the previous round's trained state dict", config=False)
REWIND = Knob(
    "rewind", None, "Mapping[str, Tensor] | None", "the state dict to rewind to (default: the model now)", config=False
)


@register_method
class Lottery(Static):
    """One lottery-ticket round: masks keep the largest magnitudes of ``trained`` (a state dict of the
    previous round's trained model), the model is rewound to ``rewind`` (a state dict; default: the
    model's weights now, i.e. its initialisation) and the mask stays fixed while it trains.
    ``round_sparsities(s, rounds)`` gives the usual geometric path of sparsities over rounds."""

    name = "lottery"
    rank = 20
    traits = MethodTraits(fixed_mask=True, rounds=True)
    knobs = (
        SPARSITY,
        TRAINED,
        REWIND,
        DISTRIBUTION,
        CUSTOM_SPARSITY,
        SCHEME,
        DENSE_LAYERS,
        GLOBAL_RANKING,
        *CLOCK,
        ROUNDS,
        REWIND_STEP,
    )

    @classmethod
    def build(cls, model, optimizer, *, trained, rewind, total_steps, steps_per_epoch, epochs, **mask_kw):
        """Rewind, take the ticket from ``trained``, and train it fixed."""
        if rewind is not None:
            model.load_state_dict(rewind)
        masks = magnitude_ticket(model, trained, **mask_kw)
        clock = {"total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "epochs": epochs}
        return cls(model, optimizer, **clock, seed=0, masks=masks, init="magnitude", **mask_kw)

    @property
    def label(self) -> str:
        return "lottery"

    @classmethod
    def sharding_reasons(cls, knobs, compact_state):
        return [f"method {cls.name!r} rewinds whole weights from files between rounds; train its rounds unsharded"]


lottery = Lottery.factory
