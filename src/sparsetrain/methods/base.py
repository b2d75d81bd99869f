"""The one contract every method follows: a sparsifier around a model and its optimizer.

Lifecycle, the same for every method (``sparsetrain.static``, ``set``, ``rigl``, ``mest``,
``swat``, ``lottery``, and the ``tost`` recipe):

1. **Build** ``sp = sparsetrain.rigl(model, optimizer, sparsity=0.9, total_steps=...)``. The masks
   are made and applied at once, and two hooks go on ``optimizer``.
2. **Train** with an unchanged loop: forward, ``loss.backward()``, ``optimizer.step()``. All the
   method's work happens inside ``optimizer.step()``:

   * *before the update* (the optimizer's step pre-hook, :meth:`Sparsifier.pre_step`): methods that
     read the dense gradient do it here, where backward has just left it (RigL's growth), and the
     gradient entries of masked weights are then zeroed;
   * *after the update* (the step post-hook, :meth:`Sparsifier.post_step`): masked weights and
     their optimizer state are zeroed (so momentum, weight decay and Adam's moments never move
     a masked weight), the step clock advances, and scheduled updates run: SET's and RigL's
     mask updates, MEST's mutations and SWAT-M's budgets at epoch ends (the last batch's
     gradient is still in ``.grad`` there, before the next ``zero_grad``).

   *Why hooks and not an explicit* ``sparsifier.step()``: the dense gradient is there exactly
   once per step, at the moment the optimizer consumes it, so no method can read a gradient
   that was already zeroed or is a step old; a user cannot forget the call or make it in the
   wrong place; and frameworks that own the loop (Hugging Face ``Trainer``) call
   ``optimizer.step()`` themselves, so the same object works there unchanged. A step the
   optimizer skips (an AMP scaler that found an overflow) does not advance the clock.
   Frameworks that run backward *inside* ``optimizer.step(closure)`` (Lightning's automatic
   optimisation) set ``manual_pre_step = True`` and call :meth:`pre_step` after backward
   themselves; :class:`sparsetrain.integrations.lightning.SparsityCallback` does that.
3. **Save and resume**: ``sp.state_dict()`` beside the model's and the optimizer's. To resume,
   build model, optimizer and sparsifier as at the start, then load the sparsifier's state first
   (masks, and the layout of layers that store only kept weights), then the model's, then the
   optimizer's. The run then continues bit for bit as if it had not stopped.
4. **Export**: ``plain = sp.remove()`` takes the hooks off, applies the masks for good and
   returns an ordinary ``nn.Module``.

The clock counts optimizer steps; epochs are ``steps_per_epoch`` steps long. Where an epoch's
length changes during training (MEST data efficiency removes examples), set
``sp.steps_per_epoch`` to the new length; :class:`sparsetrain.recipes.DataEfficiency` does.
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..core.distributions import layer_densities
from ..core.lifecycle import MethodTraits
from ..core.masks import LayerSparsity, MaskSet
from ..execution.backends import ExecutionRequest
from ..execution.options import ExecutionOptions
from ..execution.plan import ExecutionPlan, Planner
from .knobs import CLOCK, Knob, make_factory

__all__ = [
    "Sparsifier",
    "Dense",
    "dense",
    "Clock",
    "check_fraction",
    "warn_caller",
    "METHODS",
    "METHOD_CLASSES",
    "register_method",
]


_CARRIERS: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()  # model -> its sparsifier


def _held(optimizer: torch.optim.Optimizer) -> set[int]:
    """Identities of the parameters ``optimizer`` updates."""
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def warn_caller(message: str) -> None:
    """A UserWarning attributed to the first frame outside this package (the user's call, however deep the
    factories and constructors that raised it)."""
    import sys

    package = str(Path(__file__).resolve().parents[1])
    level, frame = 1, sys._getframe(1)
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level + 1)


def check_fraction(name: str, value: float, low_open: bool = False) -> float:
    """``value`` as a float in [0, 1) (or (0, 1) with ``low_open``), or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in {'(0, 1)' if low_open else '[0, 1)'}, got {value!r}")
    v = float(value)
    if not ((0 < v if low_open else 0 <= v) and v < 1):
        raise ValueError(f"{name} must be in {'(0, 1)' if low_open else '[0, 1)'}, got {value!r}")
    return v


