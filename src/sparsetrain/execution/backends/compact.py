"""Memory-economic state: masked layers that store only their kept weights.

Under the ``direct`` backend a convolution, and under ``condensed`` a Linear layer, needs nothing of
its weight but the kept entries, and the kernels return the gradient of exactly those. :func:`compact_layers`
therefore replaces each such layer's dense weight by a parameter holding the kept values
alone, so the weight, its gradient and every optimizer state that follows it (momentum,
Adam's moments) shrink with the density. The mask stays in the MaskSet for accounting, checkpoints and updates:
when a method changes it (MEST's prune and grow), the layer re-lays its kept weights and
their optimizer state, grown weights starting at zero. State dicts still carry the dense
``weight``, so checkpoints, exports and ``sparsetrain eval`` see the plain model.

Under FSDP2 the ``values`` are sharded like any parameter (each rank holds a share of the kept weights, their
gradient and optimizer state) and gathered for the forward pass; the structure, a few bytes per kept weight, is
whole on every rank. Compact layers are made before ``fully_shard`` (``run.parallel=fsdp`` does so). A mask
change gathers the layer's values once, re-lays them and keeps this rank's share; the number of kept weights
must then stay the same (static, SET, RigL and MEST without the soft bound keep it).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core.sharding import Part, local, whole
from .channel import kept_channels
from .channel_pairs import ChannelBlock, InputChannelConv2d, _expand
from .condensed import CondensedStructure, condensed_linear
from .direct import DirectStructure, direct_conv2d
from .layers import _CONV1D_CLASSES, SparseConv2d, SparseLinear, _Conv1DExec
from .registry import BACKENDS, compact_layer, direct_ok

__all__ = ["CompactConv2d", "CompactLinear", "CompactConv1D", "CompactChannelConv2d", "compact_layers", "is_compact"]


class _CompactStorage:
    """What compact layers share: ``values`` as the only weight parameter, the dense weight rebuilt on demand,
    re-laying on a mask change, and state dicts that carry the dense ``weight``."""

    compact: DirectStructure | CondensedStructure

    @staticmethod
    def _to_kernel(t: torch.Tensor) -> torch.Tensor:
        """A weight-shaped tensor (weight, mask, gradient) in the layout the structure lists: the layer's own, except
        for a ``Conv1D`` (:class:`CompactConv1D`), whose structure is the Linear's it computes."""
        return t

    _from_kernel = _to_kernel  # (the inverse: the same for every layer but a Conv1D)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, rebuilt on demand (not a parameter; zeros where the mask is off)."""
        return self._from_kernel(self.compact.dense(whole(self.values.detach())))

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense tensor (zeros where masked)."""
        return self.weight

    def dense_grad(self) -> torch.Tensor | None:
        """The weight gradient as a dense tensor: the full one on a step that captured it (RigL's update steps),
        else that of the kept weights with zeros elsewhere; None before any backward."""
        captured = self.maskset.captured.get(self.mask_name)
        if captured is not None:
            return captured
        return None if self.values.grad is None else self._from_kernel(self.compact.dense(whole(self.values.grad)))

    @torch.no_grad()
    def remask(self, mask: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
        """Re-lay the kept weights (and the optimizer state that follows them) for a new mask: weights kept
        by both masks keep their values and state, newly grown ones start at zero with zero state."""
        new = self._structure_for(self._to_kernel(mask).contiguous())
        old_index, numel = self.compact.flat_index, math.prod(self.compact.shape)
        part = Part.of(self.values)
        if part is not None and new.flat_index.numel() != old_index.numel():
            raise ValueError(
                f"{self.mask_name}: under FSDP a compact layer keeps its number of weights, but this mask "
                f"change takes it from {old_index.numel()} to {new.flat_index.numel()} (MEST's soft bound "
                "grows first); train it with run.parallel=ddp or without sparsity.compact_state"
            )

        def relay(v: torch.Tensor) -> torch.Tensor:
            v = whole(v)
            dense = v.new_zeros(numel)
            dense[old_index] = v
            return dense[new.flat_index].clone()

        state = optimizer.state.get(self.values, {}) if optimizer is not None else {}
        for k, v in list(state.items()):
            if torch.is_tensor(v) and v.shape == self.values.shape:
                if part is None:
                    state[k] = relay(v)
                else:
                    local(v).copy_(part.rows_of(relay(v)))
        # a mask changed before the update (RigL): the step goes on with the gradient of the new kept weights,
        # grown ones included, as under masked dense; a change after it (MEST) leaves no gradient to keep
        captured = self.maskset.captured.get(self.mask_name)
        grad = None if captured is None else self._to_kernel(captured).reshape(-1)[new.flat_index].clone()
        if part is None:
            self.values.data = relay(self.values.detach())
            self.values.grad = grad
        else:
            local(self.values).copy_(part.rows_of(relay(self.values.detach())))
            self.values.grad = None if grad is None else part.wrap(part.rows_of(grad).clone())
        self.compact = new

    def _structure_for(self, mask: torch.Tensor):
        return BACKENDS[self.backend].build_structure(mask, self.mask_name)

    def _path(self, x: torch.Tensor) -> str:
        return self.backend  # fixed when the layer was compacted

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "values")
        destination[prefix + "weight"] = self.weight

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        if key in state_dict:
            dense = self._to_kernel(whole(state_dict.pop(key)))
            values = dense.reshape(-1)[self.compact.flat_index.to(local(self.values).device)]
            part = Part.of(self.values)
            state_dict[prefix + "values"] = values if part is None else part.wrap(part.rows_of(values))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@compact_layer("direct")
class CompactConv2d(_CompactStorage, SparseConv2d):
    """A convolution whose only weight parameter is ``values``, its kept weights (made by :func:`compact_layers`)."""

    @classmethod
    def fits(cls, layer: nn.Module) -> bool:
        """A plain swapped convolution whose kernels run here."""
        return type(layer) is SparseConv2d and direct_ok(layer.weight, layer.weight)

    def _run(self, x):
        return direct_conv2d(x, self.values, self.bias, self.compact, self.stride, self.padding, self.dilation)


@compact_layer("condensed")
class CompactLinear(_CompactStorage, SparseLinear):
    """A Linear whose only weight parameter is ``values``, its kept weights in row order (made by
    :func:`compact_layers` under the ``condensed`` backend)."""

    @classmethod
    def fits(cls, layer: nn.Module) -> bool:
        """A plain swapped Linear, or a swapped Hugging Face ``Conv1D`` (as the Linear it is), whose kernels run
        here."""
        swapped = type(layer) is SparseLinear or type(layer) in _CONV1D_CLASSES.values()
        return swapped and direct_ok(layer.weight, layer.weight)

    @classmethod
    def class_for(cls, layer: nn.Module) -> type:
        """The compact class ``layer`` becomes: this one, or for a ``Conv1D`` the compact class of its own class."""
        return _compact_conv1d_class(type(layer)) if isinstance(layer, _Conv1DExec) else cls

    def _run(self, x):
        return condensed_linear(x, self.values, self.bias, self.compact)


class CompactConv1D(_CompactStorage):
    """A Hugging Face ``Conv1D`` (``x @ W + b``, ``W`` [in, out]) storing only its kept weights, in the row order of
    the Linear it computes (``W.T``'s): the condensed kernels run it as they run a Linear, its gradient and AdamW's
    moments shrink with the density, and its state dict still carries the dense [in, out] ``weight``. Made per
    ``Conv1D`` class (:func:`_compact_conv1d_class`)."""

    @staticmethod
    def _to_kernel(t: torch.Tensor) -> torch.Tensor:
        return t.t()

    _from_kernel = _to_kernel

    def _run(self, x):
        return condensed_linear(x, self.values, self.bias, self.compact)


_COMPACT_CONV1D: dict[type, type] = {}


def _compact_conv1d_class(swapped: type) -> type:
    """The compact class of a swapped ``Conv1D`` class (one per class, so ``isinstance`` and pickling see one)."""
    if swapped not in _COMPACT_CONV1D:
        _COMPACT_CONV1D[swapped] = type("CompactConv1D", (CompactConv1D, swapped), {})
    return _COMPACT_CONV1D[swapped]


@compact_layer("channel")
class CompactChannelConv2d(_CompactStorage, InputChannelConv2d):
    """A channel-pruned convolution whose only weight parameter, ``values``, is its kept block (made by
    :func:`~sparsetrain.execution.compact_layers` under the ``channel`` backend)."""

    @classmethod
    def fits(cls, layer: nn.Module) -> bool:
        """Any swapped convolution (its kept block is a smaller dense one)."""
        return isinstance(layer, SparseConv2d)

    @staticmethod
    def block_of(layer: SparseConv2d, mask: torch.Tensor | None = None) -> ChannelBlock:
        """The block ``layer`` stores for ``mask`` (default: its current one)."""
        mask = layer.maskset.masks[layer.mask_name] if mask is None else mask
        source = getattr(layer, "source", None)
        cols = (
            source.structure("channel") if source is not None else torch.arange(layer.in_channels, device=mask.device)
        )
        return ChannelBlock.make(tuple(mask.shape), kept_channels(mask, layer.mask_name).to(cols.device), cols)

    def _structure_for(self, mask):
        return self.block_of(self, mask)

    def _run(self, x):
        blk = self.compact
        w = self.values.view(blk.rows.numel(), blk.cols.numel(), *self.kernel_size)
        bias = None if self.bias is None else self.bias.index_select(0, blk.rows)
        small = F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)
        return small if getattr(self, "shrink_out", False) else _expand(small, blk.rows, self.out_channels, self.bias)


def is_compact(m: nn.Module) -> bool:
    """Whether ``m`` stores only its kept weights (a compact layer)."""
    return isinstance(m, _CompactStorage)


def compact_layers(layers: dict[str, nn.Module], maskset, optimizer: torch.optim.Optimizer | None) -> list[str]:
    """Give every layer in ``layers`` (from :func:`~sparsetrain.execution.backends.apply_backend`) whose backend
    declares a compact class (:meth:`Backend.compact_class`) compact storage; returns the names compacted. The
    optimizer is pointed at the new parameters (its state for the old dense ones is dropped, unless it already has
    the kept values' shape: restored from a compact run)."""
    done = []
    for name, m in layers.items():
        cls = BACKENDS[m.backend].compact_class(m) if not is_compact(m) else None
        if cls is None:
            continue
        cls = cls.class_for(m) if hasattr(cls, "class_for") else cls
        structure = cls.block_of(m) if hasattr(cls, "block_of") else m.structure(m.backend)
        old = m._parameters.pop("weight")
        m.__class__ = cls
        m.compact = structure
        kept = m._to_kernel(old.detach()).reshape(-1)[structure.flat_index]
        m.register_parameter("values", nn.Parameter(kept.clone()))
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["params"] = [m.values if p is old else p for p in group["params"]]
            state = optimizer.state.pop(old, None)
            if state and all(v.shape == m.values.shape for v in state.values() if torch.is_tensor(v) and v.dim()):
                # state saved from a compact layer and restored into the dense one before compaction (a framework
                # that loads the optimizer before the callbacks run): it follows the values it was saved for
                optimizer.state[m.values] = state
        maskset.release(name, m)
        done.append(name)
    return done
