"""The native kernels as PyTorch operators, under the ``sparsetrain`` namespace (``torch.ops.sparsetrain.*``).

Each operator is a :func:`torch.library.custom_op` with a fake implementation (its output shapes, from its inputs'
alone) and, for the forward operators, its backward registered with :meth:`register_autograd`. So PyTorch sees one
opaque operator where it used to see Python calling C: ``torch.compile`` puts it in its graph without a break (and
never hands the C code a tensor that holds no data: tracing runs the fake), ``torch.export`` keeps it in the
exported program, and the dispatcher runs the C kernels only on real CPU tensors. The C entry points stay in
:mod:`~sparsetrain.execution.native`; the operators take and return tensors only (a sparse structure is passed as
its index tensors).

Operators:

- ``sparsetrain::condensed_linear(x[T, in], values[nnz], bias?, row_ptr[out + 1], col[nnz], out_features)``:
  ``x @ W_s.T + bias`` for the kept weights ``values`` listed row by row (``condensed.c``); differentiable in
  ``x``, ``values`` and ``bias`` (the values' gradient comes back in the same compact order).
- ``sparsetrain::condensed_linear_backward(x, grad, values, row_ptr, col, input_grad, weight_grad)``: both
  gradients in one pass over the kept weights; a gradient not asked for comes back empty.
- ``sparsetrain::max_pool2(x)``: 2 x 2, stride-2 max-pooling in the input's layout, with one byte per output (the
  window position of its maximum) for the backward, ``sparsetrain::max_pool2_backward(grad, where, shape)``
  (``compact_pool.c``; :class:`~sparsetrain.execution.activations.CompactMaxPool2d` runs it).

The direct convolution operators (``sparsetrain::direct_conv2d`` and its backward) are registered beside the code
that chooses their paths, in :mod:`sparsetrain.execution.backends.direct`; SWAT's (``swat_refresh``, ``swat_conv2d``,
``swat_direct_conv2d``, ``swat_linear`` and their backward) in :mod:`sparsetrain.execution.backends.swat`.
"""

import torch
from torch import Tensor

from . import native

# (no ``from __future__ import annotations`` here: custom_op reads the operators' schemas from live annotations)

__all__ = ["condensed_linear", "condensed_linear_backward", "max_pool2", "max_pool2_backward"]


@torch.library.custom_op("sparsetrain::condensed_linear", mutates_args=(), device_types="cpu")
def condensed_linear(
    x: Tensor, values: Tensor, bias: Tensor | None, row_ptr: Tensor, col: Tensor, out_features: int
) -> Tensor:
    """``x [T, in] @ W_s.T + bias``, nnz x T multiply-adds, for the kept weights ``values`` of a sparse ``W_s``
    listed row by row (``row_ptr`` int64 [out + 1], ``col`` int32 [nnz]). ``x`` float32, or bfloat16 where
    ``native.bf16_kernels()`` (the output then bfloat16; ``values`` and ``bias`` are float32 either way, and so is
    the values' gradient)."""
    return native.condensed_forward(x.contiguous(), values.contiguous(), bias, (row_ptr, col), out_features)


@condensed_linear.register_fake
def _condensed_linear_fake(x, values, bias, row_ptr, col, out_features):
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("sparsetrain::condensed_linear_backward", mutates_args=(), device_types="cpu")
def condensed_linear_backward(
    x: Tensor, grad: Tensor, values: Tensor, row_ptr: Tensor, col: Tensor, input_grad: bool, weight_grad: bool
) -> tuple[Tensor, Tensor]:
    """The gradients of :func:`condensed_linear` for ``x`` ([T, in]) and for the kept weights ([nnz], in their
    row order), each computed only when asked for (an empty tensor otherwise)."""
    gx, gv = native.condensed_backward(
        x.contiguous(), grad.contiguous(), values, (row_ptr, col), input_grad, weight_grad
    )
    return (gx if gx is not None else x.new_empty(0), gv if gv is not None else values.new_empty(0))


@condensed_linear_backward.register_fake
def _condensed_linear_backward_fake(x, grad, values, row_ptr, col, input_grad, weight_grad):
    return (x.new_empty(x.shape if input_grad else (0,)), values.new_empty(values.shape if weight_grad else (0,)))


def _condensed_setup(ctx, inputs, output) -> None:
    x, values, bias, row_ptr, col, _ = inputs
    ctx.save_for_backward(x, values, row_ptr, col)
    ctx.has_bias = bias is not None


def _condensed_backward(ctx, grad):
    x, values, row_ptr, col = ctx.saved_tensors
    need_x, need_v, need_b = ctx.needs_input_grad[:3]
    grad = grad.to(x.dtype)  # (the gradient of a bfloat16 output is bfloat16 unless a caller changed it)
    gx, gv = condensed_linear_backward(x, grad, values, row_ptr, col, need_x, need_v)
    gb = grad.sum(0) if ctx.has_bias and need_b else None  # (in grad's dtype: 7x faster than a float32 sum of bf16)
    return gx if need_x else None, gv if need_v else None, gb, None, None, None


condensed_linear.register_autograd(_condensed_backward, setup_context=_condensed_setup)
# (no autocast rule: the operator computes in its input's dtype, float32 or bfloat16, and its callers choose that
# dtype, as condensed_values_linear does under autocast)


@torch.library.custom_op("sparsetrain::max_pool2", mutates_args=(), device_types="cpu")
def max_pool2(x: Tensor) -> tuple[Tensor, Tensor]:
    """2 x 2, stride-2 max-pooling of a float32 ``x`` [N, C, H, W] in its layout (NCHW or channels-last): the output
    and, per output, where in its window the maximum was (uint8, 0-3 row-major; ties and NaNs as PyTorch's)."""
    return native.max_pool2(x)


def _pooled(x: Tensor, dtype: torch.dtype) -> Tensor:
    n, c, h, w = x.shape
    return torch.empty((n, c, h // 2, w // 2), dtype=dtype, memory_format=native.pool_layout(x))


@max_pool2.register_fake
def _max_pool2_fake(x):
    return _pooled(x, x.dtype), _pooled(x, torch.uint8)


@torch.library.custom_op("sparsetrain::max_pool2_backward", mutates_args=(), device_types="cpu")
def max_pool2_backward(grad: Tensor, where: Tensor, shape: list[int]) -> Tensor:
    """The input gradient of :func:`max_pool2` (input ``shape``, in the layout of ``where``): ``grad`` at each
    window's maximum, zero elsewhere."""
    return native.max_pool2_grad(grad, where, tuple(shape))


@max_pool2_backward.register_fake
def _max_pool2_backward_fake(grad, where, shape):
    return torch.empty(shape, dtype=grad.dtype, memory_format=native.pool_layout(where))


def _pool_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1])
    ctx.shape = list(inputs[0].shape)


def _pool_backward(ctx, grad, _where_grad):
    (where,) = ctx.saved_tensors
    return max_pool2_backward(grad, where, ctx.shape)


max_pool2.register_autograd(_pool_backward, setup_context=_pool_setup)
