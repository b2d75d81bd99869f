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
from .base import Sparsifier, check_fraction, register_method
from .knobs import CLOCK, MASK_KNOBS, SEED, Knob, with_knob_defaults

__all__ = ["Static", "static", "make_masks", "INITS", "SCORE_KNOBS"]

INITS = ("random", "magnitude", "snip", "grasp", "synflow")


INIT = Knob("init", "random", str, "the score that keeps weights: random, magnitude, snip, grasp, synflow")
GLOBAL_RANKING = Knob("global_ranking", False, bool, "rank the units of all layers together instead of per layer")
SYNFLOW_ROUNDS = Knob("synflow_rounds", 100, int, "synflow: pruning rounds towards the target", {"gt": 0})
BATCHES = Knob(
    "batches",
    None,
    "Sequence[tuple[Tensor, Tensor]] | None",
    "training (x, y) pairs that snip and grasp score on",
    config=False,
)
INPUT_SHAPE = Knob(
    "input_shape",
    None,
    "tuple[int, ...] | None",
    "one example's shape for synflow (default: from batches)",
    config=False,
)
SCORE_KNOBS = (INIT, GLOBAL_RANKING, SYNFLOW_ROUNDS, BATCHES, INPUT_SHAPE)


@with_knob_defaults(*MASK_KNOBS, *SCORE_KNOBS)
def make_masks(
    model: nn.Module,
    *,
    sparsity: float,
    distribution: str,
    custom_sparsity: dict[str, float] | None,
    scheme: str,
    dense_layers: Iterable[str],
    init: str,
    global_ranking: bool,
    synflow_rounds: int,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]] | None,
    input_shape: tuple[int, ...] | None,
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


@register_method
class Static(Sparsifier):
    """A static mask: pruning at initialisation by ``init`` (``random``, ``magnitude``, ``snip``,
    ``grasp``, ``synflow``), layer densities by ``distribution`` (``uniform``, ``er``, ``erk``,
    ``custom`` with ``custom_sparsity``), removed shape by ``scheme`` (``unstructured``,
    ``channel_out``, ``channel_in``, ``kernel``, ``pattern``, ``block_RxC``, ``nm_N:M``), kept exact through
    training.

    The length of training is optional (a static mask has no schedule); ``seed`` draws random masks.
    """

    name = "static"
    rank = 10
    traits = MethodTraits(fixed_mask=True, compactable=True)
    knobs = (*MASK_KNOBS, *SCORE_KNOBS, SEED, *CLOCK)

    def __init__(
        self,
        model,
        optimizer,
        *,
        total_steps,
        steps_per_epoch,
        epochs,
        seed: int,
        masks: dict[str, torch.Tensor] | None = None,
        **mask_kw,
    ):
        super().__init__(model, optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch, epochs=epochs)
        self.init = mask_kw["init"]
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


static = Static.factory
