"""The backend contract and its registry: each backend is a small class that says what it supports and why not.

A backend declares the layer types it computes, the mask schemes it needs, whether it can store only the kept
weights (and for which methods), whether it runs a method's own layers (SWAT's), whether it may cut channels on
both sides, and whether its layers can be sharded. :func:`not_supported_reasons` asks those declarations for a
whole configuration (method, scheme, compact state); the configuration, the factories and the planner all refuse
through it, so what combines is said once, by the backends themselves. No code outside this package compares
backend names: it asks a backend object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core.lifecycle import MethodTraits
from ...core.masks import is_conv1d
from .. import native
from ..options import ExecutionOptions

__all__ = [
    "Backend",
    "BACKENDS",
    "ExecutionRequest",
    "register",
    "compact_layer",
    "COMPACT_LAYERS",
    "get_backend",
    "not_supported_reasons",
    "layout_of",
    "channels_last",
    "kind_of",
    "check_execution",
    "sharding_reasons",
    "direct_ok",
    "autocast_bf16",
]

BACKENDS: dict[str, "Backend"] = {}  # name -> backend, in registration order (the order messages list them in)


def direct_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The C kernels (direct, condensed) cover float32 on the CPU, and need the compiled library; under CPU
    autocast a lower-precision input is theirs too (their layers cast it to the dtype they compute in)."""
    low = x.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled("cpu")
    return (
        (x.dtype == torch.float32 or low)
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and (native.available())
    )


def autocast_bf16() -> bool:
    """Whether the kernels' bfloat16 paths run now: CPU autocast to bfloat16 is on and this build has them
    (``native.bf16_kernels``); a layer that takes them computes in bfloat16 as a dense one would under autocast."""
    return (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16 and native.bf16_kernels()
    )


@dataclass(frozen=True)
class ExecutionRequest:
    """What a configuration asks of execution: the method (its name for messages, its traits for decisions), the
    mask scheme, and the :class:`~sparsetrain.execution.options.ExecutionOptions`."""

    method: str
    traits: MethodTraits
    scheme: str = "unstructured"
    options: ExecutionOptions = ExecutionOptions()


