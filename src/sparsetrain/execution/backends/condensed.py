"""``condensed``: our C kernels for Linear layers (:mod:`sparsetrain.execution.native`, ``condensed.c``).

The kept weights are listed row by row (for a constant fan-in mask, ``[out, k]`` values and input indices), and
tokens are taken in blocks of 64, transposed in cache so that every kept weight is one vector multiply-add over
the block. Forward, input gradient and kept-weight gradient all cost nnz x tokens multiply-adds; the row lists
are rebuilt only when the mask changes. Any mask runs (constant fan-in keeps rows even); convolutions under it
take the ``direct`` kernels. Float32 on the CPU; elsewhere CSR.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ...core.masks import dense_from_values
from .. import native, ops
from .csr import csr_linear
from .registry import Backend, autocast_bf16, direct_ok, register

__all__ = ["Condensed", "CondensedStructure", "condensed_linear", "condensed_values_linear"]


class _Gather(torch.autograd.Function):
    """``flat[index]`` at distinct positions, read in memory order: ``index`` ascending, then ``order`` (the
    position of each read value in the result) applied to the few values read. Its backward writes the gradient
    into zeros without accumulating: PyTorch's indexing backward accumulates, 3-4 times slower over a weight's worth
    of positions, and reading or writing them out of memory order (a ``Conv1D``'s kept weights, listed by output)
    costs twice as much again."""

    @staticmethod
    def forward(ctx, flat, index, order):
        ctx.save_for_backward(index, order)
        ctx.numel = flat.numel()
        values = flat[index]
        return values if order is None else torch.empty_like(values).index_put_((order,), values)

    @staticmethod
    def backward(ctx, grad):
        index, order = ctx.saved_tensors
        return grad.new_zeros(ctx.numel).index_put_((index,), grad if order is None else grad[order]), None, None


@dataclass
class CondensedStructure:
    """The kept entries of a Linear weight [out, in], listed row by row in the values' order, as the condensed
    kernels read them: row pointers (int64) and each entry's input (int32), nothing else (compact layers keep
    only this beside their values: at 90% sparsity, 4 bytes per kept weight)."""

    shape: tuple[int, int]
    rows: tuple[torch.Tensor, torch.Tensor]  # row_ptr [out + 1], col [nnz]
    _index: torch.Tensor | None = None  # flat_index, cached for layers that gather from a dense weight every step
    _index_t: tuple | None = None  # the same positions in the transposed weight's memory, ascending (gather)

    @classmethod
    def from_mask(cls, mask2d: torch.Tensor) -> "CondensedStructure":
        n_rows, n_cols = mask2d.shape
        idx = mask2d.reshape(-1).nonzero().squeeze(1).cpu()
        row_ptr = torch.zeros(n_rows + 1, dtype=torch.int64)
        row_ptr[1:] = torch.bincount(idx // n_cols, minlength=n_rows).cumsum(0)
        return cls((n_rows, n_cols), (row_ptr, (idx % n_cols).to(torch.int32)))

    @property
    def flat_index(self) -> torch.Tensor:
        """Positions of the kept entries in the row-major weight, in the values' order (computed when asked)."""
        row_ptr, col = self.rows
        rows = torch.repeat_interleave(torch.arange(self.shape[0]), row_ptr.diff())
        return rows * self.shape[1] + col.long()

    def gather(self, weight: torch.Tensor) -> torch.Tensor:
        """The kept values of a dense ``weight``, in row order (differentiable). A transposed view of a contiguous
        tensor (a Hugging Face ``Conv1D``'s weight, seen as a Linear's) is read in its own memory: flattening the view
        would copy the whole weight every step, and its gradient would come back transposed, copied again."""
        if self._index is None:
            self._index = self.flat_index
        if weight.dim() == 2 and not weight.is_contiguous() and weight.t().is_contiguous():
            if self._index_t is None:
                rows, cols = self.shape
                in_memory = (self._index % cols) * rows + self._index // cols
                order = torch.argsort(in_memory)  # the kept entries in the transposed memory's order
                self._index_t = (in_memory[order], order)
            return _Gather.apply(weight.t().reshape(-1), *self._index_t)
        return _Gather.apply(weight.reshape(-1), self._index, None)

    def dense(self, values: torch.Tensor) -> torch.Tensor:
        """The matrix with ``values`` at the kept positions and zeros elsewhere."""
        return dense_from_values(values, self.flat_index, self.shape)


def condensed_values_linear(x, values, bias, structure: CondensedStructure) -> torch.Tensor:
    """Linear over the kept weights given as ``values`` (in the structure's row order), for ``x`` of any leading
    shape, through the ``sparsetrain::condensed_linear`` operator: their gradient comes back in the same compact
    form, so a layer may store nothing else."""
    flat = x.reshape(-1, x.shape[-1])
    # under bfloat16 autocast as a dense Linear there (input rounded, float32 sums, bfloat16 output); else float32
    flat = flat.to(torch.bfloat16 if autocast_bf16() else torch.float32)
    if _forward_only(flat):  # a few tokens, nothing to differentiate (inference at batch 1): rows split by thread
        out = native.condensed_forward_few(flat.t().contiguous(), values, bias, structure.rows, structure.shape[0]).t()
    else:
        out = ops.condensed_linear(flat, values, bias, *structure.rows, structure.shape[0])
    return out.reshape(*x.shape[:-1], structure.shape[0])


def _forward_only(flat: torch.Tensor, any_tokens: bool = False) -> bool:
    """Whether ``flat`` [T, in] takes the row-split forward (``native.condensed_forward_few``): real float32 data,
    gradients off, no compiler or exporter tracing (they take the operator), and at most ``native.FEW_TOKENS``
    tokens unless ``any_tokens`` (inputs that come with the tokens innermost already)."""
    return (
        (any_tokens or flat.shape[0] <= native.FEW_TOKENS)
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and flat.dtype == torch.float32
        and native.what_is_wrong(flat) is None
    )


def condensed_linear(x, weight, bias, structure: CondensedStructure):
    """Linear (float32 on the CPU, bfloat16 under bfloat16 autocast) computing only the kept weights in
    ``structure``, nnz x tokens multiply-adds through the condensed C kernels. ``weight`` is the dense weight, or
    (compact storage) just the kept values in the structure's row order."""
    values = weight if weight.dim() == 1 else structure.gather(weight)
    return condensed_values_linear(x, values, bias, structure)


@register
class Condensed(Backend):
    """The condensed Linear kernels; convolutions under it take the direct kernels."""

    name = "condensed"
    rank = 30
    summary = (
        "C kernels over the kept weights of Linear layers, rows of kept inputs (float32, CPU); convolutions direct"
    )
    compact = True
    conv_backend = "direct"

    def build_structure(self, mask: torch.Tensor, name: str) -> CondensedStructure:
        return CondensedStructure.from_mask(mask.reshape(mask.shape[0], -1))

    def path(self, layer: nn.Module, x: torch.Tensor) -> str:
        if isinstance(layer, nn.Conv2d):
            return self.conv_backend  # what its convolutions run
        return self.name if direct_ok(x, layer.weight) else "csr"

    def follows_autocast(self, layer: nn.Module, x: torch.Tensor) -> bool:
        return autocast_bf16()  # (its convolutions take the direct kernels: their path's backend answers for them)

    def run_linear(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if direct_ok(x, layer.weight):
            return condensed_linear(x, layer.weight, layer.bias, layer.structure(self.name))
        return csr_linear(x, layer.weight, layer.bias, layer.structure())
