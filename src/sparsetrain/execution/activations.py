"""Activation modules and swapping them in a model.

:class:`BitReLU` is an exact ReLU whose backward keeps one bit per element (where the
input was positive) instead of the float output PyTorch's ReLU saves: a lossless cut
of activation memory. :func:`replace_activations` swaps activation modules of any
model in place (the zoo's models hold their activations as modules for this).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from . import native

__all__ = ["BitReLU", "replace_activations"]


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


class BitReLU(nn.Module):
    """ReLU that saves a packed bitmask for backward (1/32 of the float output it replaces).

    ``inplace`` overwrites the input, as ``nn.ReLU(inplace=True)`` does: no fresh output tensor
    to allocate and fault in, which costs about as much as the ReLU itself on large maps.
    """

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def forward(self, x):
        return _BitReLUFn.apply(x, self.inplace)

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""


def replace_activations(model: nn.Module, kind: type[nn.Module], factory: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every submodule of exactly type ``kind`` by ``factory(old)``, in place; return how many."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children() if type(child) is kind]
    for parent, name, child in targets:  # found first: a replacement may hold the old module inside it
        setattr(parent, name, factory(child))
    return len(targets)
