"""The execution plan: per layer its backend, the model's layout, and which layers store only kept weights.

Every sparsifier can run its layers really sparse: ``st.rigl(model, optimizer, ..., execution="auto",
compact_state=True)``. :class:`Planner` is the one place that assembles execution (swap the masked layers onto a
backend, cut channels on both sides, time ``auto``'s paths and the layout, compact the layers); the factories,
the Trainer and ``bench`` all go through it. What it decided is an :class:`ExecutionPlan`: printable as a table,
saved in the sparsifier's state dict (a resumed run applies it instead of timing again), broadcast from rank 0
under data parallelism (``auto``'s timings differ by rank, its choices must not), and reusable
(``execution=plan``, or :meth:`ExecutionPlan.load` from a JSON file).

Choosing needs a batch. ``auto`` times on ``example_inputs`` when given, else on the first training forward pass
(``model.training`` and gradients enabled; evaluation passes before it run masked dense). The layout it picks
(channels-last or NCHW, whichever made the whole step fastest) is applied to the inputs by a forward
pre-hook on the model, so the loop feeds data as before.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn

from .activations import compact_pools
from .backends import (
    TIMING_SHARE,
    ExecutionRequest,
    apply_backend,
    check_execution,
    choose_now,
    get_backend,
    gradients_dropped,
    keep_buffers,
    measure_reruns,
    settle_layout,
)
from .backends.channel_pairs import shrink_both_sides
from .backends.compact import compact_layers, is_compact
from .backends.plain import restore_plain
from .backends.swat import swat_backend
from .memory import LosslessActivations
from .options import OPTION_NAMES, ExecutionOptions

__all__ = ["ExecutionPlan", "LayerPlan", "Planner", "LAYOUTS"]

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


@dataclass(frozen=True)
class LayerPlan:
    """One layer's execution: the backend's path it runs, whether it stores only its kept weights, and whether
    backward recomputes its output instead of keeping it (under ``lossless_activations``; see
    :mod:`sparsetrain.execution.memory`)."""

    backend: str
    compact: bool = False
    recompute: bool = False


@dataclass
class ExecutionPlan:
    """What runs where: ``requested`` (the ``execution`` asked for), each layer's :class:`LayerPlan` by weight name,
    the model's ``layout`` (``"nchw"``, ``"channels_last"``, or None: the inputs as given), and the
    :class:`~sparsetrain.execution.options.ExecutionOptions` it was made with (``plan.lossless_activations`` and the
    other compared options read through to them)."""

    requested: str
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    layout: str | None = None
    options: ExecutionOptions = ExecutionOptions()
    stems: tuple[str, ...] = ()  # dense layers whose outputs backward recomputes (see stem_layers), by weight name

    def __getattr__(self, name: str):
        if name in OPTION_NAMES and name != "execution":
            return getattr(self.options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def to_dict(self) -> dict:
        """Plain data (for state dicts and JSON)."""
        layers = {n: asdict(lp) for n, lp in self.layers.items()}
        stems = {"stems": list(self.stems)} if self.stems else {}
        return {"requested": self.requested, "layout": self.layout, **self.options.to_dict(), "layers": layers, **stems}

    @classmethod
    def from_dict(cls, d: dict) -> "ExecutionPlan":
        """The plan of :meth:`to_dict`; refuses unknown backends and layouts by name."""
        try:
            get_backend(d["requested"])
            layers = {
                str(n): LayerPlan(
                    get_backend(lp["backend"]).name, bool(lp.get("compact", False)), bool(lp.get("recompute", False))
                )
                for n, lp in d["layers"].items()
            }
            layout = d.get("layout")
            stems = tuple(str(n) for n in d.get("stems", ()))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not an execution plan (missing or malformed field: {e})") from None
        if layout is not None and layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r} in the plan; allowed: {sorted(LAYOUTS)} or null")
        defaults = ExecutionOptions().to_dict()  # (a plan saved before an option existed ran with its default)
        compared = {k: bool(d.get(k, default)) for k, default in defaults.items()}
        return cls(d["requested"], layers, layout, ExecutionOptions(execution=d["requested"], **compared), stems)

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON (``ExecutionPlan.load`` reads it back)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "ExecutionPlan":
        """A plan written by :meth:`save`."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not an execution plan: not JSON ({e})") from None

    def counts(self) -> dict[str, int]:
        """How many layers run each path."""
        out: dict[str, int] = {}
        for lp in self.layers.values():
            out[lp.backend] = out.get(lp.backend, 0) + 1
        return dict(sorted(out.items()))

    def __str__(self) -> str:
        width = max([len("layer"), *map(len, self.layers)])
        head = (
            f"execution plan: {self.requested}, layout {self.layout or 'as given'}"
            f"{', channels cut on both sides' if self.channel_both_sides else ''}"
            f"{', lossless activations' if self.lossless_activations else ''}"
        )
        extra = self.lossless_activations and self.recompute_outputs  # the recompute column, where there is a choice
        rows = [
            head,
            f"{'layer':<{width}}  {'backend':<15}  compact" + ("  recompute" if extra else ""),
            f"{'-' * width}  {'-' * 15}  -------" + ("  ---------" if extra else ""),
        ]
        rows += [
            f"{n:<{width}}  {lp.backend:<15}  {'yes' if lp.compact else 'no':<7}"
            + (f"  {'yes' if lp.recompute else 'no'}" if extra else "")
            for n, lp in self.layers.items()
        ]
        rows += [f"dense layers recomputed in backward: {', '.join(self.stems)}"] if self.stems else []
        return "\n".join(r.rstrip() for r in rows)


