"""Static masks: chosen once at initialisation (random, magnitude, SNIP, GraSP, SynFlow) and kept exact.

:func:`make_masks` is the composition every masked method starts from: selection
(``dense_layers``), distribution (per-layer densities), scheme (the removed shape) and score
(which units are kept). It is deterministic given the generator, so data-parallel ranks that
seed alike agree (masks are broadcast from rank 0 as well).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn

from ..core.distributions import DISTRIBUTION_NAMES, layer_densities
from ..core.lifecycle import MethodTraits
from ..core.masks import MaskSet
from ..core.schemes import Scheme, parse_scheme
from ..core.scores import SCORERS, masks_from_scores, synflow_masks
from .base import Sparsifier, check_fraction, executes

__all__ = ["Static", "static", "make_masks", "INITS"]

INITS = ("random", "magnitude", "snip", "grasp", "synflow")


def make_masks(
    model: nn.Module,
    *,
    sparsity: float,
    distribution: str = "uniform",
    custom_sparsity: dict[str, float] | None = None,
    scheme: str = "unstructured",
    dense_layers: Iterable[str] = ("first", "last"),
    init: str = "random",
    global_ranking: bool = False,
    synflow_rounds: int = 100,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    input_shape: tuple[int, ...] | None = None,
    generator: torch.Generator | None = None,
    masks: dict[str, torch.Tensor] | None = None,
) -> tuple[MaskSet, Scheme]:
    """A MaskSet over the selected layers of ``model`` holding masks of the requested kind, applied.

    ``batches`` (training ``(x, y)`` pairs) feed the data-driven scores ``snip`` and ``grasp``;
    ``input_shape`` (one example, e.g. ``(3, 32, 32)``) feeds ``synflow`` (taken from ``batches``
    when not given). ``masks`` installs given masks instead of scoring (lottery tickets).
    """
    # long: most of it is the keyword signature every static mask takes
    check_fraction("sparsity", sparsity)
    if distribution not in DISTRIBUTION_NAMES:
        raise ValueError(f"unknown distribution {distribution!r}; allowed: {list(DISTRIBUTION_NAMES)}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; allowed: {list(INITS)}")
    if sparsity == 0 and distribution != "custom":
        raise ValueError("sparsity must be > 0 for a sparse method (use sparsetrain.dense for dense training)")
    maskset = MaskSet.for_model(model, dense_layers)
    parsed = parse_scheme(scheme)
    for n, p in maskset.params.items():
        parsed.check(tuple(p.shape), n)
    shapes = {n: tuple(p.shape) for n, p in maskset.params.items()}
    densities = layer_densities(distribution, shapes, sparsity, custom_sparsity or {})
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    if masks is None:
        if init in ("snip", "grasp") and not batches:
            raise ValueError(f"init {init!r} scores weights on training data: pass batches=[(x, y), ...]")
        if init == "synflow":
            if input_shape is None:
                if not batches:
                    raise ValueError(
                        "init 'synflow' needs input_shape (one example's shape, e.g. (3, 32, 32)) or batches"
                    )
                input_shape = tuple(batches[0][0].shape[1:])
            masks = synflow_masks(
                model, list(shapes), densities, tuple(input_shape), parsed, global_ranking, synflow_rounds
            )
        else:
            scores = SCORERS[init](model, maskset.params, list(batches or []), generator)
            masks = masks_from_scores(scores, densities, parsed, global_ranking)
    unknown = set(masks) ^ set(maskset.params)
    if unknown:
        raise ValueError(f"given masks do not match the selected layers; differing names: {sorted(unknown)[:5]}")
    empty = [n for n, m in masks.items() if not m.any()]
    if empty:
        raise ValueError(
            f"sparsity {sparsity} leaves {', '.join(empty[:3])}{' ...' if len(empty) > 3 else ''} with no weight "
            "at all (the network could not pass a signal); lower the sparsity, use distribution 'erk', or "
            "keep those layers dense with dense_layers"
        )
    for n, m in masks.items():
        maskset.set_mask(n, m)
    maskset.broadcast()
    return maskset, parsed


class Static(Sparsifier):
    """A mask fixed at initialisation and kept exact through training (see :func:`static`)."""

    name = "static"
    traits = MethodTraits(fixed_mask=True, compactable=True)

    def __init__(
        self,
        model,
        optimizer,
        *,
        total_steps=None,
        steps_per_epoch=None,
        epochs=None,
        seed: int = 0,
        masks: dict[str, torch.Tensor] | None = None,
        **mask_kw,
    ):
        super().__init__(model, optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch, epochs=epochs)
        self.init = mask_kw.get("init", "random")
        self.target = mask_kw["sparsity"]
        self.maskset, self.scheme = make_masks(
            model, generator=torch.Generator().manual_seed(seed), masks=masks, **mask_kw
        )
        self._attach()

    @property
    def label(self) -> str:
        return "static" if self.init == "random" else self.init

    def _knobs(self) -> str:
        return f"init={self.init!r}, scheme={self.scheme.name!r}"


@executes
def static(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    sparsity: float,
    distribution: str = "uniform",
    custom_sparsity: dict[str, float] | None = None,
    scheme: str = "unstructured",
    dense_layers: Iterable[str] = ("first", "last"),
    init: str = "random",
    global_ranking: bool = False,
    synflow_rounds: int = 100,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    input_shape: tuple[int, ...] | None = None,
    seed: int = 0,
    total_steps: int | None = None,
    steps_per_epoch: int | None = None,
    epochs: int | None = None,
) -> Static:
    """A static mask: pruning at initialisation by ``init`` (``random``, ``magnitude``, ``snip``,
    ``grasp``, ``synflow``), layer densities by ``distribution`` (``uniform``, ``er``, ``erk``,
    ``custom`` with ``custom_sparsity``), removed shape by ``scheme`` (``unstructured``,
    ``channel_out``, ``channel_in``, ``kernel``, ``pattern``, ``block_RxC``, ``nm_N:M``).

    The length of training is optional (a static mask has no schedule); ``seed`` draws random masks.
    """
    return Static(
        model,
        optimizer,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        seed=seed,
        sparsity=sparsity,
        distribution=distribution,
        custom_sparsity=custom_sparsity,
        scheme=scheme,
        dense_layers=dense_layers,
        init=init,
        global_ranking=global_ranking,
        synflow_rounds=synflow_rounds,
        batches=batches,
        input_shape=input_shape,
    )
