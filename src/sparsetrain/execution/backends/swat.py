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
  64 output channels at stride 1), dW is computed from the bitmask and values directly
  (``native.compressed_weight_grad``: work in proportion to the kept inputs, the dense input never rebuilt);
  otherwise the input is rebuilt and one ``aten.convolution_backward`` call (two matrix products for Linear)
  computes both gradients.

Thresholds are exact top-K values recomputed every ``topk_period`` training forward
passes and reused in between, held in module buffers (so they are checkpointed).
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
from torch.autograd.function import once_differentiable

from ...core.schemes import parse_scheme
from ...core.sharding import Part, local, sum_over_ranks, whole
from .. import native
from ..bits import flat_view, numpy_ok, pack_bits, unflat, unpack_bits
from .direct import DirectStructure, channels_last, direct_forward, direct_geometry, direct_input_grad, direct_plan
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


def _wgrad_pays(cout: int, stride) -> bool:
    """Whether the compressed kernel beats rebuild-and-dense on this layer's shape (see above)."""
    return cout % COMPRESSED_WGRAD_BLOCK == 0 and all(s == 1 for s in _pair(stride))


def _compressed_wgrad(values: torch.Tensor, numel: int, grad_out: torch.Tensor, cout: int, stride=1) -> bool:
    """Whether dW comes straight from the compressed input: the kernel applies, pays on this shape, and few
    enough inputs were kept."""
    return (
        grad_out.dtype == torch.float32
        and native.available(values)
        and _wgrad_pays(cout, stride)
        and values.numel() <= COMPRESSED_WGRAD_MAX_DENSITY * numel
    )


def _weights(weight, w_mask, w_thresh):
    """W_s: the kept units (structured) or the weights at or above the period's threshold."""
    if w_mask is not None:
        return weight * w_mask
    flat, cl = flat_view(weight.detach())
    if native.available(flat):
        return unflat(native.select(flat, float(w_thresh)), tuple(weight.shape), cl)
    return weight * (weight.abs() >= w_thresh)


class _SWATConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, w_mask, w_thresh, a_thresh, stride, padding, dilation, groups):
        packed, values, cl = _compress(x, a_thresh)  # first, while x is still in cache from the layer before
        out = F.conv2d(x, _weights(weight, w_mask, w_thresh), bias, stride, padding, dilation, groups)
        # the weight is resident anyway; W_s is rebuilt in backward (the step has not changed the weight yet)
        ctx.save_for_backward(packed, values, weight, w_mask, w_thresh)
        ctx.conf = (tuple(x.shape), cl, stride, padding, dilation, groups, bias is not None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        packed, values, weight, w_mask, w_thresh = ctx.saved_tensors
        shape, cl, stride, padding, dilation, groups, has_bias = ctx.conf
        need = ctx.needs_input_grad
        nhwc_order = cl or shape[1] == 1 or shape[2] * shape[3] == 1  # the saved bits run pixel by pixel
        if (
            need[1]
            and groups == 1
            and nhwc_order
            and _compressed_wgrad(values, math.prod(shape), grad_out, weight.shape[0], stride)
        ):
            # the input gradient (and bias) from the dense product; dW from the kept inputs alone
            w_s = _weights(weight, w_mask, w_thresh)
            gx, _, gb = torch.ops.aten.convolution_backward(
                grad_out,
                grad_out.new_empty(1).expand(shape),
                w_s,
                [weight.shape[0]] if has_bias else None,
                _pair(stride),
                _pair(padding),
                _pair(dilation),
                False,
                [0, 0],
                1,
                [need[0], False, has_bias and need[2]],
            )
            n, c, h, w = shape
            gwt = native.compressed_weight_grad(
                packed,
                values,
                (n, h, w, c),
                grad_out.permute(0, 2, 3, 1).contiguous(),
                tuple(weight.shape[2:]),
                _pair(stride),
                _pair(padding),
                _pair(dilation),
            )
            return gx, gwt.permute(3, 0, 1, 2), gb, None, None, None, None, None, None, None
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad_out,
            _decompress(packed, values, shape, cl),
            _weights(weight, w_mask, w_thresh),
            [weight.shape[0]] if has_bias else None,
            _pair(stride),
            _pair(padding),
            _pair(dilation),
            False,
            [0, 0],
            groups,
            [need[0], need[1], has_bias and need[2]],
        )
        return gx, gw, gb, None, None, None, None, None, None, None