@dataclass
class Clock:
    """Optimizer steps taken, and where they fall in epochs. Part of every sparsifier's state."""

    total_steps: int | None = None
    steps_per_epoch: int | None = None
    epochs: int | None = None
    step: int = 0  # optimizer steps completed
    epoch: int = 0  # epochs completed
    epoch_step: int = 0  # steps completed in the current epoch

    @classmethod
    def make(cls, total_steps: int | None, steps_per_epoch: int | None, epochs: int | None) -> "Clock":
        """A clock from either ``total_steps`` or ``steps_per_epoch`` and ``epochs`` (both ways agree if all are given)."""
        for name, v in (("total_steps", total_steps), ("steps_per_epoch", steps_per_epoch), ("epochs", epochs)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if (steps_per_epoch is None) != (epochs is None):
            raise ValueError(
                "give steps_per_epoch and epochs together (or total_steps alone); "
                f"got steps_per_epoch={steps_per_epoch!r}, epochs={epochs!r}"
            )
        if steps_per_epoch is not None:
            if total_steps is not None and total_steps > steps_per_epoch * epochs:
                raise ValueError(
                    f"total_steps={total_steps} exceeds steps_per_epoch * epochs = {steps_per_epoch * epochs}"
                )
            total_steps = total_steps or steps_per_epoch * epochs  # less when training stops early (a step budget)
        return cls(total_steps, steps_per_epoch, epochs)

    def require_total(self, who: str) -> int:
        """The total steps, or a ValueError saying that ``who`` needs them."""
        if self.total_steps is None:
            raise ValueError(
                f"{who} schedules its updates over training: give total_steps (or steps_per_epoch and epochs)"
            )
        return self.total_steps

    def require_epochs(self, who: str) -> tuple[int, int]:
        """Steps per epoch and epochs, or a ValueError saying that ``who`` needs them."""
        if self.steps_per_epoch is None:
            raise ValueError(f"{who} acts at epoch ends: give steps_per_epoch and epochs")
        return self.steps_per_epoch, self.epochs

    def advance(self) -> bool:
        """Count one optimizer step; True when it ended an epoch. The first step past a declared ``total_steps``
        warns (once): the schedules built on that length (update ends, budgets) have ended."""
        self.step += 1
        if self.total_steps is not None and self.step == self.total_steps + 1:
            warnings.warn(
                f"training went past its declared length: step {self.step} of total_steps={self.total_steps}; "
                "schedules over training (mask updates, budgets) ended at the declared length: give the real length",
                RuntimeWarning,
                stacklevel=3,
            )
        self.epoch_step += 1
        if self.steps_per_epoch is not None and self.epoch_step >= self.steps_per_epoch:
            self.epoch += 1
            self.epoch_step = 0
            return True
        return False

    def state_dict(self) -> dict:
        """The clock's counters (for checkpoints)."""
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        """Restore the counters of :meth:`state_dict`."""
        for k in ("step", "epoch", "epoch_step", "steps_per_epoch"):
            setattr(self, k, state[k])


METHODS: dict[str, Callable[..., "Sparsifier"]] = {}  # name -> factory, in registration order
METHOD_CLASSES: dict[str, type["Sparsifier"]] = {}  # name -> class


def register_method(cls: type["Sparsifier"]) -> type["Sparsifier"]:
    """Class decorator: make ``cls``'s factory from its knobs and docstring (``cls.factory``) and register both under
    ``cls.name`` (the configuration, the CLI and the Trainer build methods through :data:`METHODS`)."""
    cls.factory = make_factory(cls, cls.__doc__ or "")
    METHOD_CLASSES[cls.name] = cls
    ordered = sorted(METHOD_CLASSES.items(), key=lambda item: item[1].rank)
    for registry, value in ((METHOD_CLASSES, lambda c: c), (METHODS, lambda c: c.factory)):
        registry.clear()
        registry.update((name, value(c)) for name, c in ordered)
    return cls


class Sparsifier:
    """Base of every method: dense training (no masks) with the full lifecycle of the module docstring.

    Subclasses set ``self.maskset`` in their constructor (before :meth:`_attach`) and override
    the ``_before_update`` / ``_after_update`` / ``_end_epoch`` steps they need.
    """

    name = "dense"
    traits = MethodTraits()
    knobs: tuple[Knob, ...] = CLOCK  # the factory's keyword arguments (see :mod:`.knobs`)
    rank: int = 0  # where it stands in the registry (listings and messages name methods in this order)
    config_hints: dict[str, str] = {}  # configuration key -> a hint shown when this method refuses it

    @classmethod
    def build(cls, model: nn.Module, optimizer: torch.optim.Optimizer, **knobs) -> "Sparsifier":
        """The sparsifier from its knobs' values (what the factory calls; lottery tickets first rewind)."""
        return cls(model, optimizer, **knobs)

    @classmethod
    def knob(cls, name: str) -> Knob:
        """The declared knob ``name`` (its default, doc and configuration key), or a KeyError naming the knobs."""
        for k in cls.knobs:
            if k.name == name:
                return k
        raise KeyError(f"method {cls.name!r} has no knob {name!r}; it has {[k.name for k in cls.knobs]}")

    @classmethod
    def sharding_reasons(cls, knobs: dict, compact_state: bool) -> list[str]:
        """Why this method, with these knob values, cannot train on weights sharded by FSDP2 (empty when it can)."""
        return []

    @classmethod
    def flops_densities(
        cls,
        shapes: dict[str, tuple],
        sparsity: float,
        distribution: str,
        activation_sparsity: float | None,
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Predicted (weight density, weight-gradient density) per sparse layer of ``shapes``, for FLOP counts before
        training (``sparsetrain flops``): masked methods compute the kept weights' gradient only."""
        if not cls.traits.masks:
            return {}, {}
        density = layer_densities(distribution, shapes, sparsity)
        return density, dict(density)

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        total_steps: int | None = None,
        steps_per_epoch: int | None = None,
        epochs: int | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        owner = _CARRIERS.get(model)
        owner = owner() if owner is not None else None
        if owner is not None and not owner.removed:
            raise ValueError(
                f"the model already carries a sparsifier ({type(owner).__name__}); two would each enforce "
                "their own masks on the same weights: call .remove() on the first, or build on a fresh model"
            )
        held = _held(optimizer)
        if not any(id(p) in held for p in model.parameters()):
            raise ValueError(
                "the optimizer holds none of the model's parameters (it was built over another model?): "
                "build it over this model's parameters, e.g. torch.optim.SGD(model.parameters(), ...)"
            )
        self.model, self.optimizer = model, optimizer
        self.clock = Clock.make(total_steps, steps_per_epoch, epochs)
        self.maskset: MaskSet | None = None
        self.took_dense_gradient = False  # True after a step whose update read the dense weight gradient
        self.manual_pre_step = False  # True: the caller runs pre_step() after backward (closure-based frameworks)
        self._pre_done = False
        self._bumps = 0
        self._paused = False
        self._hooks: list = []
        self._planner: Planner | None = None
        self.removed = False  # True after remove(): the sparsifier no longer acts on the model

    # ------------------------------------------------------------------ hooks
    def _attach(self) -> None:
        """Check the model and the optimizer, then put the step hooks on the optimizer (constructors call this
        last, once the masks exist, so that a refusal changes nothing a caller would keep)."""
        self._check_optimizer()
        _CARRIERS[self.model] = weakref.ref(self)
        self._hooks.append(self.optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._pre_hook()))
        self._hooks.append(self.optimizer.register_step_post_hook(lambda opt, args, kwargs: self._post_hook()))
        # weights loaded into the model may hold values where the masks say zero: the next step zeroes them again
        self._hooks.append(self.model.register_load_state_dict_post_hook(lambda module, keys: self._weights_loaded()))

    def _check_optimizer(self) -> None:
        """Refuse an optimizer that does not hold the method's sparse weights: they would never train, and their
        masks would never be enforced."""
        names = self._sparse_weight_names()
        if not names:
            return
        params = dict(self.model.named_parameters())
        held = _held(self.optimizer)
        missing = [n for n in names if n in params and id(params[n]) not in held]
        if len(missing) == len(names):
            raise ValueError(
                f"the optimizer holds none of the model's sparse weights ({missing[:3]}...): build it over "
                "this model's parameters, e.g. torch.optim.SGD(model.parameters(), ...)"
            )
        if missing:
            raise ValueError(
                f"the optimizer does not hold the sparse weights {missing[:4]}{' ...' if len(missing) > 4 else ''}: "
                "they would never train; build it over all of the model's parameters"
            )

    def rebind(self, optimizer: torch.optim.Optimizer) -> None:
        """Move to ``optimizer``, built over the model's parameters after they were replaced by ones of the same
        names (``fully_shard`` after the method was built, as ``run.parallel=fsdp`` does so that compact layers
        exist before sharding): the hooks go on it and the masks follow the new parameters. Call before training."""
        if self.optimizer.state:
            raise ValueError("rebind before training: the old optimizer already holds state that would be lost")
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.optimizer = optimizer
        if self.maskset is not None:
            self.maskset.rebind(self.model)
        if self._planner is not None:
            self._planner.optimizer = optimizer
        self._attach()

    def _pre_hook(self) -> None:
        if not self.manual_pre_step and not self._paused:
            self.pre_step()

    def _post_hook(self) -> None:
        if not self._paused:
            self.post_step()

    @contextlib.contextmanager
    def paused(self):
        """Optimizer steps taken inside this block are not the method's: no clock, no masks, no updates (for
        steps that only create optimizer state, as ``torch.distributed.checkpoint`` takes before a load)."""
        self._paused = True
        try:
            yield self
        finally:
            self._paused = False

    def _weights_loaded(self) -> None:
        if self.maskset is not None:
            self.maskset.forget_zeroed()

    def pre_step(self) -> None:
        """Work before the optimizer's update, with the dense gradients of this step in ``.grad``."""
        if self._pre_done:
            return
        self.took_dense_gradient = self._before_update()
        if self.maskset is not None:
            self.maskset.mask_gradients()
        self._pre_done = True

    def post_step(self) -> None:
        """Work after the optimizer's update: re-apply masks, advance the clock, scheduled updates."""
        masked_before = self._pre_done  # the update read masked gradients
        if not self._pre_done and not self.manual_pre_step:
            self.pre_step()  # an optimizer that bypassed its own pre-hooks
        self._pre_done = False
        if self.maskset is not None and not (masked_before and self.maskset.zeros_hold(self.optimizer)):
            self.maskset.apply(self.optimizer)
        ended = self.clock.advance()
        self._after_update()
        if ended:
            self._end_epoch()

    def _before_update(self) -> bool:
        """Method work before the update; True if it read the dense weight gradient."""
        return False

    def _after_update(self) -> None:
        """Method work after the update (the clock has advanced)."""

    def _end_epoch(self) -> None:
        """Method work at an epoch's end (after its last update)."""

    @property
    def steps_per_epoch(self) -> int | None:
        """Steps in an epoch; settable when an epoch's length changes (data efficiency)."""
        return self.clock.steps_per_epoch

    @steps_per_epoch.setter
    def steps_per_epoch(self, n: int) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"steps_per_epoch must be a positive integer, got {n!r}")
        self.clock.steps_per_epoch = n

    @property
    def version(self) -> int:
        """Moves whenever the weights in use change shape or set (mask updates, SWAT threshold refreshes)."""
        return self._bumps + (self.maskset.version if self.maskset is not None else 0)

    # ------------------------------------------------------------------ execution
    def use_execution(
        self, execution: "str | ExecutionPlan | ExecutionOptions" = ExecutionOptions(), **options
    ) -> "ExecutionPlan | None":
        """Run the method's layers as :class:`~sparsetrain.execution.options.ExecutionOptions` say: ``execution``
        is one such value, or ``"masked"`` (a simulation), a backend's name, ``"auto"`` or an
        :class:`~sparsetrain.execution.plan.ExecutionPlan` (one saved before: nothing is timed), with the other
        options by keyword (``compact_state``, ``channel_both_sides``, ``lossless_activations``,
        ``example_inputs``). ``auto`` times its choices on ``example_inputs`` when given, else on the first training
        forward pass. Returns the plan, or None while it waits for a batch. The factories call this for their
        execution arguments; call it before training."""
        opts = ExecutionOptions.of(execution, **options)
        if self._planner is not None and self._planner.backend.swaps_layers:
            raise ValueError(f"execution is already {self._planner.backend.name!r}; choose it once, before training")
        if self.optimizer.state and opts.compact_state:
            raise ValueError("compact_state changes the optimizer's parameters: choose execution before training")
        scheme = getattr(getattr(self, "scheme", None), "name", "unstructured")
        request = ExecutionRequest(self.name, self.traits, scheme, replace(opts, example_inputs=None))
        self._planner = Planner(self.model, self.optimizer, self.maskset, request)
        if opts.example_inputs is not None and self._planner.pending:
            given = opts.example_inputs
            self._planner.choose(*(given if isinstance(given, (tuple, list)) else (given,)))
        return self._planner.plan

    @property
    def plan(self) -> "ExecutionPlan | None":
        """How the layers run (per layer: backend, compact storage; the model's layout); None while ``auto``
        waits for its first batch. ``print(sp.plan)`` shows it as a table."""
        return self._planner.plan if self._planner is not None else None

    @property
    def execution_layers(self) -> dict[str, nn.Module]:
        """The layers the plan runs, by weight name (empty under masked dense)."""
        return dict(self._planner.layers) if self._planner is not None else {}

    def choose_execution(self, *inputs, **kw_inputs) -> "ExecutionPlan | None":
        """Make a pending plan now, timing ``auto`` on these model inputs (no-op when the plan is made)."""
        if self._planner is not None and self._planner.pending:
            self._planner.choose(*inputs, **kw_inputs)
        return self.plan

    # ------------------------------------------------------------------ reporting
    def weight_density(self) -> dict[str, float] | None:
        """Kept share of each sparse weight (None for dense training)."""
        return self.maskset.densities() if self.maskset else None

    def grad_density(self) -> dict[str, float] | None:
        """Share of each layer's weight gradient that is computed (only kept weights need one under masks)."""
        return self.weight_density()

    def report(self) -> list[LayerSparsity]:
        """Per-layer kept and total weights of the model as it would be exported (after :meth:`remove`: as the
        plain model holds them, nonzeros counted)."""
        if self.removed:
            return self._plain_report()
        return self.maskset.layers() if self.maskset else []

    def _sparse_weight_names(self) -> list[str]:
        """The weights this method makes sparse."""
        return list(self.maskset.masks) if self.maskset is not None else []

    def _plain_report(self) -> list[LayerSparsity]:
        params = dict(self.model.named_parameters())
        return [
            LayerSparsity(n, tuple(params[n].shape), params[n].numel(), int(params[n].count_nonzero()))
            for n in self._sparse_weight_names()
            if n in params
        ]

    def zero_fraction(self) -> float:
        """Share of entries that are exactly zero in the sparse layers' weights as they would be exported (a kept
        weight may be zero too, so this can exceed :meth:`sparsity`)."""
        state = self.export_state()
        names = [n for n in self._sparse_weight_names() if n in state]
        total = sum(state[n].numel() for n in names)
        return sum(int((state[n] == 0).sum()) for n in names) / total if total else 0.0

    def sparsity(self) -> float:
        """Share of the sparse layers' weights that the method removed, counted from its masks (or, for SWAT, the
        weights under each layer's top-K threshold); :meth:`zero_fraction` counts the zeros the weights hold."""
        layers = self.report()
        total = sum(ls.numel for ls in layers)
        return 1.0 - sum(ls.nonzeros for ls in layers) / total if total else 0.0

    def log_to(self, writer, step: int | None = None) -> None:
        """Write the sparsifier's figures as TensorBoard scalars (any ``add_scalar`` writer, e.g.
        ``torch.utils.tensorboard.SummaryWriter``): overall and per-layer sparsity, and the method's summary
        figures (mask updates, ...), at ``step`` (default: the optimizer steps taken)."""
        step = self.clock.step if step is None else step
        writer.add_scalar("sparsity/overall", self.sparsity(), step)
        for ls in self.report():
            writer.add_scalar(f"sparsity/{ls.name}", 1.0 - ls.density, step)
        for key, value in self.summary().items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"method/{key}", value, step)

    @property
    def label(self) -> str:
        """The name records use (a static mask says which score made it)."""
        return self.name

    def summary(self) -> dict:
        """Method-specific figures for run records (mask updates, peak density, ...)."""
        return {}

    def _knobs(self) -> str:
        return ""

    def __repr__(self) -> str:
        if self.removed:
            return f"{type(self).__name__}(removed: the model is a plain nn.Module again)"
        knobs = self._knobs()
        layers = len(self.report())
        total = self.clock.total_steps if self.clock.total_steps is not None else "?"
        return (
            f"{type(self).__name__}({knobs + ', ' if knobs else ''}sparsity={self.sparsity():.4f}, layers={layers}, "
            f"step={self.clock.step}/{total})"
        )

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Everything the method needs to continue exactly: clock, masks, method state, the execution plan."""
        self._check_attached("state_dict")
        state = {
            "method": self.name,
            "clock": self.clock.state_dict(),
            "bumps": self._bumps,
            "sparsity": getattr(self, "target", None),
        }
        if self.maskset is not None:
            state["masks"] = self.maskset.state_dict()
        if self.plan is not None:
            state["plan"] = self.plan.to_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; load it before the model's and the optimizer's state."""
        if not isinstance(state, dict):
            raise TypeError(f"a sparsifier state is a dict (from sp.state_dict()), got {type(state).__name__}")
        if state.get("method") != self.name:
            raise ValueError(f"this state is from method {state.get('method')!r}; this sparsifier is {self.name!r}")
        missing = [k for k in self._state_keys() if k not in state]
        if missing:
            raise ValueError(
                f"this {self.name} state lacks {missing} (cut short or not from sp.state_dict()); a {self.name} "
                f"sparsifier's state holds {self._state_keys()}"
            )
        self._check_attached("load_state_dict")
        saved, mine = state.get("sparsity"), getattr(self, "target", None)
        if saved is not None and mine is not None and abs(float(saved) - float(mine)) > 1e-9:
            raise ValueError(
                f"this state is from sparsity {saved}; this sparsifier is at sparsity {mine}: build it with "
                f"sparsity={saved} to continue that run"
            )
        plan = self._saved_plan(state.get("plan"))  # checked before anything changes, as the masks are
        if self.maskset is not None:
            self.maskset.load_state_dict(state["masks"])
        self.clock.load_state_dict(state["clock"])
        self._bumps = int(state["bumps"])
        if plan is not None:  # a resumed run keeps its choices, without timing again
            self._planner.apply(plan)

    def _state_keys(self) -> list[str]:
        """The keys :meth:`load_state_dict` needs (those :meth:`state_dict` always writes)."""
        return ["method", "clock", "bumps", "sparsity", *(["masks"] if self.maskset is not None else [])]

    def _saved_plan(self, saved: dict | None) -> "ExecutionPlan | None":
        """The saved execution plan, refused (:meth:`Planner.check`) when this sparsifier cannot run it."""
        if saved is None or self._planner is None:
            return None
        plan = ExecutionPlan.from_dict(saved)
        self._planner.check(plan)
        return plan

    def _check_attached(self, what: str) -> None:
        if self.removed:
            raise RuntimeError(
                f"{type(self).__name__}.{what}(): the sparsifier was removed (sp.remove()); "
                "its model is a plain nn.Module now"
            )

    def model_state_keys(self) -> list[str]:
        """Keys this method adds to the model's state dict and restores itself from :meth:`state_dict`
        (integrations drop them from a framework's checkpoint, so the plain model loads it strictly)."""
        return []

    def export_state(self) -> dict[str, torch.Tensor]:
        """The weights to publish: the model's state dict with masks applied (a plain architecture's keys)."""
        if self.maskset is not None:
            self.maskset.apply()
        return self.model.state_dict()

    def remove(self) -> nn.Module:
        """Take the hooks off, apply the masks for good, turn every swapped layer back into a plain one, and return
        the model as an ordinary ``nn.Module`` (its weights equal :meth:`export_state`'s)."""
        if self.removed:
            return self.model
        _CARRIERS.pop(self.model, None)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.maskset is not None:
            self.maskset.apply(self.optimizer)
        if self._planner is not None:
            self._planner.remove()
        self.removed = True
        return self.model


@register_method
class Dense(Sparsifier):
    """Dense training through the same contract (a baseline with the same records and resume): every weight trains;
    the clock still counts."""

    name = "dense"
    traits = MethodTraits(masks=False)
    config_hints = {"sparsity": "choose a sparse method, e.g. sparsity.method=static"}

    def __init__(self, model, optimizer, *, total_steps=None, steps_per_epoch=None, epochs=None):
        super().__init__(model, optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch, epochs=epochs)
        self._attach()


dense = Dense.factory
