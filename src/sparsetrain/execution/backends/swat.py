"""SWAT (Raihan & Aamodt, NeurIPS 2020): sparse weights in both passes, sparse activations in backward.

For each converted Conv2d/Linear:

* forward uses W_s, the top-K magnitude weights of the whole tensor (or, structured, the
  top kernels/channels by L1 norm);
* the layer input x is cut to its top-K magnitudes and saved for backward *compressed*
  (a bitmask of the kept positions plus their values), so the memory saving is real;
* backward computes dx from W_s and the dense output gradient, and dW from the sparse
  saved input and the dense output gradient. dW is dense: the update reaches every weight, so
  pruned weights can return. Where the kept share of the input is at most
  :data:`COMPRESSED_WGRAD_MAX_DENSITY` (float32 on the CPU, a channels-last or Linear input, whole blocks of
  64 output channels at stride 1; a 1 x 1 kernel only on small maps, :data:`POINTWISE_WGRAD_LIMIT`), dW is
  computed from the bitmask and values directly
  (``native.compressed_weight_grad``: work in proportion to the kept inputs, the dense input never rebuilt);
  otherwise the input is rebuilt and one ``aten.convolution_backward`` call (two matrix products for Linear)
  computes both gradients.

Thresholds are exact top-K values recomputed every ``topk_period`` training forward
passes and reused in between, held in module buffers (so they are checkpointed).

Each of these steps is a ``torch.library`` operator (``torch.ops.sparsetrain.swat_*``: the refresh, each product and
its backward), so ``torch.compile`` keeps a SWAT model in one graph, the saved input's data-dependent size a
dynamic one.
Bias, BatchNorm and whatever BN/ReLU save stay as they are.

Under sharded training (FSDP2 on the blocks that contain these layers, or on the model) the forward pass
sees the whole weight, so every rank computes the same thresholds; outside it the weight is this rank's
rows, and :meth:`current_mask` is laid out the same way.

Execution: under ``backend="masked"`` (the default) the forward pass and the input gradient are dense products
on W_s in whatever layout the model runs. Under ``"direct"`` or ``"auto"`` a convolution keeping at most
:data:`DIRECT_MAX_DENSITY` of its weights runs them on the direct sparse kernels instead
(:mod:`sparsetrain.execution.backends.direct`), in the layout its input comes in (channels-last or NCHW): W_s is
listed every step from the period's threshold (two passes over the weight, in C), the forward pass and the input
gradient cost the kept weights only, and dW comes from the compressed input in the same memory order. ``"auto"``
keeps the kernels only where the whole step is faster than dense products on W_s
(:func:`~sparsetrain.execution.backends.auto.settle_layout`).

``convert(model, ...)`` swaps layers in place (same parameter objects, so an existing
optimizer keeps working); ``revert`` swaps them back; ``harden`` writes W_s into the
weights for export as a plain sparse model.
"""

from __future__ import annotations

import math
import threading
from typing import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

from ...core.schemes import parse_scheme
from ...core.sharding import Part, local, sum_over_ranks, whole
from .. import native
from ..bits import flat_view, numpy_ok, pack_bits, unflat, unpack_bits
from .direct import (
    DirectStructure,
    _direct_conv2d_fake,
    _lists_fake,
    channels_last,
    direct_forward,
    direct_input_grad,
)
from .registry import BACKENDS

__all__ = [
    "COMPRESSED_WGRAD_MAX_DENSITY",
    "DIRECT_MAX_DENSITY",
    "swat_backends",
    "swat_backend",
    "SWATConv2d",
    "SWATLinear",
    "convert",
    "revert",
    "harden",
    "swat_layers",
    "SWAT_BUFFERS",
    "swat_conv2d",
    "swat_linear",
    "topk_threshold",
    "threshold_and_share",
]


def topk_threshold(t: torch.Tensor, density: float) -> torch.Tensor:
    """The magnitude of the k-th largest entry, k = ceil(density * numel): |t| >= it keeps the top K."""
    return threshold_and_share(t, density)[0]


def threshold_and_share(t: torch.Tensor, density: float) -> tuple[torch.Tensor, float]:
    """(:func:`topk_threshold`, the share of entries that reach it: the density plus ties)."""
    flat, _ = flat_view(t.detach())
    n = flat.numel()
    k = max(1, min(n, math.ceil(density * n)))
    if k == n:
        return flat.new_zeros(()), 1.0
    if native.available(flat):  # radix select: a few passes over memory instead of a selection sort
        thr, count = native.kth_largest_abs(flat, k)
    else:
        thr = float(torch.kthvalue(flat.abs().float(), n - k + 1).values)
        count = int((flat.abs() >= thr).sum())
    if thr == 0:
        # fewer than k nonzeros (e.g. a ReLU output after removed channels): the threshold is the
        # smallest nonzero magnitude, so only the nonzeros are stored and counted as kept
        nonzero = flat[flat != 0].abs()
        thr = float(nonzero.min()) if nonzero.numel() else float(torch.finfo(t.dtype).tiny)
        count = nonzero.numel()
    return torch.tensor(thr, dtype=t.dtype, device=t.device), count / n


