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
from .. import native

__all__ = [
    "Backend",
    "BACKENDS",
    "ExecutionRequest",
    "register",
    "get_backend",
    "not_supported_reasons",
    "check_execution",
    "sharding_reasons",
    "direct_ok",
]

BACKENDS: dict[str, "Backend"] = {}  # name -> backend, in registration order (the order messages list them in)


def direct_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The C kernels (direct, condensed) cover float32 on the CPU, and need the compiled library."""
    return x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu" and native.available()


@dataclass(frozen=True)
class ExecutionRequest:
    """What a configuration asks of execution: the method (its name for messages, its traits for decisions), the
    mask scheme, whether layers store only kept weights, whether channel cuts reach the next layer, and whether
    activations are kept for backward the lossless compact way (:mod:`sparsetrain.execution.memory`)."""

    method: str
    traits: MethodTraits
    scheme: str = "unstructured"
    compact_state: bool = False
    channel_both_sides: bool = False
    lossless_activations: bool = False


class Backend:
    """How masked Conv2d/Linear layers compute. Subclasses set the declarations and the two ``run`` methods."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    layer_types: ClassVar[tuple[type, ...]] = (nn.Linear, nn.Conv2d)  # others stay masked dense under it
    schemes: ClassVar[tuple[str, ...] | None] = None  # None: any mask shape
    compact: ClassVar[bool] = False  # layers may store only kept weights (methods whose traits allow it)
    compact_fixed_masks: ClassVar[bool] = False  # ... but only for masks that never change
    reads_dense_gradients: ClassVar[bool] = True  # runs methods that read the dense weight gradient (RigL)
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    layouts: ClassVar[tuple[str, ...]] = ("nchw", "channels_last")
    swaps_layers: ClassVar[bool] = True  # False: the layers stay as they are (masked dense)
    timed: ClassVar[bool] = False  # True: each layer's path is chosen by timing on a real batch (auto)
    own_layers: ClassVar[bool] = False  # runs the layers of a method that brings its own (SWAT)
    both_sides: ClassVar[bool] = False  # may cut a removed channel out of the next layer too
    shardable: ClassVar[bool] = True  # its layers can be sharded by FSDP2 (given compact state)
    conv_backend: ClassVar[str | None] = None  # the backend convolutions take under it (None: this one)

    def scheme_reasons(self, scheme: str) -> list[str]:
        """Why masks of ``scheme`` cannot run here (empty when they can)."""
        return []

    def prepare(self, mask: torch.Tensor, name: str, device: torch.device) -> None:
        """Refuse a layer's mask that this backend cannot run (raises ValueError naming the layer)."""

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


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: add one instance of ``cls`` to :data:`BACKENDS` under ``cls.name``."""
    BACKENDS[cls.name] = cls()
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
    """Every reason why ``backend`` cannot run the configuration ``req``, most basic first (empty: it can)."""
    b, t, m = get_backend(backend), req.traits, req.method
    reasons = []
    if b.swaps_layers and not t.masks:
        reasons.append(
            f"backend {b.name!r} runs masked layers sparse; method {m!r} has no masks "
            "(use static, lottery, set, rigl, mest or swat)"
        )
    if t.own_layers and not b.own_layers:
        reasons.append(
            f"method {m!r} runs under backend {_names(lambda o: o.own_layers)} (its convolutions on the "
            f"direct kernels), got {b.name!r}"
        )
    compact_ok = (b.compact and t.compactable) or (b.compact_fixed_masks and t.fixed_mask)
    if req.compact_state and not compact_ok:
        reasons.append(
            f"compact_state stores only kept weights under backend {_names(lambda o: o.compact)} (the "
            f"layers it puts on those) for methods static, set, rigl and mest (RigL's layers compute "
            f"their full weight gradient on its update steps only), or under "
            f"{_names(lambda o: o.compact_fixed_masks)} for static masks; got backend {b.name!r}, method {m!r}"
        )
    if t.masks and not t.own_layers:
        reasons += b.scheme_reasons(req.scheme)
    if req.channel_both_sides and not (b.both_sides and t.fixed_mask):
        reasons.append(
            f"channel_both_sides removes a filter's BatchNorm channel and the next layer's inputs for good: "
            f"it needs backend {_names(lambda o: o.both_sides)} and a static mask (static or lottery); got "
            f"backend {b.name!r}, method {m!r}"
        )
    return reasons


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