class _SWATLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, w_mask, w_thresh, a_thresh):
        packed, values, cl = _compress(x, a_thresh)
        out = F.linear(x, _weights(weight, w_mask, w_thresh), bias)
        ctx.save_for_backward(packed, values, weight, w_mask, w_thresh)
        ctx.conf = (tuple(x.shape), cl, bias is not None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        packed, values, weight, w_mask, w_thresh = ctx.saved_tensors
        shape, cl, has_bias = ctx.conf
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (g2 @ _weights(weight, w_mask, w_thresh)).view(shape)
        if ctx.needs_input_grad[1] and _compressed_wgrad(values, math.prod(shape), g2, g2.shape[1]):
            tokens = g2.shape[0]
            gw = (
                native.compressed_weight_grad(
                    packed, values, (tokens, 1, 1, shape[-1]), g2.contiguous().view(tokens, 1, 1, -1), (1, 1)
                )
                .view(shape[-1], -1)
                .t()
            )
        elif ctx.needs_input_grad[1]:
            gw = g2.t() @ _decompress(packed, values, shape, cl).reshape(-1, shape[-1])
        if has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb, None, None, None


class _SWATDirectConv2dFn(torch.autograd.Function):
    """SWAT's convolution on the direct kernels: W_s listed from the threshold, the input compressed (NCHW or
    channels-last, as it comes)."""

    @staticmethod
    def forward(ctx, x, weight, bias, w_thresh, a_thresh, stride, padding, dilation, keep_input=False):
        if keep_input:  # the whole input is kept (exactly, compressed, by the lossless savings): top-K in backward
            cl, ctx.a_thresh = flat_view(x.detach())[1], float(a_thresh)
        else:
            packed, values, cl = _compress(x, a_thresh)
        kept, by_out, by_in = native.threshold_lists(weight, float(w_thresh))
        s = DirectStructure(tuple(weight.shape), None, by_out, by_in)
        geom = direct_geometry(x.shape, s.shape, stride, padding, dilation)
        plan = direct_plan(geom, s.shape[2:])
        # in the layout the input was compressed in (its memory order), which backward reads back
        out = direct_forward(x, kept, None if bias is None else bias.detach().contiguous(), s, geom, plan, nhwc=cl)
        ctx.keep_input = keep_input
        ctx.save_for_backward(*((x, kept) if keep_input else (packed, values, kept)))
        ctx.conf = (s, geom, plan, tuple(x.shape), cl, bias is not None, stride, padding, dilation)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.keep_input:  # the same top-K of the same input, with the forward's threshold: the same bits
            x, kept = ctx.saved_tensors
            packed, values, _ = _compress(x, ctx.a_thresh)
        else:
            packed, values, kept = ctx.saved_tensors
        s, geom, plan, shape, cl, has_bias, stride, padding, dilation = ctx.conf
        need = ctx.needs_input_grad
        gx = gw = gb = None
        if need[0]:
            gx = direct_input_grad(grad_out, kept, s, geom, plan, nhwc=cl)
        if need[1]:
            n, c, h, w = shape
            if _compressed_wgrad(values, math.prod(shape), grad_out, s.shape[0], stride):
                gwt = native.compressed_weight_grad(
                    packed,
                    values,
                    (n, h, w, c),
                    grad_out.permute(0, 2, 3, 1).contiguous(),
                    s.shape[2:],
                    _pair(stride),
                    _pair(padding),
                    _pair(dilation),
                    channels_first=not cl,
                )
                gw = gwt.permute(3, 0, 1, 2)
            else:
                gw = torch.nn.grad.conv2d_weight(
                    _decompress(packed, values, shape, cl), s.shape, grad_out, stride, padding, dilation
                )
        if has_bias and need[2]:
            gb = grad_out.sum((0, 2, 3))
        return gx, gw, gb, None, None, None, None, None, None


def _pair(v):
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def swat_conv2d(x, weight, bias, w_mask, w_thresh, a_thresh, stride=1, padding=0, dilation=1, groups=1):
    """Conv2d with W_s (``weight * w_mask``, or the weights with |w| >= ``w_thresh`` when ``w_mask`` is None),
    saving for backward only the input entries with |x| >= ``a_thresh``, compressed."""
    return _SWATConv2dFn.apply(x, weight, bias, w_mask, w_thresh, a_thresh, stride, padding, dilation, groups)


def swat_linear(x, weight, bias, w_mask, w_thresh, a_thresh):
    """Linear counterpart of :func:`swat_conv2d`."""
    return _SWATLinearFn.apply(x, weight, bias, w_mask, w_thresh, a_thresh)


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
        # in forward the weight is whole; outside it (a budget change) a sharded weight is gathered once
        w = whole(self.weight)
        if self.structure:
            self.w_mask.copy_(parse_scheme(self.structure).mask(w.abs(), self.density))
        else:
            self.w_thresh.copy_(topk_threshold(w, self.density))

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

    @torch.no_grad()
    def _maybe_refresh(self, x: torch.Tensor) -> None:
        if self.training and int(self.steps) % self.period == 0:
            self.refresh_weights()
            a_thresh, share = threshold_and_share(x, self.act_density)
            self.a_thresh.copy_(a_thresh)
            self.act_kept.fill_(share)
        if self.training:
            self.steps += 1

    def weight_density(self) -> float:
        return self.kept_weights() / self.weight.numel()

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", swat(density={self.density:.3f}, act_density={self.act_density:.3f}, period={self.period})"
        )


def refuse_traced(x: torch.Tensor, layer: nn.Module) -> None:
    """SWAT's layers compute through autograd Functions and kernels of their own, with data-dependent sizes (the
    top-K inputs), which an exporter or ``torch.func``'s transforms cannot trace: refuse those inputs with the layer
    named and what runs instead. (``torch.compile`` runs the layers at a graph break, on real tensors.)"""
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

    @torch.compiler.disable
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
        if self.runs_direct(x):
            return _SWATDirectConv2dFn.apply(
                x,
                self.weight,
                self.bias,
                self.w_thresh,
                self.a_thresh,
                _pair(self.stride),
                _pair(self.padding),
                _pair(self.dilation),
                self.keeps_input,
            )
        return swat_conv2d(
            x,
            self.weight,
            self.bias,
            self.w_mask if self.structure else None,
            self.w_thresh,
            self.a_thresh,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )


class SWATLinear(_SWATMixin, nn.Linear):
    """A Linear trained the SWAT way (made by :func:`convert`)."""

    @torch.compiler.disable
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