def _compress(x: torch.Tensor, a_thresh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The entries with |x| >= a_thresh: a bitmask of their positions and their values (memory order)."""
    flat, cl = flat_view(x.detach())
    if native.available(flat):
        packed, values = native.compress(flat, float(a_thresh))
        return packed, values, cl
    keep = flat.abs() >= a_thresh
    if numpy_ok(flat):
        values = torch.from_numpy(flat.numpy()[keep.numpy()])
    else:
        values = flat.masked_select(keep)
    return pack_bits(keep), values, cl


def _decompress(packed: torch.Tensor, values: torch.Tensor, shape, channels_last: bool) -> torch.Tensor:
    numel = math.prod(shape)
    if native.available(values):
        return unflat(native.decompress(packed, values, numel, _scratch(numel)), shape, channels_last)
    keep = unpack_bits(packed, numel)
    if numpy_ok(values):
        out = np.zeros(numel, dtype=values.numpy().dtype)
        out[keep.numpy()] = values.numpy()
        flat = torch.from_numpy(out)
    else:
        flat = torch.zeros(numel, dtype=values.dtype, device=values.device).masked_scatter_(
            keep.to(values.device), values
        )
    return unflat(flat, shape, channels_last)


_local = threading.local()


def _scratch(numel: int) -> torch.Tensor:
    """A reused float32 buffer for the input rebuilt in backward (used only until the layer's backward returns).

    Backward visits layers one at a time per thread, so one buffer per thread suffices; reusing
    it spares the page faults of a fresh allocation, which cost as much as the rebuild itself.
    """
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _local.buf = torch.empty(numel, dtype=torch.float32)
    return buf[:numel]


# Above this kept share of a layer's input, rebuilding the input and running the dense weight-gradient product
# is faster than the compressed kernel (measured on VGG-16's shapes, batch 128, one core: the kernel takes
# 0.39-0.13 of the rebuild-and-dense time at 5% kept, 0.67-0.26 at 20%, 0.85-1.03 at 30%, 1.07-1.58 at 50%).
COMPRESSED_WGRAD_MAX_DENSITY = 0.25
# The kernel sums whole blocks of this many output channels and visits every kernel tap of each kept input, so it
# pays only on layers with whole blocks at stride 1. Measured at batch 128, one core, 10-20% kept: 16 output
# channels (ResNet-20's 32 x 32 stage; padded to a block) 4-10x the rebuild-and-dense time, stride 2 2-5x,
# 16 -> 64 at stride 1 1.0-1.1x, 128 -> 128 at stride 1 0.45-0.7x.
COMPRESSED_WGRAD_BLOCK = 64
# A 1 x 1 kernel reuses nothing of a kept input across taps, and its dense product is a plain matrix product: the
# kernel pays there only for few kept inputs on small maps. Measured on ResNet-50's 1 x 1 layers at 224, batch 32,
# two threads (kernel / rebuild-and-dense time): 20% kept 1.71 and 1.20 at 56 x 56, 1.08 at 28 x 28, 0.79 at
# 14 x 14, 0.60 at 7 x 7; 10% kept 0.84-0.99 at 56 x 56, 0.56 at 28 x 28, 0.39-0.47 below (3 x 3 layers:
# 0.48-0.59 at 20%). It pays where the kept share times the map's side is at most this.
POINTWISE_WGRAD_LIMIT = 3.0


def _wgrad_pays(cout: int, stride, kernel=(3, 3), pixels: int = 0, share: float = 0.0) -> bool:
    """Whether the compressed kernel beats rebuild-and-dense on this layer's shape and kept share (see above)."""
    if cout % COMPRESSED_WGRAD_BLOCK or any(s != 1 for s in _pair(stride)):
        return False
    return math.prod(_pair(kernel)) > 1 or share * math.sqrt(pixels) <= POINTWISE_WGRAD_LIMIT


def _compressed_wgrad(
    values: torch.Tensor, numel: int, grad_out: torch.Tensor, cout: int, stride=1, kernel=(3, 3)
) -> bool:
    """Whether dW comes straight from the compressed input: the kernel applies, pays on this shape, and few
    enough inputs were kept. (``kernel`` (1, 1) on a 4-D ``grad_out``: a pointwise convolution over its map.)"""
    share = values.numel() / max(numel, 1)
    pixels = grad_out.shape[2] * grad_out.shape[3] if grad_out.dim() == 4 else 0
    return (
        grad_out.dtype == torch.float32
        and native.available(values)
        and _wgrad_pays(cout, stride, kernel, pixels, share)
        and share <= COMPRESSED_WGRAD_MAX_DENSITY
    )


def _weights(weight, w_mask, w_thresh):
    """W_s: the kept units (structured) or the weights at or above the period's threshold."""
    if w_mask is not None:
        return weight * w_mask
    flat, cl = flat_view(weight.detach())
    if native.available(flat):
        return unflat(native.select(flat, float(w_thresh)), tuple(weight.shape), cl)
    return weight * (weight.abs() >= w_thresh)


def _pair(v) -> list[int]:
    return [int(a) for a in v] if isinstance(v, (tuple, list)) else [int(v), int(v)]


def _numeric_padding(layer: nn.Conv2d) -> list[int]:
    """The layer's padding as two numbers (``"valid"`` is none; ``"same"`` needs an even total per side)."""
    if layer.padding == "valid":
        return [0, 0]
    if layer.padding == "same":
        total = [d * (k - 1) for d, k in zip(_pair(layer.dilation), _pair(layer.kernel_size))]
        if any(t % 2 for t in total):
            raise ValueError(
                f"SWAT takes padding='same' where it pads both sides alike (odd kernels); this layer's kernel "
                f"{tuple(layer.kernel_size)} with dilation {tuple(layer.dilation)} does not: give its padding in numbers"
            )
        return [t // 2 for t in total]
    return _pair(layer.padding)


def _format_of(t: torch.Tensor) -> torch.memory_format:
    """The layout a 4-D gradient is returned in: the tensor's own (channels-last or NCHW), so that the operators'
    fake implementations can say it without seeing which path the kernels took."""
    return torch.channels_last if channels_last(t) else torch.contiguous_format


def _compressed_fake(x: torch.Tensor, keep_input: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The shapes of :func:`_compress`'s bits and values, whose count depends on the data (a dynamic size)."""
    if keep_input:
        return x.new_empty(0, dtype=torch.uint8), x.new_empty(0)
    return x.new_empty(-(-x.numel() // 8), dtype=torch.uint8), x.new_empty(torch.library.get_ctx().new_dynamic_size())


# ---- the operators: one per SWAT layer call and its backward (``torch.ops.sparsetrain.swat_*``) ----
# Each SWAT call is an opaque operator with a fake implementation, so ``torch.compile`` keeps a SWAT model in one
# graph: the saved input's size depends on the data, which the fakes declare as a dynamic size (this needs
# ``torch._dynamo.config.capture_dynamic_output_shape_ops``, which :func:`convert` turns on).


@torch.library.custom_op("sparsetrain::swat_conv2d", mutates_args=(), device_types=("cpu", "cuda"))
def swat_conv2d_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    w_mask: torch.Tensor | None,
    w_thresh: torch.Tensor,
    a_thresh: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SWAT's convolution by dense products on W_s: (the output, the bits and values of the input's top-K)."""
    packed, values, _ = _compress(x, a_thresh)  # first, while x is still in cache from the layer before
    return F.conv2d(x, _weights(weight, w_mask, w_thresh), bias, stride, padding, dilation, groups), packed, values


@swat_conv2d_op.register_fake
def _swat_conv2d_fake(x, weight, bias, w_mask, w_thresh, a_thresh, stride, padding, dilation, groups):
    return (F.conv2d(x, weight, bias, stride, padding, dilation, groups), *_compressed_fake(x))


@torch.library.custom_op("sparsetrain::swat_conv2d_backward", mutates_args=(), device_types=("cpu", "cuda"))
def swat_conv2d_backward(
    grad: torch.Tensor,
    packed: torch.Tensor,
    values: torch.Tensor,
    weight: torch.Tensor,
    w_mask: torch.Tensor | None,
    w_thresh: torch.Tensor,
    x_shape: list[int],
    nhwc: bool,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    need: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``sparsetrain::swat_conv2d`` for the input, the (whole) weight and the bias, as ``need``
    asks (an empty tensor for one not asked): dx from W_s, dW from the saved top-K input."""
    shape, (need_x, need_w, need_b) = tuple(x_shape), need
    cout = weight.shape[0]
    w_s = _weights(weight, w_mask, w_thresh)
    nhwc_order = nhwc or shape[1] == 1 or shape[2] * shape[3] == 1  # the saved bits run pixel by pixel
    kernel = tuple(weight.shape[2:])
    if (
        need_w
        and groups == 1
        and nhwc_order
        and _compressed_wgrad(values, math.prod(shape), grad, cout, stride, kernel)
    ):
        # the input gradient (and bias) from the dense product; dW from the kept inputs alone
        gx, _, gb = torch.ops.aten.convolution_backward(
            grad, grad.new_empty(1).expand(shape), w_s, [cout], stride, padding, dilation, False, [0, 0], 1,
            [need_x, False, need_b],
        )  # fmt: skip
        n, c, h, w = shape
        gwt = native.compressed_weight_grad(
            packed, values, (n, h, w, c), grad.permute(0, 2, 3, 1).contiguous(), tuple(weight.shape[2:]),
            stride, padding, dilation,
        )  # fmt: skip
        gw = gwt.permute(3, 0, 1, 2)
    else:
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, _decompress(packed, values, shape, nhwc), w_s, [cout], stride, padding, dilation, False, [0, 0],
            groups, [need_x, need_w, need_b],
        )  # fmt: skip
    return _grads_out(
        grad, x_shape, nhwc, weight, gx if need_x else None, gw if need_w else None, gb if need_b else None
    )


def _grads_out(like, x_shape, nhwc, weight, gx, gw, gb) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients in the layouts the fakes give (the input's, the weight's), an empty tensor of its own for each
    one not asked for (an operator's outputs may not alias)."""
    if gx is not None:
        four = len(x_shape) == 4
        gx = gx.contiguous(memory_format=torch.channels_last if four and nhwc else torch.contiguous_format)
    if gw is not None:
        gw = gw.contiguous(memory_format=_format_of(weight) if weight.dim() == 4 else torch.contiguous_format)
    return tuple(like.new_empty(0) if g is None else g for g in (gx, gw, gb))


def _grads_fake(like, x_shape, nhwc, weight, need) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shapes and layouts :func:`_grads_out` gives."""
    four = len(x_shape) == 4
    gx = like.new_empty(x_shape).contiguous(
        memory_format=torch.channels_last if four and nhwc else torch.contiguous_format
    )
    gw = weight.new_empty(weight.shape).contiguous(
        memory_format=_format_of(weight) if weight.dim() == 4 else torch.contiguous_format
    )
    made = (gx, gw, weight.new_empty(weight.shape[0]))
    return tuple(g if n else like.new_empty(0) for g, n in zip(made, need))


@swat_conv2d_backward.register_fake
def _swat_conv2d_backward_fake(
    grad, packed, values, weight, w_mask, w_thresh, x_shape, nhwc, stride, padding, dilation, groups, need
):
    return _grads_fake(grad, x_shape, nhwc, weight, need)


def _save_dense_product(ctx, inputs, output) -> None:
    """What the dense-product operators (convolution, Linear) keep for backward: the input's top-K (bits and values,
    no gradient of their own), and the weight with what selects W_s. The weight is resident anyway; W_s is rebuilt
    in backward (the step has not changed the weight yet)."""
    _, weight, _, w_mask, w_thresh = inputs[:5]
    _, packed, values = output
    ctx.set_materialize_grads(False)  # (no zero gradients made for the outputs that have none)
    ctx.mark_non_differentiable(packed, values)
    ctx.save_for_backward(packed, values, weight, w_mask, w_thresh)


def _swat_conv2d_setup(ctx, inputs, output) -> None:
    x, _, bias, _, _, _, stride, padding, dilation, groups = inputs
    _save_dense_product(ctx, inputs, output)
    ctx.conf = (list(x.shape), flat_view(x)[1], stride, padding, dilation, groups, bias is not None)


def _swat_conv2d_grad(ctx, grad, _packed, _values):
    if grad is None:  # the output took no part in the loss
        return (None,) * 10
    packed, values, weight, w_mask, w_thresh = ctx.saved_tensors
    shape, cl, stride, padding, dilation, groups, has_bias = ctx.conf
    need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
    gx, gw, gb = swat_conv2d_backward(
        grad.contiguous(memory_format=_format_of(grad)), packed, values, weight, w_mask, w_thresh, shape, cl,
        stride, padding, dilation, groups, need,
    )  # fmt: skip
    return (gx if need[0] else None, gw if need[1] else None, gb if need[2] else None, *[None] * 7)


swat_conv2d_op.register_autograd(_swat_conv2d_grad, setup_context=_swat_conv2d_setup)


@torch.library.custom_op("sparsetrain::swat_linear", mutates_args=(), device_types=("cpu", "cuda"))
def swat_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    w_mask: torch.Tensor | None,
    w_thresh: torch.Tensor,
    a_thresh: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear counterpart of ``sparsetrain::swat_conv2d``."""
    packed, values, _ = _compress(x, a_thresh)
    return F.linear(x, _weights(weight, w_mask, w_thresh), bias), packed, values


@swat_linear_op.register_fake
def _swat_linear_fake(x, weight, bias, w_mask, w_thresh, a_thresh):
    return (F.linear(x, weight, bias), *_compressed_fake(x))


@torch.library.custom_op("sparsetrain::swat_linear_backward", mutates_args=(), device_types=("cpu", "cuda"))
def swat_linear_backward(
    grad: torch.Tensor,
    packed: torch.Tensor,
    values: torch.Tensor,
    weight: torch.Tensor,
    w_mask: torch.Tensor | None,
    w_thresh: torch.Tensor,
    x_shape: list[int],
    need: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``sparsetrain::swat_linear`` (input, weight, bias; empty where ``need`` says no)."""
    shape = tuple(x_shape)
    g2 = grad.reshape(-1, grad.shape[-1])
    gx = gw = gb = None
    if need[0]:
        gx = (g2 @ _weights(weight, w_mask, w_thresh)).view(shape)
    if need[1] and _compressed_wgrad(values, math.prod(shape), g2, g2.shape[1]):
        tokens = g2.shape[0]
        gwt = native.compressed_weight_grad(
            packed, values, (tokens, 1, 1, shape[-1]), g2.contiguous().view(tokens, 1, 1, -1), (1, 1)
        )
        gw = gwt.view(shape[-1], -1).t()
    elif need[1]:
        gw = g2.t() @ _decompress(packed, values, shape, False).reshape(-1, shape[-1])
    if need[2]:
        gb = g2.sum(0)
    return _grads_out(grad, x_shape, False, weight, gx, gw, gb)


@swat_linear_backward.register_fake
def _swat_linear_backward_fake(grad, packed, values, weight, w_mask, w_thresh, x_shape, need):
    return _grads_fake(grad, x_shape, False, weight, need)


def _swat_linear_setup(ctx, inputs, output) -> None:
    _save_dense_product(ctx, inputs, output)
    ctx.conf = (list(inputs[0].shape), inputs[2] is not None)


def _swat_linear_grad(ctx, grad, _packed, _values):
    if grad is None:  # the output took no part in the loss
        return (None,) * 6
    packed, values, weight, w_mask, w_thresh = ctx.saved_tensors
    shape, has_bias = ctx.conf
    need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
    gx, gw, gb = swat_linear_backward(grad.contiguous(), packed, values, weight, w_mask, w_thresh, shape, need)
    return gx if need[0] else None, gw if need[1] else None, gb if need[2] else None, None, None, None


swat_linear_op.register_autograd(_swat_linear_grad, setup_context=_swat_linear_setup)


@torch.library.custom_op("sparsetrain::swat_direct_conv2d", mutates_args=(), device_types="cpu")
def swat_direct_conv2d_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    w_thresh: torch.Tensor,
    a_thresh: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    keep_input: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """SWAT's convolution on the direct kernels, W_s listed from the threshold: (the output, the input's top-K bits
    and values (empty when ``keep_input``: the lossless savings keep the whole input, and backward takes its top-K),
    the kept weights, their lists (:meth:`DirectStructure.tensors`))."""
    # the input compressed first, while it is still in cache from the layer before
    packed, values = _compressed_fake(x, True) if keep_input else _compress(x, a_thresh)[:2]
    kept, by_out, by_in = native.threshold_lists(weight, float(w_thresh))
    s = DirectStructure(tuple(weight.shape), None, by_out, by_in)
    geom, plan = s.plan_for(x.shape, stride, padding, dilation)
    nhwc = flat_view(x)[1]
    # in the layout the input was compressed in (its memory order), which backward reads back
    out = direct_forward(x, kept, None if bias is None else bias.contiguous(), s, geom, plan, nhwc=nhwc)
    return out, packed, values, kept, s.tensors()


@swat_direct_conv2d_op.register_fake
def _swat_direct_conv2d_fake(x, weight, bias, w_thresh, a_thresh, stride, padding, dilation, keep_input):
    nnz = torch.library.get_ctx().new_dynamic_size()
    lists = _lists_fake(tuple(weight.shape), nnz)
    out = _direct_conv2d_fake(x, weight, bias, lists, list(weight.shape), stride, padding, dilation, flat_view(x)[1])
    return (out, *_compressed_fake(x, keep_input), weight.new_empty(nnz), lists)


@torch.library.custom_op("sparsetrain::swat_direct_conv2d_backward", mutates_args=(), device_types="cpu")
def swat_direct_conv2d_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    packed: torch.Tensor,
    values: torch.Tensor,
    kept: torch.Tensor,
    lists: list[torch.Tensor],
    a_thresh: torch.Tensor,
    shape: list[int],
    x_shape: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    nhwc: bool,
    keep_input: bool,
    need: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``sparsetrain::swat_direct_conv2d`` (input, whole weight, bias; empty where ``need`` says
    no). ``x`` is read only under ``keep_input``: the same top-K of the same input, with the forward's threshold,
    gives the same bits."""
    if keep_input:
        packed, values, _ = _compress(x, a_thresh)
    s = DirectStructure.from_tensors(shape, lists)
    geom, plan = s.plan_for(x_shape, stride, padding, dilation)
    gx = gw = gb = None
    if need[0]:
        gx = direct_input_grad(grad, kept, s, geom, plan, nhwc=nhwc)
    if need[1]:
        n, c, h, w = x_shape
        if _compressed_wgrad(values, math.prod(x_shape), grad, s.shape[0], stride, s.shape[2:]):
            gwt = native.compressed_weight_grad(
                packed, values, (n, h, w, c), grad.permute(0, 2, 3, 1).contiguous(), s.shape[2:], stride, padding,
                dilation, channels_first=not nhwc,
            )  # fmt: skip
            gw = gwt.permute(3, 0, 1, 2)
        else:
            x_s = _decompress(packed, values, tuple(x_shape), nhwc)
            gw = torch.nn.grad.conv2d_weight(x_s, s.shape, grad, stride, padding, dilation)
    if need[2]:
        gb = grad.sum((0, 2, 3))
    return _grads_out(grad, x_shape, nhwc, kept.new_empty(shape), gx, gw, gb)


@swat_direct_conv2d_backward.register_fake
def _swat_direct_conv2d_backward_fake(
    grad, x, packed, values, kept, lists, a_thresh, shape, x_shape, stride, padding, dilation, nhwc, keep_input, need
):
    return _grads_fake(grad, x_shape, nhwc, grad.new_empty(shape), need)


def _swat_direct_setup(ctx, inputs, output) -> None:
    x, weight, bias, w_thresh, a_thresh, stride, padding, dilation, keep_input = inputs
    _, packed, values, kept, lists = output
    ctx.set_materialize_grads(False)  # (no zero gradients made for the outputs that have none)
    ctx.mark_non_differentiable(packed, values, kept, *lists)
    ctx.save_for_backward(x if keep_input else values, packed, values, kept, a_thresh, *lists)
    nhwc = flat_view(x)[1]
    ctx.conf = (list(weight.shape), list(x.shape), stride, padding, dilation, nhwc, keep_input, bias is not None)


def _swat_direct_grad(ctx, grad, *_):
    if grad is None:  # the output took no part in the loss
        return (None,) * 9
    x, packed, values, kept, a_thresh, *lists = ctx.saved_tensors
    shape, x_shape, stride, padding, dilation, nhwc, keep_input, has_bias = ctx.conf
    need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
    grad = grad.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
    gx, gw, gb = swat_direct_conv2d_backward(
        grad, x, packed, values, kept, lists, a_thresh, shape, x_shape, stride, padding, dilation, nhwc, keep_input,
        need,
    )  # fmt: skip
    return (gx if need[0] else None, gw if need[1] else None, gb if need[2] else None, *[None] * 6)


swat_direct_conv2d_op.register_autograd(_swat_direct_grad, setup_context=_swat_direct_setup)


@register_flop_formula([torch.ops.sparsetrain.swat_conv2d, torch.ops.sparsetrain.swat_direct_conv2d])
def _swat_conv2d_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """The dense convolution's count, as PyTorch's flop counter gives it (the cost model applies the densities)."""
    return conv_flop_count(x_shape, w_shape, out_shape[0])


@register_flop_formula(torch.ops.sparsetrain.swat_linear)
def _swat_linear_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """The dense product's count."""
    return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]


def _refresh_weights(weight: torch.Tensor, density: float, structure: str | None, w_mask, w_thresh) -> None:
    """Install W_s's new kept units (structured) or threshold (unstructured) for the whole ``weight``."""
    if structure:
        w_mask.copy_(parse_scheme(structure).mask(weight.abs(), density))
    else:
        w_thresh.copy_(topk_threshold(weight, density))


@torch.library.custom_op(
    "sparsetrain::swat_refresh",
    mutates_args=("w_mask", "w_thresh", "a_thresh", "act_kept", "steps"),
    device_types=("cpu", "cuda"),
)
def swat_refresh(
    weight: torch.Tensor,
    x: torch.Tensor,
    w_mask: torch.Tensor,
    w_thresh: torch.Tensor,
    a_thresh: torch.Tensor,
    act_kept: torch.Tensor,
    steps: torch.Tensor,
    density: float,
    act_density: float,
    period: int,
    structure: str | None,
) -> None:
    """A SWAT layer's training forward, before its product: every ``period``-th one takes the top-K thresholds of
    the (whole) weight and of the input ``x`` anew; each counts one step. An operator, so that the choice, which
    depends on the step count's value, stays inside a compiled graph (run on real tensors, never traced)."""
    if int(steps) % period == 0:
        _refresh_weights(weight, density, structure, w_mask, w_thresh)
        a_thresh_now, share = threshold_and_share(x, act_density)
        a_thresh.copy_(a_thresh_now)
        act_kept.fill_(share)
    steps.add_(1)


@swat_refresh.register_fake
def _swat_refresh_fake(weight, x, w_mask, w_thresh, a_thresh, act_kept, steps, density, act_density, period, structure):
    return None


def swat_conv2d(x, weight, bias, w_mask, w_thresh, a_thresh, stride=1, padding=0, dilation=1, groups=1):
    """Conv2d with W_s (``weight * w_mask``, or the weights with |w| >= ``w_thresh`` when ``w_mask`` is None),
    saving for backward only the input entries with |x| >= ``a_thresh``, compressed."""
    out, _, _ = swat_conv2d_op(
        x, weight, bias, w_mask, w_thresh, a_thresh, _pair(stride), _pair(padding), _pair(dilation), int(groups)
    )
    return out


def swat_linear(x, weight, bias, w_mask, w_thresh, a_thresh):
    """Linear counterpart of :func:`swat_conv2d`."""
    return swat_linear_op(x, weight, bias, w_mask, w_thresh, a_thresh)[0]


# how SWAT convolutions compute (see the module docstring)
def swat_backends() -> tuple[str, ...]:
    """The backends SWAT's layers run under (those that declare ``own_layers``)."""
    return tuple(n for n, b in BACKENDS.items() if b.own_layers)


# Above this share of kept weights a layer keeps the dense products on W_s: the direct kernels' advantage is the
# FLOPs they skip (at 10% they take 0.37-0.71 of a dense channels-last step on VGG-16's shapes, one core).
DIRECT_MAX_DENSITY = 0.25

# the buffers a SWAT layer adds to its Conv2d/Linear (thresholds, kept units, step count, kept input share)
SWAT_BUFFERS = ("w_mask", "w_thresh", "a_thresh", "steps", "act_kept")


class _SWATMixin:
    """Buffers and the periodic top-K refresh shared by the SWAT layers."""

    def _init_swat(self, density: float, act_density: float, period: int, structure: str | None):
        self.density, self.act_density, self.period, self.structure = density, act_density, period, structure
        w = local(self.weight)  # buffers are whole on every rank, also when the weight is sharded
        self.register_buffer(
            "w_mask", torch.ones(self.weight.shape, dtype=torch.bool, device=w.device)
        )  # structured: kept units
        self.register_buffer("w_thresh", torch.zeros((), dtype=w.dtype, device=w.device))
        self.register_buffer("a_thresh", torch.zeros((), dtype=w.dtype, device=w.device))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long, device=w.device))
        self.register_buffer("act_kept", torch.zeros((), dtype=torch.float64, device=w.device))
        self.refresh_weights()

    @torch.no_grad()
    def refresh_weights(self) -> None:
        """Take W_s anew now (a budget change; training forwards do it every period): a sharded weight is
        gathered once."""
        _refresh_weights(whole(self.weight), self.density, self.structure, self.w_mask, self.w_thresh)

    def current_mask(self) -> torch.Tensor:
        """Weights used now: |w| >= the period's threshold (the threshold is reused, the set may move), or the kept
        units; laid out like the weight (this rank's rows when it is sharded)."""
        part = Part.of(self.weight)
        if self.structure:
            return part.wrap(part.rows_of(self.w_mask)) if part else self.w_mask
        kept = local(self.weight).detach().abs() >= self.w_thresh
        return part.wrap(kept) if part else kept

    def export_mask(self) -> torch.Tensor:
        """The weights an exported model keeps: exactly the layer's budget, the top ``floor(density * numel)`` by
        magnitude at this moment (ties to the lower index, so the choice is deterministic), or the kept units of
        structured SWAT; laid out like the weight (this rank's rows when it is sharded). The forward pass's
        threshold is a period old and keeps ties; an export must hold the asked sparsity."""
        if self.structure:
            return self.current_mask()
        w = whole(self.weight).detach()
        flat = w.abs().reshape(-1)
        k = max(1, min(flat.numel(), math.floor(self.density * flat.numel() + 1e-9)))
        order = torch.sort(flat, descending=True, stable=True).indices[:k]
        kept = torch.zeros(flat.numel(), dtype=torch.bool, device=w.device)
        kept[order] = True
        kept = kept.reshape(w.shape)
        part = Part.of(self.weight)
        return part.wrap(part.rows_of(kept)) if part else kept

    def kept_weights(self) -> int:
        """Weights used now, over all ranks."""
        m = self.current_mask()
        return sum_over_ranks(int(local(m).sum()), m)

    def _maybe_refresh(self, x: torch.Tensor) -> None:
        """A training forward's refresh and step count (:func:`swat_refresh`; in forward the weight is whole)."""
        if self.training:
            swat_refresh(
                self.weight.detach(), x.detach(), self.w_mask, self.w_thresh, self.a_thresh, self.act_kept,
                self.steps, self.density, self.act_density, self.period, self.structure,
            )  # fmt: skip

    def weight_density(self) -> float:
        return self.kept_weights() / self.weight.numel()

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", swat(density={self.density:.3f}, act_density={self.act_density:.3f}, period={self.period})"
        )