def _first_tensor(obj):
    """The first tensor in a model's output (a tensor, a tuple, a dict, or an output object with ``loss``/``logits``)."""
    if torch.is_tensor(obj):
        return obj
    for key in ("loss", "logits"):
        value = getattr(obj, key, None) if not isinstance(obj, dict) else obj.get(key)
        if torch.is_tensor(value):
            return value
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for v in items:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def _map_tensors(obj, fn):
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _in_layout(fmt: torch.memory_format):
    """A function putting 4-D floating tensors into memory format ``fmt`` (others pass unchanged)."""
    return lambda t: t.contiguous(memory_format=fmt) if t.dim() == 4 and t.is_floating_point() else t


RERUN_BUDGET = 0.1  # the recomputed outputs may cost at most this share of the measured training step
# a dense convolution with at most this many products per output (a network's first layer: 3 x 3 x 3 = 27 on CIFAR,
# 3 x 7 x 7 = 147 in ResNet-50) costs about what a sparse layer's forward costs: its output may be recomputed too
STEM_FAN_IN = 160
# a stem's output is remade for its BatchNorm's backward, and (through that BatchNorm and ReLU, whose output is then
# not kept either) for the rerun and the weight gradient of the layer after it
STEM_FORWARDS = 3.0


def stem_layers(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The dense convolutions of ``model`` (not among the swapped ``layers``) cheap enough to recompute under
    ``lossless_activations``: at most :data:`STEM_FAN_IN` products per output. By weight name."""
    swapped = {id(m) for m in layers.values()}
    return {
        f"{name}.weight": m
        for name, m in model.named_modules()
        if type(m) is nn.Conv2d
        and id(m) not in swapped
        and m.in_channels // m.groups * math.prod(m.kernel_size) <= STEM_FAN_IN
    }


def reruns(
    layers: dict[str, nn.Module],
    step_seconds: float | None = None,
    stems: dict[str, nn.Module] | None = None,
    costs: dict[str, tuple[float, int]] | None = None,
) -> set[str]:
    """The layers whose outputs backward recomputes instead of keeping (under ``lossless_activations``).

    Layers on a sparse kernel qualify (``sparse_forward``: a masked dense layer's rerun would cost a dense forward),
    and the dense ``stems`` (:func:`stem_layers`). Where ``auto`` measured the step (``step_seconds``) and each
    layer's forward time (what a rerun costs) and output bytes (what it saves) (``costs``, from
    :func:`~sparsetrain.execution.backends.measure_reruns`), the layers are taken cheapest per byte first while their
    reruns add up to at most :data:`RERUN_BUDGET` of the step, so the step pays a bounded share for the memory. With
    nothing measured (a backend named), every qualifying layer is chosen."""
    stems = stems or {}
    eligible = {n: m for n, m in layers.items() if getattr(m, "sparse_forward", False)} | stems
    costs = {  # (seconds, bytes); a layer whose rerun costs more than its forward says how many (rerun_forwards)
        n: (cost[0] * (STEM_FORWARDS if n in stems else getattr(eligible[n], "rerun_forwards", 1.0)), cost[1])
        for n, cost in (costs or {}).items()
        if n in eligible
    }
    if step_seconds is None or not costs:
        return set(eligible)
    chosen, spent = set(), 0.0
    for name in sorted(costs, key=lambda n: costs[n][0] / max(costs[n][1], 1)):
        if spent + costs[name][0] <= RERUN_BUDGET * step_seconds:
            chosen.add(name)
            spent += costs[name][0]
    return chosen


class Planner:
    """Makes and applies a sparsifier's execution plan (see the module docstring).

    Built by :meth:`sparsetrain.methods.base.Sparsifier.use_execution`; ``maskset`` is None for methods with
    layers of their own (SWAT), whose layers the backends run directly.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        maskset,
        request: ExecutionRequest,
    ):
        options = request.options
        given = options.execution if isinstance(options.execution, ExecutionPlan) else None
        if not isinstance(options.requested, str):
            raise TypeError(
                f"execution must be a backend name, 'auto' or an ExecutionPlan, got {type(options.execution).__name__}"
            )
        self.backend = check_execution(options.requested, request)
        self.model, self.optimizer, self.maskset, self.request = model, optimizer, maskset, request
        self.options = options
        self.plan: ExecutionPlan | None = None
        self._step_seconds: float | None = None  # a training step's time, measured where reruns are weighed
        self._rerun_costs: dict[str, tuple[float, int]] = {}  # by weight name: (a forward's seconds, its bytes)
        self._hooks: list = []
        self._layout_hooks: list = []
        if request.traits.own_layers:
            self.layers = swat_backend(model, self.backend.name)
        else:
            self.layers = apply_backend(model, maskset, self.backend.name) if self.backend.swaps_layers else {}
        if options.channel_both_sides:
            shrink_both_sides(model, self.layers)
        # where layers run on kernels, so do the 2x2 max-pools: exact, and on the CPU 2.5x faster than PyTorch's
        # NCHW pool forward and backward (a byte per output kept, not the input and int64 indices)
        self._pools = compact_pools(model) if self.layers and not request.traits.own_layers else 0
        # before any timing, so that auto times the step as it will run
        recompute = options.lossless_activations and options.recompute_outputs
        self.stems = stem_layers(model, self.layers) if recompute else {}
        self.memory = (
            LosslessActivations(model, [*self.layers.values(), *self.stems.values()] if recompute else ())
            if options.lossless_activations
            else None
        )
        if given is not None:
            self.apply(given)
        elif not self.backend.timed:
            self._finish(layout=None)  # nothing to time: the plan is what the backend runs
        else:  # the first module of the chain a training step calls brings the batch
            self._hooks += [
                m.register_forward_pre_hook(self._on_first_forward, with_kwargs=True) for m in self._chain()
            ]

    @property
    def pending(self) -> bool:
        """True until the plan is made (``auto`` before its first batch)."""
        return self.plan is None

    # ------------------------------------------------------------------ choosing
    def _chain(self) -> list[nn.Module]:
        """The model and its submodules down to the smallest one that holds every planned layer: whichever of them
        a training step calls first (a Lightning module's ``training_step`` calls an inner network, not its own
        forward) brings the batch, and the layout is applied to the inputs of each."""
        parents = [n.split(".")[:-2] for n in self.layers]  # "block.conv.weight": the layer's parent is "block"
        chain = [self.model]
        for level in zip(*parents):  # the parents' common path, one module at a time
            if len(set(level)) != 1:
                break
            chain.append(getattr(chain[-1], level[0]))
        return chain

    def _on_first_forward(self, module, args, kwargs):
        if not (module.training and torch.is_grad_enabled()) or not self.pending:
            return None
        self._choose_with(module, args, kwargs)
        return _map_tensors(args, self._to_layout), kwargs

    def _to_layout(self, t):
        fmt = LAYOUTS.get(self.plan.layout) if self.plan is not None and self.plan.layout else None
        return _in_layout(fmt)(t) if fmt is not None else t

    def choose(self, *args, **kwargs) -> ExecutionPlan:
        """Time ``auto``'s choices on one batch (the model's positional and keyword inputs) and make the plan. The
        parameters, BatchNorm statistics and random number streams are left as they were."""
        return self._choose_with(self.model, args, kwargs)

    def _choose_with(self, model: nn.Module, args: tuple, kwargs: dict) -> ExecutionPlan:
        """:meth:`choose` on the inputs of ``model`` (the planned model or the submodule that was called)."""
        if not self.pending:
            return self.plan
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        image = bool(args) and torch.is_tensor(args[0]) and args[0].dim() == 4 and args[0].is_floating_point()
        layout = None
        devices = [args[0].device.index or 0] if args and torch.is_tensor(args[0]) and args[0].is_cuda else []
        with torch.random.fork_rng(devices=devices), gradients_dropped(model):
            if image and self.layers:
                # per-layer choices ignore the layout between layers: the whole step against every layer masked dense
                part = max(1, args[0].shape[0] // TIMING_SHARE)
                small = _map_tensors(
                    (args, kwargs), lambda t: t[:part] if t.dim() and t.shape[0] == args[0].shape[0] else t
                )

                def loss_of(fmt, batch=small):
                    a, k = batch
                    return _first_tensor(model(*_map_tensors(a, _in_layout(fmt)), **k)).float().mean()

                fmt = settle_layout(
                    model,
                    self.layers,
                    loss_of,
                    whole_loss_of=lambda f: loss_of(f, (args, kwargs)),
                    settled=self._compact,
                )
                layout = "channels_last" if fmt == torch.channels_last else "nchw"
                step = lambda: loss_of(fmt)  # noqa: E731
            elif self.layers:  # (settle_layout keeps its own copy of the state; here one is made only when needed)
                restore = keep_buffers(model)
                step = lambda: _first_tensor(model(*args, **kwargs)).float().mean()  # noqa: E731
                choose_now(model, step)
                restore()
            if self.layers and self.memory is not None and self.options.recompute_outputs:
                self._step_seconds, self._rerun_costs = measure_reruns(model, self.layers | self.stems, step)
        for p in model.parameters():
            p.grad = None
        if self.maskset is not None:
            self.maskset.captured.clear()
        return self._finish(layout)

    def _compact(self, compact: set[str] | None = None) -> None:
        """Compact the layers on their chosen paths that may store only kept weights and are not yet compact
        (``compact``: those named; None: every one the backends allow, under ``compact_state``)."""
        if self.maskset is not None:
            fresh = {
                n: m
                for n, m in self.layers.items()
                if not is_compact(m) and (n in compact if compact is not None else self.options.compact_state)
            }
            compact_layers(fresh, self.maskset, self.optimizer)

    def _finish(
        self, layout: str | None, compact: set[str] | None = None, recompute: set[str] | None = None
    ) -> ExecutionPlan:
        """Compact the layers that may store only kept weights (``compact``: those named; None: every one the
        backends allow, under ``compact_state``), choose the layers whose outputs backward recomputes
        (``recompute``: those named; None: :func:`reruns`), set the layout, and record the plan."""
        self._compact(compact)
        if recompute is None:
            on = self.memory is not None and self.options.recompute_outputs
            recompute = reruns(self.layers, self._step_seconds, self.stems, self._rerun_costs) if on else set()
        both = self.layers | self.stems
        if self.memory is not None:
            self.memory.rerun(both[n] for n in recompute)
        self.plan = ExecutionPlan(
            self.backend.name,
            {n: LayerPlan(m.backend, is_compact(m), n in recompute) for n, m in self.layers.items()},
            layout,
            replace(self.options, execution=self.backend.name, example_inputs=None),
            tuple(n for n in self.stems if n in recompute),
        )
        self._set_layout(layout)
        return self.plan

    def _set_layout(self, layout: str | None) -> None:
        for h in self._layout_hooks:
            h.remove()
        self._layout_hooks.clear()
        if layout is None:
            return
        self.model.to(memory_format=LAYOUTS[layout])
        to_layout = _in_layout(LAYOUTS[layout])
        self._layout_hooks = [
            m.register_forward_pre_hook(lambda module, args: _map_tensors(args, to_layout)) for m in self._chain()
        ]

    # ------------------------------------------------------------------ applying a plan
    def check(self, plan: ExecutionPlan) -> None:
        """Refuse a plan this planner cannot run, naming why: another execution, other layers, other compared
        :class:`~sparsetrain.execution.options.ExecutionOptions`, or a path change for a layer already compacted."""
        if get_backend(plan.requested) is not self.backend:
            raise ValueError(
                f"this state ran with execution={plan.requested!r}; build the sparsifier with "
                f"execution={plan.requested!r} to continue it (now {self.backend.name!r})"
            )
        if set(plan.layers) != set(self.layers):
            diff = sorted(set(plan.layers) ^ set(self.layers))
            raise ValueError(f"the execution plan is for other layers than this model's (differing: {diff[:5]})")
        for name, theirs, mine in plan.options.differences(self.options):
            raise ValueError(f"the execution plan was made with {name}={theirs}; this sparsifier has {name}={mine}")
        foreign = sorted(set(plan.stems) - set(self.stems))
        if foreign:
            raise ValueError(
                f"the execution plan recomputes dense layers this model has no cheap convolution for: {foreign[:4]} "
                f"(allowed: {sorted(self.stems)})"
            )
        if self.plan is not None:
            changed = [n for n, lp in plan.layers.items() if lp != self.plan.layers[n]]
            stuck = [n for n in changed if self.plan.layers[n].compact or plan.layers[n].compact]
            if stuck:
                raise ValueError(
                    f"layers {stuck[:4]} were compacted under another plan already; build the sparsifier "
                    "without example_inputs when loading a saved plan, so that the plan is applied first"
                )

    def apply(self, plan: ExecutionPlan) -> ExecutionPlan:
        """Run ``plan`` from now on, without timing (a resumed run, or a plan made elsewhere); :meth:`check` first."""
        self.check(plan)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for n, lp in plan.layers.items():
            self.layers[n].fix_backend(lp.backend)
        named = plan.layers.items()
        recompute = {n for n, lp in named if lp.recompute} | set(plan.stems)
        return self._finish(plan.layout, {n for n, lp in named if lp.compact}, recompute)

    def remove(self) -> None:
        """Hooks off and every swapped layer back to a plain ``torch.nn`` layer with its dense weight."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._set_layout(None)
        if self.memory is not None:
            self.memory.remove()
            self.memory = None
        if self._pools:
            compact_pools(self.model, undo=True)
            self._pools = 0
        restore_plain(self.model)
        self.layers = {}
