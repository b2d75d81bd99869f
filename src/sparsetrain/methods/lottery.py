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
from .base import executes
from .static import Static

__all__ = ["Lottery", "lottery", "round_sparsities", "magnitude_ticket"]


def round_sparsities(sparsity: float, rounds: int) -> list[float]:
    """Sparsity trained in each round 0..rounds: 0, then geometrically to ``sparsity``."""
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    return [1 - (1 - sparsity) ** (r / rounds) for r in range(rounds + 1)]


def magnitude_ticket(
    model: nn.Module,
    trained: Mapping[str, torch.Tensor],
    *,
    sparsity: float,
    distribution: str = "uniform",
    custom_sparsity=None,
    scheme: str = "unstructured",
    dense_layers: Iterable[str] = ("first", "last"),
    global_ranking: bool = False,
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


class Lottery(Static):
    """A lottery-ticket round: a static mask from trained magnitudes on rewound weights (see :func:`lottery`)."""

    name = "lottery"
    traits = MethodTraits(fixed_mask=True)

    @property
    def label(self) -> str:
        return "lottery"


@executes
def lottery(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    sparsity: float,
    trained: Mapping[str, torch.Tensor],
    rewind: Mapping[str, torch.Tensor] | None = None,
    distribution: str = "uniform",
    custom_sparsity: dict[str, float] | None = None,
    scheme: str = "unstructured",
    dense_layers: Iterable[str] = ("first", "last"),
    global_ranking: bool = False,
    total_steps: int | None = None,
    steps_per_epoch: int | None = None,
    epochs: int | None = None,
) -> Lottery:
    """One lottery-ticket round: masks keep the largest magnitudes of ``trained`` (a state dict of the
    previous round's trained model), the model is rewound to ``rewind`` (a state dict; default: the
    model's weights now, i.e. its initialisation) and the mask stays fixed while it trains.
    ``round_sparsities(s, rounds)`` gives the usual geometric path of sparsities over rounds."""
    if rewind is not None:
        model.load_state_dict(rewind)
    masks = magnitude_ticket(
        model,
        trained,
        sparsity=sparsity,
        distribution=distribution,
        custom_sparsity=custom_sparsity,
        scheme=scheme,
        dense_layers=dense_layers,
        global_ranking=global_ranking,
    )
    return Lottery(
        model,
        optimizer,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        masks=masks,
        sparsity=sparsity,
        distribution=distribution,
        custom_sparsity=custom_sparsity,
        scheme=scheme,
        dense_layers=dense_layers,
        init="magnitude",
        global_ranking=global_ranking,
    )
