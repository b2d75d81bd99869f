"""Activation modules and swapping them in a model.

:class:`BitReLU` is an exact ReLU whose backward keeps one bit per element (where the
input was positive) instead of the float output PyTorch's ReLU saves: a lossless cut
of activation memory. :class:`CompactMaxPool2d` is an exact 2x2, stride-2 max-pool whose backward keeps one
byte per output (where in its window the maximum was) instead of the input and int64 indices PyTorch's keeps.
:func:`replace_activations` swaps activation modules of any model in place (the zoo's models hold their
activations as modules for this); :func:`compact_pools` swaps the max-pools it can.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from . import native
from .ops import max_pool2

__all__ = ["BitReLU", "CompactMaxPool2d", "compact_pools", "replace_activations"]


class _BitReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, inplace):
        from .bits import flat_view, pack_bits, unflat

        flat, cl = flat_view(x.detach())
        ctx.conf = (tuple(x.shape), cl)
        if inplace:
            ctx.mark_dirty(x)
        if native.available(flat):
            out, packed = native.relu_bits(flat, out=flat if inplace else None)
            ctx.save_for_backward(packed)
            return x if inplace else unflat(out, tuple(x.shape), cl)
        ctx.save_for_backward(pack_bits(flat > 0))
        return torch.relu_(x) if inplace else torch.relu(x)

    @staticmethod
    def backward(ctx, grad):
        from .bits import flat_view, unflat, unpack_bits

        (packed,) = ctx.saved_tensors
        shape, cl = ctx.conf
        # the gradient in the layout of the saved bits (a pooled or summed gradient may arrive NCHW):
        # one copy here keeps every layer below in the model's layout
        gflat, _ = flat_view(grad.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format))
        if native.available(gflat):
            return unflat(native.relu_grad(gflat, packed), shape, cl), None
        positive = unflat(unpack_bits(packed, math.prod(shape)), shape, cl).to(grad.device)
        return grad * positive, None


def holds_data(x: torch.Tensor) -> bool:
    """Whether ``x`` is a real CPU tensor the kernels can read (not one a compiler, an exporter or ``torch.func``
    traces with): the compact activations fall back to the plain operation, which computes the same, otherwise.
    Under ``torch.compile`` :class:`BitReLU` is the plain ReLU (the compiler fuses it with its neighbours and
    chooses itself what to keep for backward); :class:`CompactMaxPool2d` runs as its operator there."""
    return not torch.compiler.is_compiling() and native.what_is_wrong(x, cpu=False) is None


class BitReLU(nn.Module):
    """ReLU that saves a packed bitmask for backward (1/32 of the float output it replaces).

    ``inplace`` overwrites the input, as ``nn.ReLU(inplace=True)`` does: no fresh output tensor
    to allocate and fault in, which costs about as much as the ReLU itself on large maps.
    """

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def forward(self, x):
        if not holds_data(x):  # traced or transformed: the plain ReLU computes the same
            return F.relu(x, inplace=self.inplace)
        return _BitReLUFn.apply(x, self.inplace)

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""


class CompactMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d(2)`` that saves one byte per output for backward (the window position of its maximum)
    instead of its input and int64 indices: 1/24 of their bytes, the same outputs and gradients (ties and NaNs
    resolved as PyTorch does). Float32 4-D inputs on the CPU take the compact kernel (``native.max_pool2``);
    anything else runs PyTorch's max-pool."""

    def __init__(self):
        super().__init__(2, 2)

    @staticmethod
    def _ours(x: torch.Tensor) -> bool:
        """Whether the compact kernel takes ``x``: float32 4-D on the CPU, the kernels built, and either real data
        or ``torch.compile`` tracing (the operator's fake gives the shapes; other transforms run PyTorch's)."""
        return (
            (holds_data(x) or torch.compiler.is_compiling())
            and x.dim() == 4
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and native.available()
        )

    def forward(self, x):
        if not self._ours(x):
            return super().forward(x)  # PyTorch's own
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # inference (and evaluation passes): the same kernel, several times faster than PyTorch's pool with
            # indices on the CPU (VGG-16, batch 64: 22 ms a forward in PyTorch's five pools), no positions kept
            return native.max_pool2(x, positions=False)[0]
        return max_pool2(x)[0]  # under torch.compile too: one operator, its backward registered


def _pools_2x2(m: nn.Module) -> bool:
    """A max-pool that :class:`CompactMaxPool2d` computes exactly: 2x2 windows, stride 2, no padding or dilation."""
    return (
        type(m) is nn.MaxPool2d
        and _pair(m.kernel_size) == (2, 2)
        and _pair(m.stride or m.kernel_size) == (2, 2)
        and _pair(m.padding) == (0, 0)
        and _pair(m.dilation) == (1, 1)
        and not m.ceil_mode
        and not m.return_indices
    )


def compact_pools(model: nn.Module, undo: bool = False) -> int:
    """Swap every 2x2, stride-2 ``nn.MaxPool2d`` of ``model`` for a :class:`CompactMaxPool2d` (``undo``: back);
    returns how many."""
    if undo:
        return replace_activations(model, CompactMaxPool2d, lambda old: nn.MaxPool2d(2, 2))
    targets = [
        (parent, name) for parent in model.modules() for name, child in parent.named_children() if _pools_2x2(child)
    ]
    for parent, name in targets:
        setattr(parent, name, CompactMaxPool2d())
    return len(targets)


def replace_activations(model: nn.Module, kind: type[nn.Module], factory: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every submodule of exactly type ``kind`` by ``factory(old)``, in place; return how many."""
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is kind
    ]
    for parent, name, child in targets:  # found first: a replacement may hold the old module inside it
        setattr(parent, name, factory(child))
    return len(targets)
