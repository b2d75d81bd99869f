"""How much sparsity each layer gets, for a global target: uniform, ER, ERK, or a custom map.

Every function returns per-layer densities whose kept counts, rounded per layer, add
up to the global budget (1 - sparsity) * total. ER and ERK cap a layer whose density
would exceed 1 at 1 (dense) and re-solve the others, so the global budget holds
(the pitfall of implementations that let densities pass 1).
"""

from __future__ import annotations

import math
from typing import Mapping

__all__ = ["DISTRIBUTIONS", "DISTRIBUTION_NAMES", "layer_densities", "uniform", "er", "erk"]


def uniform(shapes: Mapping[str, tuple[int, ...]], sparsity: float) -> dict[str, float]:
    """Every layer at the same density 1 - sparsity."""
    return {n: 1.0 - sparsity for n in shapes}


def _raw_er(shape: tuple[int, ...], kernel: bool) -> float:
    """Erdős–Rényi(-Kernel) scale: sum of the dimensions over their product."""
    dims = shape if kernel else shape[:2]
    return sum(dims) / math.prod(dims)


def _solve_capped(shapes: Mapping[str, tuple[int, ...]], sparsity: float, kernel: bool) -> dict[str, float]:
    """Densities eps * raw_l with layers that would pass 1 made dense, eps solved on the rest."""
    numel = {n: math.prod(s) for n, s in shapes.items()}
    budget = (1.0 - sparsity) * sum(numel.values())
    raw = {n: _raw_er(s, kernel) for n, s in shapes.items()}
    dense: set[str] = set()
    while True:
        rest = [n for n in shapes if n not in dense]
        left = budget - sum(numel[n] for n in dense)
        if not rest or left <= 0:
            raise ValueError(
                f"sparsity {sparsity} is too low for this distribution: the dense layers alone exceed the budget"
            )
        eps = left / sum(raw[n] * numel[n] for n in rest)
        over = [n for n in rest if eps * raw[n] > 1.0]
        if not over:
            out = {n: 1.0 for n in dense}
            out.update({n: eps * raw[n] for n in rest})
            return out
        dense.update(over)


def er(shapes: Mapping[str, tuple[int, ...]], sparsity: float) -> dict[str, float]:
    """Erdős–Rényi: density proportional to (fan_in + fan_out) / (fan_in * fan_out) of the channel dims."""
    return _solve_capped(shapes, sparsity, kernel=False)


def erk(shapes: Mapping[str, tuple[int, ...]], sparsity: float) -> dict[str, float]:
    """Erdős–Rényi-Kernel (RigL): the kernel dimensions count too."""
    return _solve_capped(shapes, sparsity, kernel=True)


DISTRIBUTIONS = {"uniform": uniform, "er": er, "erk": erk}
DISTRIBUTION_NAMES = (*DISTRIBUTIONS, "custom")  # custom: a per-layer map given by the user


def layer_densities(
    kind: str,
    shapes: Mapping[str, tuple[int, ...]],
    sparsity: float,
    custom: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Per-layer densities of distribution ``kind`` (``uniform``, ``er``, ``erk`` or ``custom``)."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if kind == "custom":
        if not custom:
            raise ValueError("distribution 'custom' needs a per-layer map of sparsities (sparsity.custom_sparsity)")
        unknown = sorted(set(custom) - set(shapes))
        if unknown:
            raise ValueError(
                f"custom sparsity names layers that are not sparse parameters: {unknown}; known: {sorted(shapes)}"
            )
        bad = {n: s for n, s in custom.items() if not 0 <= s < 1}
        if bad:
            raise ValueError(f"custom sparsity values must be in [0, 1): {bad}")
        return {n: 1.0 - custom.get(n, sparsity) for n in shapes}
    if kind not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {kind!r}; choose one of {sorted(DISTRIBUTION_NAMES)}")
    return DISTRIBUTIONS[kind](shapes, sparsity)