def refuse_traced(x: torch.Tensor, layer: nn.Module) -> None:
    """SWAT's layers compute through operators with data-dependent sizes (the top-K inputs), which an exporter or
    ``torch.func``'s transforms cannot trace: refuse those inputs with the layer named and what runs instead.
    (``torch.compile`` keeps the operators in its graph, the sizes dynamic.)"""
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        return  # the compiler traces fakes through the operators' fake implementations; the kernels see real tensors
    why = native.what_is_wrong(x, cpu=False)
    if why:
        raise native.NoDataError(
            f"a SWAT {type(layer).__name__} {tuple(layer.weight.shape)} was handed {why}; SWAT's layers train on "
            "real CPU or CUDA tensors: export or transform the model sp.remove() returns"
        )


class SWATConv2d(_SWATMixin, nn.Conv2d):
    """A Conv2d trained the SWAT way (made by :func:`convert`; same parameters as the layer it replaces)."""

    backend = "masked"
    ran: str | None = None  # the path the last training forward took ("direct" or "masked")
    # set while backward recomputes this layer's output (lossless activations): the direct path then keeps its
    # whole input, which the savings keep compressed and exact, instead of its top-K, and takes the top-K in backward
    keeps_input = False
    # what its rerun costs in forwards: the forward, and in backward the input decompressed and its top-K taken
    # again (VGG-16 SWAT-U 90%: the step grew by about 2.3 times what the forwards alone predicted)
    rerun_forwards = 3.0

    def fix_backend(self, backend: str) -> None:
        """Compute with ``backend`` from now on (one of :func:`swat_backends`)."""
        if backend not in swat_backends():
            raise ValueError(f"unknown SWAT backend {backend!r}; choose one of {list(swat_backends())}")
        self.backend = backend

    def runs_direct(self, x: torch.Tensor) -> bool:
        """Whether this pass takes the direct kernels: asked for, unstructured, at most :data:`DIRECT_MAX_DENSITY`
        of the weights kept, and an NCHW or channels-last float32 input on the CPU with the kernels built."""
        return (
            self.backend != "masked"
            and not self.structure
            and self.groups == 1
            and self.density <= DIRECT_MAX_DENSITY
            and x.dim() == 4
            and (x.is_contiguous() or channels_last(x))
            and x.dtype == self.weight.dtype == torch.float32
            and x.device.type == "cpu"
            and native.available()
            and not isinstance(self.padding, str)
        )

    @property
    def sparse_forward(self) -> bool:
        """Whether the forward pass runs on the direct kernels (a fraction of a dense one: backward may recompute
        the output)."""
        return self.backend != "masked" and not self.structure and self.density <= DIRECT_MAX_DENSITY

    def forward(self, x):
        refuse_traced(x, self)
        self._maybe_refresh(x)
        if self.training:
            self.ran = "direct" if self.runs_direct(x) else "masked"
        return self._run(x)

    def _run(self, x):
        """The output for ``x`` under the current thresholds (no refresh, no step counted: what a rerun computes)."""
        if self.padding_mode != "zeros":
            raise ValueError("SWAT supports zero padding only")
        padding = _numeric_padding(self)
        if self.runs_direct(x):
            return swat_direct_conv2d_op(
                x,
                self.weight,
                self.bias,
                self.w_thresh,
                self.a_thresh,
                _pair(self.stride),
                padding,
                _pair(self.dilation),
                self.keeps_input,
            )[0]
        return swat_conv2d(
            x,
            self.weight,
            self.bias,
            self.w_mask if self.structure else None,
            self.w_thresh,
            self.a_thresh,
            self.stride,
            padding,
            self.dilation,
            self.groups,
        )


