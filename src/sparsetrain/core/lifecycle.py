"""The one lifecycle every sparsifier and every recipe follows, as a ``typing.Protocol``, and what a method
declares about itself for execution.

A training loop (ours, Hugging Face's, Lightning's, or the user's) needs only this from a sparsifier or a recipe:
work before and after the optimizer's update (normally run by the optimizer's own step hooks), a switch for loops
that run backward inside ``optimizer.step(closure)``, state to save and restore, the model keys it restores
itself, and a way to take it off. The integrations and the Trainer type against :class:`Lifecycle`, so anything
that satisfies it (a method, the ToST recipe, a user's own object) plugs in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch.nn as nn

__all__ = ["Lifecycle", "MethodTraits"]


@runtime_checkable
class Lifecycle(Protocol):
    """What a loop may call on a sparsifier or a recipe (see :mod:`sparsetrain.methods.base` for the order)."""

    manual_pre_step: bool  # True: the loop calls pre_step() after backward itself (closure-based frameworks)

    def pre_step(self) -> None:
        """Work before the optimizer's update, with this step's gradients in ``.grad``."""

    def post_step(self) -> None:
        """Work after the optimizer's update."""

    def state_dict(self) -> dict:
        """Everything needed to continue exactly."""

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (before the model's and the optimizer's state)."""

    def model_state_keys(self) -> list[str]:
        """Keys it adds to the model's state dict and restores itself."""

    def remove(self) -> nn.Module:
        """Take it off the model and the optimizer; the model as an ordinary ``nn.Module``."""


@dataclass(frozen=True)
class MethodTraits:
    """What a method is, as execution backends need to know it (they accept or refuse a method by these, never
    by its name).

    ``masks``: it keeps a mask per sparse layer (dense training has none). ``fixed_mask``: the mask never
    changes after it is made (static, lottery), so layers may be cut for good. ``compactable``: its layers may
    store only their kept weights (the mask's count is honoured by every update). ``own_layers``: it computes
    with layers of its own (SWAT's top-K layers) instead of the masked layers the backends swap in. ``regrows``: it
    prunes and grows whole units during training (SET, RigL, MEST: N:M masks cannot). ``rounds``: a run trains one
    round of several, each a run of its own (lottery tickets: the engine runs the rounds).
    """

    masks: bool = True
    fixed_mask: bool = False
    compactable: bool = False
    own_layers: bool = False
    regrows: bool = False
    rounds: bool = False