class Backend:
    """How masked Conv2d/Linear layers compute. Subclasses set the declarations and the ``run`` methods; this base
    class judges every declaration itself (:meth:`not_supported_reasons`, :meth:`candidate`), so a backend is one
    class: its declarations, how it builds the structure its kernels read, its compact layer, and its paths."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    layer_types: ClassVar[tuple[type, ...]] = (nn.Linear, nn.Conv2d)  # others stay masked dense under it
    schemes: ClassVar[tuple[str, ...] | None] = None  # None: any mask shape
    schemes_doc: ClassVar[str] = ""  # the masks ``schemes`` admit, in words (for refusals)
    compact: ClassVar[bool] = False  # layers may store only kept weights (methods whose traits allow it)
    compact_fixed_masks: ClassVar[bool] = False  # ... but only for masks that never change
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    layouts: ClassVar[tuple[str, ...]] = ("nchw", "channels_last")
    swaps_layers: ClassVar[bool] = True  # False: the layers stay as they are (masked dense)
    timed: ClassVar[bool] = False  # True: each layer's path is chosen by timing on a real batch (auto)
    own_layers: ClassVar[bool] = False  # runs the layers of a method that brings its own (SWAT)
    both_sides: ClassVar[bool] = False  # may cut a removed channel out of the next layer too
    shardable: ClassVar[bool] = True  # its layers can be sharded by FSDP2 (given compact state)
    conv_backend: ClassVar[str | None] = None  # the backend convolutions take under it (None: this one)
    retry_near_ties: ClassVar[bool] = False  # auto also times the whole step with near-tie layers on this path
    rank: ClassVar[int] = 50  # where it stands in the registry (messages and auto list backends in this order)

    def follows_autocast(self, layer: nn.Module, x: torch.Tensor) -> bool:
        """Whether ``layer`` computes ``x`` in the dtype CPU autocast asks for now (its kernels have that path, in
        this build); otherwise it computes in float32 (said once)."""
        return False

    # ------------------------------------------------------------------ what it supports, judged here
    def not_supported_reasons(self, req: ExecutionRequest) -> list[str]:
        """Every reason why this backend cannot run the configuration ``req``, most basic first (empty: it can)."""
        t, m = req.traits, req.method
        reasons = []
        if self.swaps_layers and not t.masks:
            reasons.append(
                f"backend {self.name!r} runs masked layers sparse; method {m!r} has no masks "
                "(use static, lottery, set, rigl, mest or swat)"
            )
        if t.own_layers and not self.own_layers:
            reasons.append(
                f"method {m!r} runs under backend {_names(lambda o: o.own_layers)} (its convolutions on the "
                f"direct kernels), got {self.name!r}"
            )
        compact_ok = (self.compact and t.compactable) or (self.compact_fixed_masks and t.fixed_mask)
        if req.options.compact_state and not compact_ok:
            reasons.append(
                f"compact_state stores only kept weights under backend {_names(lambda o: o.compact)} (the "
                f"layers it puts on those) for methods static, set, rigl and mest (RigL's layers compute "
                f"their full weight gradient on its update steps only), or under "
                f"{_names(lambda o: o.compact_fixed_masks)} for static masks; got backend {self.name!r}, method {m!r}"
            )
        if t.masks and not t.own_layers and self.schemes is not None and req.scheme not in self.schemes:
            reasons.append(
                f"backend {self.name!r} runs {self.schemes_doc}; set sparsity.scheme={' or '.join(self.schemes)} "
                f"(got {req.scheme!r})"
            )
        if req.options.channel_both_sides and not (self.both_sides and t.fixed_mask):
            reasons.append(
                f"channel_both_sides removes a filter's BatchNorm channel and the next layer's inputs for good: "
                f"it needs backend {_names(lambda o: o.both_sides)} and a static mask (static or lottery); got "
                f"backend {self.name!r}, method {m!r}"
            )
        return reasons

    def layer_reasons(self, layer: nn.Module, mask: torch.Tensor, name: str) -> list[str]:
        """Why this backend cannot run ``layer`` (weight ``name``, mask ``mask``) where the layer lives: its type,
        its device, or its mask (:meth:`prepare`)."""
        if not issubclass(kind_of(layer), self.layer_types):
            return [f"{name}: backend {self.name!r} runs {', '.join(t.__name__ for t in self.layer_types)} layers"]
        device = mask.device.type
        if device not in self.devices:
            return [f"backend {self.name!r} cannot run here: the model is on {device}; it runs on {self.devices}"]
        try:
            self.prepare(mask, name, mask.device)
        except ValueError as e:
            return [str(e)]
        return []

    def candidate(self, layer: nn.Module, x: torch.Tensor) -> bool:
        """Whether ``auto`` should time this backend's own path for ``layer`` on input ``x``: it swaps layers, takes
        this layer type on this device and layout, runs its own path for ``x`` (not a fallback) and the mask."""
        if self.timed or not self.swaps_layers or not issubclass(kind_of(layer), self.layer_types):
            return False
        if x.device.type not in self.devices or layout_of(x) not in self.layouts or self.path(layer, x) != self.name:
            return False
        mask = layer.maskset.masks[layer.mask_name]
        return not self.layer_reasons(layer, mask.t() if is_conv1d(layer) else mask, layer.mask_name)

    # ------------------------------------------------------------------ what it builds
    def prepare(self, mask: torch.Tensor, name: str, device: torch.device) -> None:
        """Refuse a layer's mask that this backend cannot run (raises ValueError naming the layer)."""

    def build_structure(self, mask: torch.Tensor, name: str):
        """The structure this backend's kernels read for ``mask`` (layers cache it until the mask changes)."""
        raise NotImplementedError(f"backend {self.name!r} reads no structure")

    def compact_class(self, layer: nn.Module) -> type | None:
        """The class a layer on this backend becomes when it stores only its kept weights (None: it cannot): the
        compact layer registered for this backend (:func:`compact_layer`), where it fits the layer."""
        cls = COMPACT_LAYERS.get(self.name)
        return cls if cls is not None and cls.fits(layer) else None

    # ------------------------------------------------------------------ how it computes
    def path(self, layer: nn.Module, x: torch.Tensor) -> str:
        """The name of the path ``layer`` really takes for ``x`` (a fallback shows here)."""
        return self.name

    def run_linear(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The layer's output for ``x``; the MaskSet keeps masked weights at zero (masked dense)."""
        return F.linear(x, layer.weight, layer.bias)

    def run_conv(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The convolution's output for ``x`` (masked dense unless a backend does better)."""
        return F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)

    def __repr__(self) -> str:
        return f"<backend {self.name!r}: {self.summary}>"


def kind_of(layer) -> type:
    """The layer type a backend's ``layer_types`` judge ``layer`` by: a Hugging Face ``Conv1D`` counts as the
    ``nn.Linear`` it computes (its weight transposed)."""
    return nn.Linear if is_conv1d(layer) else type(layer)


def channels_last(x: torch.Tensor) -> bool:
    """Whether a 4-D tensor is laid out channels-last. A tensor that is both that and plainly contiguous (one
    channel, or a 1 x 1 map) counts by its strides, as PyTorch reads a weight made channels-last: the channel's
    stride below the row's."""
    return (
        x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and (not x.is_contiguous() or x.stride(1) < x.stride(2))
    )


def layout_of(x: torch.Tensor) -> str:
    """``"channels_last"`` or ``"nchw"``: the layout of ``x`` by the names backends declare."""
    return "channels_last" if channels_last(x) else "nchw"


COMPACT_LAYERS: dict[str, type] = {}  # backend name -> the layer class its layers become under compact_state


def compact_layer(backend: str):
    """Class decorator: ``cls`` is what layers on ``backend`` become when they store only their kept weights (it has
    a classmethod ``fits(layer)``)."""

    def put(cls: type) -> type:
        COMPACT_LAYERS[backend] = cls
        return cls

    return put


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: add one instance of ``cls`` to :data:`BACKENDS` under ``cls.name``, in ``rank`` order."""
    BACKENDS[cls.name] = cls()
    ordered = sorted(BACKENDS.items(), key=lambda item: item[1].rank)
    BACKENDS.clear()
    BACKENDS.update(ordered)
    return cls


def get_backend(name: "str | Backend") -> Backend:
    """The backend called ``name``, or a ValueError listing the names allowed."""
    if isinstance(name, Backend):
        return name
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {list(BACKENDS)}")
    return BACKENDS[name]


def _names(pick) -> str:
    names = [f"'{n}'" for n, b in BACKENDS.items() if pick(b)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def not_supported_reasons(backend: "str | Backend", req: ExecutionRequest) -> list[str]:
    """Every reason why ``backend`` cannot run the configuration ``req`` (:meth:`Backend.not_supported_reasons`)."""
    return get_backend(backend).not_supported_reasons(req)


def check_execution(backend: "str | Backend", req: ExecutionRequest) -> Backend:
    """The backend, or a ValueError with the first reason it cannot run ``req``."""
    b = get_backend(backend)
    reasons = not_supported_reasons(b, req)
    if reasons:
        raise ValueError(reasons[0])
    return b


def sharding_reasons(backend: "str | Backend", compact_state: bool) -> list[str]:
    """Why ``backend`` cannot run on weights sharded by FSDP2 (empty when it can)."""
    b = get_backend(backend)
    reasons = []
    if b.swaps_layers and not compact_state:
        reasons.append(
            f"sparsity.backend={b.name!r} reads whole masks in its layers, but a sharded rank holds "
            "only its rows of them; use sparsity.backend=masked, or compact_state=true, whose layers "
            "shard their kept weights"
        )
    if not b.shardable:
        reasons.append(
            f"backend {b.name!r} traces chains of whole layers (and re-expands whole outputs); it is not "
            "sharded; use run.parallel=ddp"
        )
    return reasons
