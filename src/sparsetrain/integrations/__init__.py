"""Integrations with training frameworks, each an optional extra, each wrapping any sparsifier factory.

* :mod:`.huggingface`: a ``transformers`` ``TrainerCallback`` (``pip install "sparsetrain[hf]"``);
* :mod:`.lightning`: a Lightning ``Callback`` (``pip install "sparsetrain[lightning]"``).

Both take a factory ``make(model, optimizer, *, total_steps, steps_per_epoch, epochs)`` returning a
sparsifier (or a list of them, e.g. a method and the ToST recipe: anything that satisfies
:class:`~sparsetrain.core.lifecycle.Lifecycle`), build it when training starts, save its state with the
framework's checkpoints and restore it on resume without user code. Their ``execution`` and the other execution
options (:class:`~sparsetrain.execution.options.ExecutionOptions`) run the method's layers really sparse (:meth:`sparsetrain.methods.base.Sparsifier.use_execution`): ``auto``
times its plan on the first training batch, and a resumed run applies the plan it saved instead.
Importing this package imports neither framework.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..core.lifecycle import Lifecycle
from ..execution.options import ExecutionOptions
from ..methods.base import Sparsifier

__all__ = ["Factory", "build_all", "execution_options", "restore_all", "snapshot"]

Factory = Callable[..., object]


def execution_options(execution, options: dict) -> ExecutionOptions | None:
    """A callback's execution arguments as one value (None: the factory's own choice stands)."""
    if execution is None and not options:
        return None
    return ExecutionOptions.of("masked" if execution is None else execution, **options)


def build_all(
    make: Factory, model: nn.Module, optimizer: torch.optim.Optimizer, *, execution=None, **length
) -> list[Lifecycle]:
    """``make(model, optimizer, **length)`` as a list of sparsifiers (a single one or a sequence); with
    ``execution`` (:class:`~sparsetrain.execution.options.ExecutionOptions`), the method among them (the first
    :class:`~sparsetrain.methods.base.Sparsifier`) runs on it."""
    made = make(model, optimizer, **length)
    made = list(made) if isinstance(made, (list, tuple)) else [made]
    odd = [type(m).__name__ for m in made if not isinstance(m, Lifecycle)]
    if odd:
        raise TypeError(
            f"the factory made {odd}, which lack the sparsifier lifecycle (pre_step, post_step, "
            "state_dict, load_state_dict, model_state_keys, remove, manual_pre_step)"
        )
    if execution is not None:
        methods = [m for m in made if isinstance(m, Sparsifier)]
        if not methods:
            raise ValueError("execution= runs a method's layers, but the factory made no method (only recipes)")
        methods[0].use_execution(execution)
    return made


def restore_all(sparsifiers: Sequence[Lifecycle], states: Sequence[dict], model: nn.Module, weights: dict) -> None:
    """Load ``states`` into freshly built ``sparsifiers``, then put back the model ``weights`` the framework had
    restored before the sparsifiers were built (building a method applies a new mask to them)."""
    if len(states) != len(sparsifiers):
        raise ValueError(
            f"the checkpoint holds the state of {len(states)} sparsifier(s); the factory made {len(sparsifiers)}"
        )
    for sp, state in zip(sparsifiers, states):
        sp.load_state_dict(state)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    owned = {k for sp in sparsifiers for k in sp.model_state_keys()}
    if set(missing) - owned or unexpected:
        raise ValueError(
            f"the restored weights do not fit the model: missing {sorted(set(missing) - owned)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def snapshot(model: nn.Module) -> dict:
    """A copy of the model's weights as the framework restored them."""
    return copy.deepcopy(model.state_dict())