class SWATLinear(_SWATMixin, nn.Linear):
    """A Linear trained the SWAT way (made by :func:`convert`)."""

    def forward(self, x):
        refuse_traced(x, self)
        self._maybe_refresh(x)
        return swat_linear(
            x, self.weight, self.bias, self.w_mask if self.structure else None, self.w_thresh, self.a_thresh
        )


def _swap(module: nn.Module, new_cls) -> None:
    module.__class__ = new_cls


def convert(
    model: nn.Module,
    densities: Mapping[str, float],
    act_densities: Mapping[str, float] | float | None = None,
    period: int = 20,
    structure: str | None = None,
) -> nn.Module:
    """Turn the Conv2d/Linear layers whose weights are named in ``densities`` into SWAT layers, in place.

    ``densities`` maps weight names (``"layer1.0.conv1.weight"``) to the kept share of
    weights; ``act_densities`` the kept share of their inputs (default: the same);
    ``structure`` keeps whole ``kernel`` or ``channel_out`` units of convolutions by L1 norm instead of
    single weights (Linear layers stay unstructured: a classifier must keep every class).

    Turns on ``torch._dynamo.config.capture_dynamic_output_shape_ops`` (process-wide), so that ``torch.compile``
    keeps the layers' operators, whose saved inputs have data-dependent sizes, in one graph.
    """
    if period < 1:
        raise ValueError(f"topk_period must be >= 1, got {period}")
    if structure not in (None, "kernel", "channel_out"):
        raise ValueError(f"structured SWAT keeps 'kernel' or 'channel_out' units, got {structure!r}")
    modules = dict(model.named_modules())
    for wname, d in densities.items():
        mname = wname.rsplit(".", 1)[0] if "." in wname else ""
        m = modules.get(mname)
        if type(m) not in (nn.Conv2d, nn.Linear):
            hint = (
                (
                    " (it is sharded by itself: apply fully_shard to the blocks that contain it, or to the model, so "
                    "that SWAT can still take the layer's class)"
                )
                if type(m).__name__.startswith("FSDP")
                else ""
            )
            raise ValueError(f"{wname} is not the weight of a plain Conv2d or Linear layer{hint}")
        if not 0 < d <= 1:
            raise ValueError(f"{wname}: density must be in (0, 1], got {d}")
        a = (
            act_densities.get(wname, d)
            if isinstance(act_densities, Mapping)
            else (d if act_densities is None else act_densities)
        )
        # Linear layers keep single weights: their output units may be the classes, which must all stay
        struct = structure if isinstance(m, nn.Conv2d) else None
        _swap(m, SWATConv2d if isinstance(m, nn.Conv2d) else SWATLinear)
        m._init_swat(d, a, period, struct)
    # the saved top-K input's size depends on the data: torch.compile keeps such operators in its graph (a dynamic
    # size) only with this switch on; off, every SWAT layer would break the graph. A process-wide setting of the
    # compiler's, which changes nothing for models without such operators.
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    return model


