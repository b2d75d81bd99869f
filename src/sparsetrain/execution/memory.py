"""Lossless activation memory: the same numbers, fewer bytes kept for backward, for any method (and dense).

Most of a convolutional network's training memory is what the forward pass keeps for backward, and much of that is
kept only because PyTorch's modules keep whole float tensors. :class:`LosslessActivations` cuts it with three exact
savings (outputs and gradients bit-identical to plain training):

* ReLU keeps one bit per element (:class:`~sparsetrain.execution.activations.BitReLU`) instead of its float output;
* a 2x2 max-pool keeps one byte per output (:class:`~sparsetrain.execution.activations.CompactMaxPool2d`) instead
  of its input and int64 indices;
* the output of a ReLU that follows a BatchNorm in training is not kept by the layers that read it (the next
  convolution, a shortcut): it is recomputed in backward from the BatchNorm's input, which BatchNorm keeps anyway,
  with the same kernels (so the same bits). A convolution's own input then costs nothing extra.

The third works through :func:`torch.autograd.graph.saved_tensors_hooks` around the model's forward pass, so it
covers every layer type and backend alike; it costs one BatchNorm and ReLU pass per recomputed tensor in backward.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.accounting import observe_saved
from .activations import BitReLU, compact_pools, replace_activations

__all__ = ["LosslessActivations"]


def _key(t: torch.Tensor) -> tuple:
    """What identifies a tensor's value at this moment: its memory, view and version."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t._version)


class _Recompute:
    """What a layer keeps instead of a BatchNorm-ReLU output: the BatchNorm's input and module (and, while the
    forward pass runs, a weak reference to the output, so that memory reused by another tensor never matches)."""

    __slots__ = ("z", "bn", "out")

    def __init__(self, z: torch.Tensor, bn: nn.BatchNorm2d, out: torch.Tensor):
        self.z, self.bn, self.out = z, bn, weakref.ref(out)

    def value(self) -> torch.Tensor:
        bn = self.bn
        # the scale and shift it applied (a BatchNorm shrunk to a producer's kept channels says which: affine_for)
        weight, bias = bn.affine_for(self.z) if hasattr(bn, "affine_for") else (bn.weight, bn.bias)
        # training-mode statistics of the same input, without moving the running ones: the forward's exact output
        return torch.relu_(F.batch_norm(self.z, None, None, weight, bias, True, 0.0, bn.eps))


class LosslessActivations:
    """Apply the lossless activation savings to ``model`` (in place); :meth:`remove` undoes them.

    ReLU modules become :class:`BitReLU` (keeping ``inplace``), 2x2 max-pools :class:`CompactMaxPool2d`, and the
    outputs of ReLUs that follow BatchNorm are recomputed in backward instead of kept. Works with any backend and
    any method (the model's parameters are untouched)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.relus = replace_activations(model, nn.ReLU, lambda old: BitReLU(inplace=old.inplace))
        self.pools = compact_pools(model)
        self._bn_out: dict[int, tuple] = {}  # id of a BatchNorm output -> (weak reference to it, its input, module)
        self._recipes: dict[tuple, _Recompute] = {}
        self._context = None
        self._hooks = [
            model.register_forward_pre_hook(self._enter),
            model.register_forward_hook(self._exit, always_call=True),
        ]
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                self._hooks.append(m.register_forward_hook(self._after_bn))
            elif isinstance(m, BitReLU):
                self._hooks.append(m.register_forward_hook(self._after_relu))

    # the forward pass: note BatchNorm outputs, then ReLU outputs made from them
    def _enter(self, module, args):
        if module.training and torch.is_grad_enabled() and self._context is None:
            self._context = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._context.__enter__()

    def _exit(self, module, args, out):
        self._bn_out.clear()
        self._recipes.clear()
        if self._context is not None:
            context, self._context = self._context, None
            context.__exit__(None, None, None)

    def _after_bn(self, bn, args, out):
        if self._context is not None and bn.training and torch.is_tensor(out) and out.dim() == 4:
            self._bn_out[id(out)] = (weakref.ref(out), args[0], bn)

    def _after_relu(self, relu, args, out):
        # the ReLU's input, if it is a BatchNorm output of this pass (by identity: an in-place ReLU returns it)
        source = self._bn_out.get(id(args[0])) if self._context is not None else None
        if source is not None and source[0]() is args[0]:
            self._recipes[_key(out)] = _Recompute(source[1], source[2], out)

    def _pack(self, t: torch.Tensor):
        recipe = self._recipes.get(_key(t)) if t.dim() == 4 else None
        if recipe is not None and recipe.out() is None:  # that output is gone; this memory holds another tensor
            recipe = None
        observe_saved(recipe.z if recipe is not None else t)  # what is really kept (BatchNorm keeps z anyway)
        return recipe if recipe is not None else t

    @staticmethod
    def _unpack(packed):
        return packed.value() if isinstance(packed, _Recompute) else packed

    def remove(self) -> None:
        """Hooks off; ReLUs and max-pools back to PyTorch's modules."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        replace_activations(self.model, BitReLU, lambda old: nn.ReLU(inplace=old.inplace))
        compact_pools(self.model, undo=True)
