"""Which units to keep: scores for pruning at initialisation (random, magnitude, SNIP, GraSP, SynFlow).

Each scorer returns one tensor per selected parameter, shaped like it, where higher
means "keep". :func:`masks_from_scores` turns scores into masks, per layer (with the
distribution's densities) or with one global ranking. SynFlow prunes iteratively and
so makes its masks itself (:func:`synflow_masks`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .schemes import Scheme

__all__ = [
    "SCORERS",
    "ScoresByLayer",
    "masks_from_scores",
    "synflow_masks",
    "random_scores",
    "magnitude_scores",
    "snip_scores",
    "grasp_scores",
]

Batch = tuple[torch.Tensor, torch.Tensor]


def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of class scores ``[N, C]`` or of per-position scores ``[N, T, C]`` (language models)."""
    return F.cross_entropy(out.flatten(0, -2), y.flatten())


class ScoresByLayer(Mapping):
    """Scores made one layer at a time as they are read (``score(param)``, in the parameters' order), for the cheap
    scorers: :func:`masks_from_scores` then holds one layer's scores at a time, not a copy of every weight (the
    build's peak). Read it once, in order: random scores draw from their generator as they are read."""

    def __init__(self, params: Mapping[str, torch.Tensor], score: Callable[[torch.Tensor], torch.Tensor]):
        self._params, self._score = params, score

    def __iter__(self):
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._score(self._params[name])


def random_scores(model, params, batches, generator) -> ScoresByLayer:
    """Uniform random scores: a random mask."""
    return ScoresByLayer(params, lambda p: torch.rand(p.shape, generator=generator).to(p.device))


def magnitude_scores(model, params, batches, generator) -> ScoresByLayer:
    """|w|: keep the largest weights."""
    return ScoresByLayer(params, lambda p: p.detach().abs())


def snip_scores(model, params, batches, generator) -> dict[str, torch.Tensor]:
    """SNIP (Lee et al., 2019): |w * dL/dw| summed over the given batches."""
    names = list(params)
    out = {n: torch.zeros_like(params[n]) for n in names}
    for x, y in batches:
        grads = torch.autograd.grad(_ce(model(x), y), [params[n] for n in names])
        for n, g in zip(names, grads):
            out[n] += (g * params[n]).detach().abs()
    return out


def grasp_scores(model, params, batches, generator, temperature: float = 200.0) -> dict[str, torch.Tensor]:
    """GraSP (Wang et al., 2020): keep the weights whose removal least reduces gradient flow.

    The paper's score is -w * Hg (Hessian-gradient product, logits at temperature 200)
    and removes the highest; here the returned keep-score is its negation, w * Hg.
    """
    names = list(params)
    plist = [params[n] for n in names]
    g_sum = [torch.zeros_like(p) for p in plist]
    for x, y in batches:
        for acc, g in zip(g_sum, torch.autograd.grad(_ce(model(x) / temperature, y), plist)):
            acc += g
    hg = [torch.zeros_like(p) for p in plist]
    # the Hessian-gradient product differentiates twice: attention must run on the kernel that supports it
    with sdpa_kernel([SDPBackend.MATH]):
        for x, y in batches:
            grads = torch.autograd.grad(_ce(model(x) / temperature, y), plist, create_graph=True)
            z = sum((g * gs.detach()).sum() for g, gs in zip(grads, g_sum))
            for acc, h in zip(hg, torch.autograd.grad(z, plist)):
                acc += h
    return {n: (p * h).detach() for n, p, h in zip(names, plist, hg)}


SCORERS: dict[str, Callable] = {
    "random": random_scores,
    "magnitude": magnitude_scores,
    "snip": snip_scores,
    "grasp": grasp_scores,
}


def masks_from_scores(
    scores: Mapping[str, torch.Tensor],
    densities: Mapping[str, float],
    scheme: Scheme,
    global_ranking: bool = False,
) -> dict[str, torch.Tensor]:
    """Masks keeping the best-scored units: per layer at ``densities``, or ranked across all
    layers at once (unstructured only) so the total kept equals sum(density * numel)."""
    if not global_ranking:
        return {n: scheme.mask(scores[n], densities[n], n) for n in scores}  # (one layer's scores held at a time)
    scores = dict(scores.items())  # read once: every layer's, for the ranking
    if scheme.name != "unstructured":
        raise ValueError(
            f"global ranking needs the unstructured scheme (units of one size); got {scheme.name}. "
            "Use layer-wise ranking (sparsity.global_ranking=false) for structured schemes"
        )
    budget = round(sum(densities[n] * s.numel() for n, s in scores.items()))
    flat = torch.cat([s.detach().reshape(-1).float().cpu() for s in scores.values()])
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    if budget:
        keep[torch.topk(flat, budget, sorted=False).indices] = True
    out, start = {}, 0
    for n, s in scores.items():
        out[n] = keep[start : start + s.numel()].view(s.shape).to(s.device)
        start += s.numel()
    return out


@torch.no_grad()
def _linearise(model: nn.Module) -> dict[str, torch.Tensor]:
    signs = {}
    for n, t in model.state_dict().items():
        if t.is_floating_point():
            signs[n] = torch.sign(t)
            t.abs_()
    return signs


def synflow_masks(
    model: nn.Module,
    param_names: list[str],
    densities: Mapping[str, float],
    input_shape: tuple[int, ...],
    scheme: Scheme,
    global_ranking: bool = True,
    rounds: int = 100,
) -> dict[str, torch.Tensor]:
    """SynFlow (Tanaka et al., 2020): iterative synaptic-flow pruning with no data.

    On a float64 copy of the model with absolute weights (BatchNorm in eval mode), R is
    the sum of the output for an all-ones input and the score |w * dR/dw|; over
    ``rounds`` rounds the density falls exponentially, d_k = d^(k / rounds), re-scoring
    with the current masks each time.
    """
    net = copy.deepcopy(model).double().eval()
    _linearise(net)
    params = dict(net.named_parameters())
    target = {n: params[n] for n in param_names}
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in target.items()}
    originals = {n: p.detach().clone() for n, p in target.items()}
    x = torch.ones(1, *input_shape, dtype=torch.float64, device=next(net.parameters()).device)
    for k in range(1, rounds + 1):
        with torch.no_grad():
            for n, p in target.items():
                p.copy_(originals[n] * masks[n])
        names = list(target)
        grads = torch.autograd.grad(net(x).sum(), [target[n] for n in names])
        scores = {n: (g * target[n]).detach().abs() for n, g in zip(names, grads)}
        round_density = {n: densities[n] ** (k / rounds) for n in names}
        masks = masks_from_scores(scores, round_density, scheme, global_ranking)
    return masks