def swat_layers(model: nn.Module) -> dict[str, _SWATMixin]:
    """The SWAT layers of a model, keyed by the names of their weights."""
    return {f"{n}.weight" if n else "weight": m for n, m in model.named_modules() if isinstance(m, _SWATMixin)}


def swat_backend(model: nn.Module, backend: str) -> dict[str, "SWATConv2d"]:
    """Set how the SWAT convolutions of ``model`` compute (one of :func:`swat_backends`); returns them by weight
    name when they may run the direct kernels (for the whole-step layout check), else an empty dict."""
    if backend not in swat_backends():
        raise ValueError(f"unknown SWAT backend {backend!r}; choose one of {list(swat_backends())}")
    convs = {n: m for n, m in swat_layers(model).items() if isinstance(m, SWATConv2d)}
    for m in convs.values():
        m.fix_backend(backend)
    return {} if backend == "masked" else convs


def revert(model: nn.Module) -> nn.Module:
    """Turn SWAT layers back into plain Conv2d/Linear (weights untouched), in place."""
    for m in swat_layers(model).values():
        for b in SWAT_BUFFERS:
            delattr(m, b)
        _swap(m, nn.Conv2d if isinstance(m, nn.Conv2d) else nn.Linear)
    return model


@torch.no_grad()
def harden(model: nn.Module) -> nn.Module:
    """Prune every SWAT layer's weights to exactly its budget (:meth:`export_mask`: the top-K now) and return a
    plain model with sparse weights."""
    for m in swat_layers(model).values():
        m.weight.mul_(m.export_mask())
    return revert(model)
