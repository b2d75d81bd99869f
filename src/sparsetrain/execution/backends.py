"""Execution backends: how a masked Conv2d/Linear really computes.

* ``masked`` — masked dense tensors (the reference and the fallback): exact zeros, dense cost.
* ``csr`` — PyTorch's CSR sparse-dense products. Forward W_s·X, input gradient W_sᵀ·dY
  (CSR of the transpose), and the weight gradient only at kept positions
  (``torch.sparse.sampled_addmm``). Convolutions run as a product over unfolded inputs
  (1x1 convolutions need no unfolding). The sparsity *structure* (row pointers, column
  indices, the transpose's permutation) is rebuilt only when the mask changes; each
  step gathers the kept values from the weight, so any optimizer keeps working on the
  ordinary dense parameter.
* ``direct`` — our C kernels (:mod:`sparsetrain.native`) for convolutions: every kept
  weight is one shifted multiply-add over an output plane (or, for feature maps of 16 x 16
  and smaller, over the batch laid innermost), in forward, input gradient and kept-weight
  gradient alike. Work is in proportion to the kept weights and there is no unfolded copy
  of the input. Float32 on the CPU; Linear layers, and whatever the kernels do not cover,
  take the CSR path.
* ``condensed`` — our C kernels for Linear layers (:mod:`sparsetrain.native`, ``condensed.c``): the kept
  weights are listed row by row (for a constant fan-in mask, ``[out, k]`` values and input indices), and
  tokens are taken in blocks of 64, transposed in cache so that every kept weight is one vector
  multiply-add over the block. Forward, input gradient and kept-weight gradient all cost nnz x tokens
  multiply-adds; the row lists are rebuilt only when the mask changes. Any mask runs (constant fan-in keeps
  rows even); convolutions under it take the ``direct`` kernels. Float32 on the CPU; elsewhere CSR.
* ``channel`` — masks of whole output channels (``sparsity.scheme=channel_out``): the layer
  runs as a smaller dense layer over its kept filters (fewer output channels in forward,
  input gradient and weight gradient alike) and its output is re-expanded to full width
  (a dropped channel carries only its bias, exactly as under masked dense); the kept set
  is re-read when the mask changes.
* ``semi_structured`` — 2:4 masks on Linear layers with PyTorch's semi-structured sparse
  tensors (sparse tensor cores: CUDA GPUs of compute capability 8.0 and newer). W_s is
  compressed once per step (the weights change every step) and used for the forward
  product; the input gradient uses W_s dense and the weight gradient is masked. Refused
  with a clear message where no such GPU exists.
* ``auto`` — per layer, whichever is fastest, timed once on the layer's real input shape
  when training starts (a layer never runs slower than masked dense because of us); then
  :func:`settle_layout` checks the whole step: the sparse kernels want NCHW, dense convolutions
  channels-last, and what lies between layers (BatchNorm, pooling, the residual adds) follows
  the layout, so the per-layer choices in NCHW are timed against every layer masked dense in
  channels-last, and the faster whole step is kept.

:func:`apply_backend` swaps the layers of a model (same parameters, so optimizers and
state dicts are untouched); the masks come from a :class:`~sparsetrain.masks.MaskSet`.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import native

__all__ = ["direct_plan", "direct_geometry", "direct_forward", "direct_input_grad", "settle_layout", "near_tie", "choose_now", "TIMING_SHARE", "CSRStructure", "CondensedStructure", "DirectStructure", "csr_linear", "csr_conv2d", "direct_conv2d", "condensed_linear", "SparseLinear",
           "SparseConv2d",
           "apply_backend", "check_two_four", "kept_channels", "semi_structured_available", "BACKENDS"]

BACKENDS = ("masked", "csr", "direct", "condensed", "channel", "semi_structured", "auto")


def _direct_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The direct kernels cover float32 on the CPU (and need the compiled library)."""
    return x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu" and native.available()
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


@dataclass
class CSRStructure:
    """The fixed part of a CSR matrix for a 2-D mask [rows, cols], and of its transpose."""

    shape: tuple[int, int]
    flat_index: torch.Tensor  # positions of the kept entries in the row-major dense matrix (CSR order)
    crow: torch.Tensor
    col: torch.Tensor
    crow_t: torch.Tensor
    col_t: torch.Tensor
    perm_t: torch.Tensor  # CSR-of-transpose order, as indices into this matrix's value order

    @classmethod
    def from_mask(cls, mask2d: torch.Tensor) -> "CSRStructure":
        rows, cols = mask2d.shape
        idx = mask2d.reshape(-1).nonzero().squeeze(1)
        r, c = idx // cols, idx % cols
        crow = torch.zeros(rows + 1, dtype=torch.int64, device=mask2d.device)
        crow[1:] = torch.bincount(r, minlength=rows).cumsum(0)
        order_t = torch.argsort(c * rows + r)  # column-major order = row-major of the transpose
        crow_t = torch.zeros(cols + 1, dtype=torch.int64, device=mask2d.device)
        crow_t[1:] = torch.bincount(c, minlength=cols).cumsum(0)
        return cls((rows, cols), idx, crow, c, crow_t, r[order_t], order_t)

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        """The sparse weight as a CSR matrix with ``values`` at the kept positions."""
        return torch.sparse_csr_tensor(self.crow, self.col, values, self.shape, check_invariants=False)

    def matrix_t(self, values: torch.Tensor) -> torch.Tensor:
        """The transposed sparse weight as a CSR matrix (for the input gradient)."""
        return torch.sparse_csr_tensor(self.crow_t, self.col_t, values[self.perm_t], self.shape[::-1], check_invariants=False)

    def dense_grad(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A dense gradient for the weight with ``values`` at the kept positions and zeros elsewhere."""
        out = torch.zeros(like.numel(), dtype=values.dtype, device=values.device)
        out[self.flat_index] = values
        return out.view_as(like)


@dataclass
class CondensedStructure:
    """The kept entries of a Linear weight [out, in], listed row by row in the values' order, as the condensed
    kernels read them: row pointers (int64) and each entry's input (int32), nothing else (compact layers keep
    only this beside their values: at 90% sparsity, 4 bytes per kept weight)."""

    shape: tuple[int, int]
    rows: tuple[torch.Tensor, torch.Tensor]  # row_ptr [out + 1], col [nnz]
    _index: torch.Tensor | None = None  # flat_index, cached for layers that gather from a dense weight every step

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
        """The kept values of a dense ``weight``, in row order (differentiable)."""
        if self._index is None:
            self._index = self.flat_index
        return weight.reshape(-1)[self._index]

    def dense(self, values: torch.Tensor) -> torch.Tensor:
        """The matrix with ``values`` at the kept positions and zeros elsewhere."""
        out = values.new_zeros(math.prod(self.shape))
        out[self.flat_index.to(values.device)] = values
        return out.view(self.shape)


def _sampled(structure: CSRStructure, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a @ b) at the kept positions only, in CSR value order."""
    template = structure.matrix(torch.zeros(structure.flat_index.numel(), dtype=a.dtype, device=a.device))
    return torch.sparse.sampled_addmm(template, a, b, beta=0.0).values()


class _CSRLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, structure: CSRStructure):
        values = weight.reshape(-1)[structure.flat_index]
        x2 = x.reshape(-1, x.shape[-1])
        out = (structure.matrix(values) @ x2.t()).t()
        if bias is not None:
            out = out + bias
        ctx.save_for_backward(x, weight)
        ctx.structure, ctx.has_bias = structure, bias is not None
        return out.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        s = ctx.structure
        g2 = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            values = weight.reshape(-1)[s.flat_index]
            gx = (s.matrix_t(values) @ g2.t()).t().reshape(x.shape)
        if ctx.needs_input_grad[1]:
            gw = s.dense_grad(_sampled(s, g2.t().contiguous(), x.reshape(-1, x.shape[-1]).contiguous()), weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb, None


def csr_linear(x, weight, bias, structure: CSRStructure):
    """Linear with only the weights in ``structure`` (the rest are zero), via CSR products."""
    return _CSRLinearFn.apply(x, weight, bias, structure)


class _CondensedLinearFn(torch.autograd.Function):
    """Linear over the kept weights given as ``values`` (in the structure's row order); their gradient comes back
    in the same compact form, so a layer may store nothing else."""

    @staticmethod
    def forward(ctx, x, values, bias, structure: CondensedStructure):
        x2 = x.detach().reshape(-1, x.shape[-1]).contiguous()
        values = values.detach().contiguous()
        out = native.condensed_forward(x2, values, None if bias is None else bias.detach().contiguous(), structure.rows,
                                       structure.shape[0])
        ctx.save_for_backward(x, values)
        ctx.structure, ctx.has_bias = structure, bias is not None
        return out.reshape(*x.shape[:-1], -1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, values = ctx.saved_tensors
        s = ctx.structure
        g2 = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()
        gx, gv = native.condensed_backward(x.reshape(-1, x.shape[-1]).contiguous(), g2, values, s.rows,
                                           ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return None if gx is None else gx.reshape(x.shape), gv, gb, None


def condensed_linear(x, weight, bias, structure: CondensedStructure):
    """Linear (float32, CPU) computing only the kept weights in ``structure``, nnz x tokens multiply-adds through
    the condensed C kernels. ``weight`` is the dense weight, or (compact storage) just the kept values in the
    structure's row order."""
    values = weight if weight.dim() == 1 else structure.gather(weight)
    return _CondensedLinearFn.apply(x, values, bias, structure)


class _CSRConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, structure: CSRStructure, stride, padding, dilation):
        n, _, h, w = x.shape
        cout, _, kh, kw = weight.shape
        ho, wo = _conv_out_size((h, w), (kh, kw), stride, padding, dilation)
        cols = _unfold(x, (kh, kw), dilation, padding, stride)  # [Cin*kh*kw, N*L]
        values = weight.reshape(-1)[structure.flat_index]
        out = structure.matrix(values) @ cols  # [Cout, N*L]
        out = out.view(cout, n, ho, wo).permute(1, 0, 2, 3)
        if bias is not None:
            out = out + bias.view(1, -1, 1, 1)
        ctx.save_for_backward(x, weight)
        ctx.conf = (structure, stride, padding, dilation, bias is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        s, stride, padding, dilation, has_bias = ctx.conf
        n, cin, h, w = x.shape
        cout, _, kh, kw = weight.shape
        g2 = grad_out.permute(1, 0, 2, 3).reshape(cout, -1).contiguous()  # [Cout, N*L]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            values = weight.reshape(-1)[s.flat_index]
            gcols = s.matrix_t(values) @ g2  # [Cin*kh*kw, N*L]
            gcols = gcols.view(cin * kh * kw, n, -1).permute(1, 0, 2)
            gx = F.fold(gcols, (h, w), (kh, kw), dilation=dilation, padding=padding, stride=stride)
        if ctx.needs_input_grad[1]:
            cols = _unfold(x, (kh, kw), dilation, padding, stride)
            gw = s.dense_grad(_sampled(s, g2, cols.t().contiguous()), weight)
        if has_bias and ctx.needs_input_grad[2]:
            gb = grad_out.sum((0, 2, 3))
        return gx, gw, gb, None, None, None, None


@dataclass
class DirectStructure:
    """The kept entries of a conv weight [Cout, Cin, KH, KW], listed by output and by input channel.

    ``flat_index`` gives each entry's position in the weight (row-major, so grouped by output
    channel); the by-input-channel lists carry each entry's index into that order.
    """

    shape: tuple[int, int, int, int]
    flat_index: torch.Tensor | None  # None for lists made from a threshold (SWAT's W_s), which carry their values
    by_out: tuple  # co_ptr int64 [Cout+1], ci int32, kh int16, kw int16 (numpy)
    by_in: tuple  # ci_ptr int64 [Cin+1], co int32, kh int16, kw int16, value index int64 (numpy)
    _flipped: tuple | None = None

    @classmethod
    def from_mask(cls, mask4d: torch.Tensor) -> "DirectStructure":
        cout, cin, kh, kw = mask4d.shape
        idx = mask4d.reshape(-1).nonzero().squeeze(1).cpu()
        co, rest = idx // (cin * kh * kw), idx % (cin * kh * kw)
        ci, r = rest // (kh * kw), rest % (kh * kw)
        h, w = r // kw, r % kw
        co_ptr = torch.zeros(cout + 1, dtype=torch.int64)
        co_ptr[1:] = torch.bincount(co, minlength=cout).cumsum(0)
        order = torch.argsort(ci * cout + co, stable=True)
        ci_ptr = torch.zeros(cin + 1, dtype=torch.int64)
        ci_ptr[1:] = torch.bincount(ci, minlength=cin).cumsum(0)
        np_ = lambda t, dt: np.ascontiguousarray(t.numpy().astype(dt))  # noqa: E731
        by_out = (np_(co_ptr, np.int64), np_(ci, np.int32), np_(h, np.int16), np_(w, np.int16))
        by_in = (np_(ci_ptr, np.int64), np_(co[order], np.int32), np_(h[order], np.int16), np_(w[order], np.int16),
                 np_(order, np.int64))
        return cls(tuple(mask4d.shape), idx, by_out, by_in)

    def by_in_flipped(self) -> tuple:
        """The by-input lists with the kernel flipped (kh -> KH-1-kh, kw -> KW-1-kw) and each entry's value index:
        the input gradient of a stride-1 convolution is the convolution of the padded output gradient with them."""
        if self._flipped is None:
            ptr, co, kh, kw, vidx = self.by_in
            kh_n, kw_n = self.shape[2:]
            self._flipped = (ptr, co, (kh_n - 1 - kh).astype(np.int16), (kw_n - 1 - kw).astype(np.int16),
                             torch.from_numpy(vidx))
        return self._flipped

    def dense(self, values: torch.Tensor) -> torch.Tensor:
        """The weight with ``values`` at the kept entries and zeros elsewhere."""
        out = values.new_zeros(math.prod(self.shape))
        out[self.flat_index] = values
        return out.view(self.shape)


_BATCH_INNER_BELOW = 512  # output planes of 16 x 16 and smaller run with the batch innermost


def _kernel_layout(t: torch.Tensor, batch_inner: bool) -> torch.Tensor:
    """``t`` as the kernels read it: contiguous NCHW, or [C, H, W, N] with the batch innermost."""
    return t.permute(1, 2, 3, 0).contiguous() if batch_inner else t.contiguous()


def _tiled(geom: np.ndarray, kernel: tuple[int, int]) -> tuple[bool, bool]:
    """Which products run on the register-tiled kernels: (forward and weight gradient, input gradient). Both need
    stride 1 and dilation 1; the first an output, the second an input, of planes 1, 2 or 4 vectors wide (8, 16 or
    32 columns with AVX2, 16, 32 or 64 with AVX-512; any height); the second also padding within the kernel (so that
    the input gradient is a convolution too)."""
    _, _, h, w, _, ho, wo, sh, sw, ph, pw, dh, dw = (int(v) for v in geom)
    if not sh == sw == dh == dw == 1:
        return False, False
    return native.tiled_supported(ho, wo), 0 <= ph < kernel[0] and 0 <= pw < kernel[1] and native.tiled_supported(h, w)


_pad_buffer = threading.local()


def _padded(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """``x`` [N, C, H, W] zero-padded by (ph, pw), in one reused buffer per thread (valid until the next call):
    the tiled kernels read it and let go before returning. A fresh ``F.pad`` would fault in and fill a new
    tensor every time, which costs as much as a small layer's kernel; here only the border is zeroed. Backward
    passes use it; the forward pass releases it (:func:`_release_padded`), so that it is not held through the
    step's peak, when every saved activation is alive."""
    n, c, h, w = x.shape
    hp, wp = h + 2 * ph, w + 2 * pw
    size = n * c * hp * wp
    buf = getattr(_pad_buffer, "buf", None)
    if buf is None or buf.numel() < size or buf.dtype != x.dtype:
        buf = _pad_buffer.buf = torch.empty(size, dtype=x.dtype)
    xp = buf[:size].view(n, c, hp, wp)
    if ph:
        xp[:, :, :ph].zero_()
        xp[:, :, hp - ph:].zero_()
    if pw:
        xp[:, :, :, :pw].zero_()
        xp[:, :, :, wp - pw:].zero_()
    xp[:, :, ph:ph + h, pw:pw + w].copy_(x)
    return xp


def _release_padded() -> None:
    _pad_buffer.buf = None


def direct_plan(geom: np.ndarray, kernel: tuple[int, int]) -> tuple[bool, bool, bool]:
    """How the direct kernels run a convolution of geometry ``geom``: (batch innermost, forward and weight gradient
    tiled, input gradient tiled)."""
    tiled, tiled_in = _tiled(geom, kernel)
    return not (tiled or tiled_in) and int(geom[5]) * int(geom[6]) < _BATCH_INNER_BELOW, tiled, tiled_in


def direct_geometry(x_shape, kernel_shape, stride, padding, dilation) -> np.ndarray:
    """N, Cin, H, W, Cout, Ho, Wo, strides, paddings, dilations (int64), as the direct kernels read them."""
    n, cin, h, w = x_shape
    cout, _, kh, kw = kernel_shape
    ho, wo = _conv_out_size((h, w), (kh, kw), stride, padding, dilation)
    return np.array([n, cin, h, w, cout, ho, wo, *stride, *padding, *dilation], dtype=np.int64)


def direct_forward(x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, structure: DirectStructure,
                   geom: np.ndarray, plan: tuple[bool, bool, bool]) -> torch.Tensor:
    """The convolution over the kept weights (``values`` in the structure's order), NCHW out."""
    bi, tiled, _ = plan
    n, cout, ho, wo = (int(geom[i]) for i in (0, 4, 5, 6))
    out = torch.empty((cout, ho, wo, n) if bi else (n, cout, ho, wo), dtype=x.dtype)
    if tiled:
        ph, pw = int(geom[9]), int(geom[10])
        _release_padded()
        native.tiled_conv(F.pad(x.detach().contiguous(), (pw, pw, ph, ph)), values, bias, structure.by_out, out)
    else:
        native.sparse_conv_forward(geom, _kernel_layout(x.detach(), bi), values, bias, structure.by_out, out,
                                   batch_inner=bi)
    return out.permute(3, 0, 1, 2) if bi else out


def direct_input_grad(grad_out: torch.Tensor, values: torch.Tensor, structure: DirectStructure, geom: np.ndarray,
                      plan: tuple[bool, bool, bool]) -> torch.Tensor:
    """The input gradient of :func:`direct_forward`, NCHW."""
    bi, _, tiled_in = plan
    n, cin, h, w = (int(v) for v in geom[:4])
    g = _kernel_layout(grad_out, bi)
    gx = torch.empty((cin, h, w, n) if bi else (n, cin, h, w), dtype=g.dtype)
    if tiled_in:  # the padded output gradient convolved with the flipped kernel, listed by input channel
        kh, kw = structure.shape[2:]
        ph, pw = int(geom[9]), int(geom[10])
        ptr, co, fkh, fkw, vidx = structure.by_in_flipped()
        native.tiled_conv(_padded(g, kh - 1 - ph, kw - 1 - pw), values[vidx].contiguous(), None, (ptr, co, fkh, fkw), gx)
    else:
        native.sparse_conv_backward_input(geom, g, values, structure.by_in, gx, batch_inner=bi)
    return gx.permute(3, 0, 1, 2) if bi else gx


class _DirectConv2dFn(torch.autograd.Function):
    """Convolution over the kept weights given as ``values`` (in the structure's order); their gradient comes
    back in the same compact form, so a layer may store nothing else."""

    @staticmethod
    def forward(ctx, x, values, bias, structure: DirectStructure, stride, padding, dilation):
        geom = direct_geometry(x.shape, structure.shape, stride, padding, dilation)
        plan = direct_plan(geom, structure.shape[2:])
        values = values.detach().contiguous()
        out = direct_forward(x, values, None if bias is None else bias.detach().contiguous(), structure, geom, plan)
        # the input as given: usually the tensor the layer before saves anyway, where a re-laid copy would be extra memory
        ctx.save_for_backward(x, values)
        ctx.conf = (structure, geom, bias is not None, plan)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, values = ctx.saved_tensors
        s, geom, has_bias, plan = ctx.conf
        bi, tiled, _ = plan
        gx = gv = gb = None
        if ctx.needs_input_grad[0]:
            gx = direct_input_grad(grad_out, values, s, geom, plan)
        if ctx.needs_input_grad[1]:
            if tiled:
                ph, pw = int(geom[9]), int(geom[10])
                gv = native.tiled_conv_weight_grad(_padded(x, ph, pw), grad_out.contiguous(),
                                                   s.by_out, values.numel())
            else:
                gv = native.sparse_conv_backward_weight(geom, _kernel_layout(x, bi), _kernel_layout(grad_out, bi),
                                                        s.by_out, values.numel(), batch_inner=bi)
        if has_bias and ctx.needs_input_grad[2]:
            gb = grad_out.sum((0, 2, 3))
        return gx, gv, gb, None, None, None, None


def direct_conv2d(x, weight, bias, structure: DirectStructure, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """Conv2d (groups=1, float32, CPU) computing only the kept weights in ``structure``: no unfolded copy,
    work in proportion to the kept entries (the C kernels of :mod:`sparsetrain.native`). ``weight`` is the
    dense weight, or (compact storage) just the kept values in the structure's order."""
    values = weight if weight.dim() == 1 else weight.reshape(-1)[structure.flat_index]
    return _DirectConv2dFn.apply(x, values, bias, structure, tuple(stride), tuple(padding), tuple(dilation))


def _conv_out_size(size, kernel, stride, padding, dilation) -> tuple[int, int]:
    """Output height and width of a convolution."""
    return tuple((size[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2))


def _unfold(x, kernel, dilation, padding, stride) -> torch.Tensor:
    """Input columns [Cin*kh*kw, N*L] for a convolution as one matrix product (a 1x1 stride-1 conv needs no copy of patches)."""
    n, cin = x.shape[:2]
    if kernel == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0):
        return x.permute(1, 0, 2, 3).reshape(cin, -1)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [N, Cin*k*k, L]
    return cols.permute(1, 0, 2).reshape(cols.shape[1], -1)


def csr_conv2d(x, weight, bias, structure: CSRStructure, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """Conv2d (groups=1) with only the weights in ``structure``, as a CSR product over unfolded input."""
    return _CSRConv2dFn.apply(x, weight, bias, structure, tuple(stride), tuple(padding), tuple(dilation))


class _SparseExec:
    """What the swapped layers share: the MaskSet they follow, the cached structure, the chosen path."""

    def _init_exec(self, maskset, name: str, backend: str):
        self.maskset, self.mask_name = maskset, name
        self.backend = backend  # "masked", "csr", or "auto" until the first forward decides
        self.ran: str | None = None  # the path the last training forward took (a fallback shows here)
        self._structures: dict[str, object] = {}
        self._version_seen = -1
        self.rebuilds = 0

    def structure(self, kind: str = "csr"):
        """The CSR (``"csr"``), direct-kernel (``"direct"``), condensed (``"condensed"``) or kept-channel (``"channel"``) structure of the
        current mask, rebuilt only when the MaskSet's masks changed."""
        if self._version_seen != self.maskset.version:
            self._structures.clear()
            self._version_seen = self.maskset.version
        if kind not in self._structures:
            mask = self.maskset.masks[self.mask_name]
            if kind == "direct":
                self._structures[kind] = DirectStructure.from_mask(mask)
            elif kind == "condensed":
                self._structures[kind] = CondensedStructure.from_mask(mask)
            elif kind == "channel":
                self._structures[kind] = kept_channels(mask, self.mask_name)
            else:
                self._structures[kind] = CSRStructure.from_mask(mask.reshape(mask.shape[0], -1))
            self.rebuilds += 1
        return self._structures[kind]

    def candidates(self, x: torch.Tensor) -> tuple[str, ...]:
        """The backends that can run this layer on ``x``."""
        return ("masked", "csr")

    def _choose(self, x: torch.Tensor) -> None:
        """Time every candidate backend (forward + backward) on this input; keep the fastest."""
        timings = {}
        for name in self.candidates(x):
            self.backend = name
            best = float("inf")
            for _ in range(5):  # the minimum of five: three let a noisy moment flip layers that differ by 10%
                xi = x.detach().requires_grad_(x.requires_grad)
                t = time.perf_counter()
                out = self._run(xi)
                out.backward(torch.ones_like(out))
                best = min(best, time.perf_counter() - t)
            timings[name] = best
        self.weight.grad = None
        if self.bias is not None:
            self.bias.grad = None
        self.timings = timings
        self.backend = min(timings, key=timings.get)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            names = list(timings)  # the same candidates on every rank: same layer, same input shape
            choice = torch.tensor([names.index(self.backend)])
            dist.broadcast(choice, 0)  # timings differ by rank; the choice must not
            self.backend = names[int(choice)]

    def fix_backend(self, backend: str) -> None:
        """Use ``backend`` from now on (a resumed run keeps the choice it made, instead of timing again)."""
        self.backend = backend

    def forward(self, x):
        if self.backend == "auto" and self.training and torch.is_grad_enabled():
            self._choose(x)
        if self.training:
            self.ran = self._path(x)
        out = self._run(x)
        if self.training and out.requires_grad and self.maskset.capture_dense_grad and self.ran != "masked":
            # the sparse paths compute the kept weights' gradient only; a step whose update grows by the dense
            # gradient (RigL's) computes the full one as well, with one dense product, kept until it is read
            out.register_hook(lambda g, x=x.detach(): self.maskset.captured.__setitem__(
                self.mask_name, self._dense_weight_grad(x, g)))
        return out

    def _path(self, x: torch.Tensor) -> str:
        """The path :meth:`_run` takes for ``x`` under the chosen backend."""
        return self.backend


def kept_channels(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """Indices of the output channels a channel-structured mask keeps; refuses masks that cut inside a channel."""
    rows = mask.reshape(mask.shape[0], -1)
    kept, full = rows.any(1), rows.all(1)
    if not torch.equal(kept, full):
        raise ValueError(f"{name}: the mask keeps part of {int((kept & ~full).sum())} output channel(s); the channel "
                         "backend needs whole channels (sparsity.scheme=channel_out)")
    return kept.nonzero().squeeze(1)


def _expand_channels(small: torch.Tensor, kept: torch.Tensor, width: int, bias: torch.Tensor | None, dim: int) -> torch.Tensor:
    """``small``'s channels placed at ``kept`` in a tensor ``width`` channels wide along ``dim``; the rest hold the bias."""
    shape = list(small.shape)
    shape[dim] = width
    fmt = torch.channels_last if small.dim() == 4 and not small.is_contiguous() and small.is_contiguous(
        memory_format=torch.channels_last) else torch.contiguous_format
    if bias is None:
        base = small.new_zeros(shape).contiguous(memory_format=fmt)
    else:
        view = [1] * len(shape)
        view[dim] = width
        base = bias.view(view).expand(shape).contiguous(memory_format=fmt)
    return base.index_copy(dim, kept, small)


def check_two_four(mask: torch.Tensor, name: str = "mask") -> None:
    """Refuse a mask that keeps more than 2 of any 4 consecutive weights along the input dimension."""
    if mask.shape[-1] % 4:
        raise ValueError(f"{name}: 2:4 sparsity needs the input dimension to be a multiple of 4, got {tuple(mask.shape)}")
    worst = int(mask.reshape(-1, 4).sum(1).max()) if mask.numel() else 0
    if worst > 2:
        raise ValueError(f"{name}: not 2:4 sparse (a group of 4 input weights keeps {worst}); use sparsity.scheme=nm_2:4")


def semi_structured_available(device: torch.device | str | None = None) -> str | None:
    """None if 2:4 semi-structured tensors can run here, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA GPU (2:4 semi-structured sparsity runs on sparse tensor cores, compute capability 8.0+)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"the GPU's compute capability is {major}.{minor}; 2:4 semi-structured sparsity needs 8.0 or newer"
    return None


class _SemiStructuredLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mask):
        w_s = weight * mask
        packed = torch.sparse.to_sparse_semi_structured(w_s.detach())
        x2 = x.reshape(-1, x.shape[-1])
        out = F.linear(x2, packed, bias)
        ctx.save_for_backward(x, w_s, mask)
        ctx.has_bias = bias is not None
        return out.reshape(*x.shape[:-1], -1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, w_s, mask = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        gx = (g2 @ w_s).reshape(x.shape) if ctx.needs_input_grad[0] else None
        gw = (g2.t() @ x.reshape(-1, x.shape[-1])) * mask if ctx.needs_input_grad[1] else None
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


class SparseLinear(_SparseExec, nn.Linear):
    """A Linear that computes with the backend chosen for it (made by :func:`apply_backend`)."""

    def _dense_weight_grad(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """The full weight gradient [out, in] of this layer for input ``x`` and output gradient ``grad_out``."""
        return grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1])

    def candidates(self, x: torch.Tensor) -> tuple[str, ...]:
        return ("masked", "csr", "condensed") if _direct_ok(x, self.weight) else ("masked", "csr")

    def _path(self, x: torch.Tensor) -> str:
        if self.backend == "direct" or (self.backend == "condensed" and not _direct_ok(x, self.weight)):
            return "csr"  # a Linear's direct path is the CSR product; what the condensed kernels do not cover, too
        return self.backend

    def _run(self, x):
        if self.backend == "semi_structured":
            return _SemiStructuredLinearFn.apply(x, self.weight, self.bias, self.maskset.masks[self.mask_name])
        if self.backend == "channel":
            kept = self.structure("channel")
            small = F.linear(x, self.weight.index_select(0, kept), None if self.bias is None else self.bias.index_select(0, kept))
            return _expand_channels(small, kept, self.out_features, self.bias, small.dim() - 1)
        if self.backend == "condensed" and _direct_ok(x, self.weight):
            return condensed_linear(x, self.weight, self.bias, self.structure("condensed"))
        if self.backend in ("csr", "direct", "condensed"):  # a Linear is a matrix product: CSR is its direct path
            # ("auto" not decided yet, e.g. in evaluation, runs masked dense)
            return csr_linear(x, self.weight, self.bias, self.structure())
        return F.linear(x, self.weight, self.bias)  # masked dense: the MaskSet keeps masked weights at zero


class SparseConv2d(_SparseExec, nn.Conv2d):
    """A Conv2d that computes with the backend chosen for it (made by :func:`apply_backend`)."""

    def _dense_weight_grad(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """The full weight gradient of this (ungrouped) convolution for input ``x`` and output gradient ``grad_out``."""
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        return torch.nn.grad.conv2d_weight(x, shape, grad_out, self.stride, self.padding, self.dilation, self.groups)

    def candidates(self, x: torch.Tensor) -> tuple[str, ...]:
        # where the direct kernels run, CSR (an unfolded copy of the input) is slower and far larger: not tried
        found = ("masked", "direct") if _direct_ok(x, self.weight) else ("masked", "csr")
        return (*found, "channel") if self._channel_structured() else found

    def _channel_structured(self) -> bool:
        try:
            self.structure("channel")
            return True
        except ValueError:
            return False

    def _path(self, x: torch.Tensor) -> str:
        if self.backend == "direct" and not _direct_ok(x, self.weight):
            return "csr"  # what the direct kernels do not cover runs on CSR
        return self.backend

    def _run(self, x):
        if self.backend == "channel":
            kept = self.structure("channel")
            small = F.conv2d(x, self.weight.index_select(0, kept), None if self.bias is None else self.bias.index_select(0, kept),
                             self.stride, self.padding, self.dilation, self.groups)
            if getattr(self, "shrink_out", False):  # the next layers read the kept channels alone (channel_pairs.py)
                return small
            return _expand_channels(small, kept, self.out_channels, self.bias, 1)
        if self.backend == "direct" and _direct_ok(x, self.weight):
            return direct_conv2d(x, self.weight, self.bias, self.structure("direct"), self.stride, self.padding, self.dilation)
        if self.backend in ("csr", "direct"):  # direct on what its kernels do not cover: CSR
            return csr_conv2d(x, self.weight, self.bias, self.structure(), self.stride, self.padding, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


TIMING_SHARE = 4  # auto's timing passes run on 1/TIMING_SHARE of a batch (see settle_layout)
NEAR_TIE = 1.1  # settle_layout also tries on the kernels the layers whose kernels came within this factor


def near_tie(layer: nn.Module, chosen: str) -> bool:
    """Whether ``layer``'s kernels ("direct") came within :data:`NEAR_TIE` of its ``chosen`` path in its own
    timings: the layers :func:`settle_layout` also times on the kernels in a second plan."""
    timings = getattr(layer, "timings", {})
    return chosen != "direct" and "direct" in timings and timings["direct"] <= NEAR_TIE * timings[chosen]


def choose_now(model: nn.Module, loss_of) -> None:
    """Let every undecided ``auto`` layer of ``model`` time its paths now, on one forward and backward pass of
    ``loss_of()`` (before compaction, which needs the choice), leaving no gradient behind."""
    loss_of().backward()
    for p in model.parameters():
        p.grad = None


def settle_layout(model: nn.Module, layers: dict[str, nn.Module], loss_of, repeats: int = 4) -> torch.memory_format:
    """The whole-step check of ``auto``: time forward + backward (``loss_of(fmt)``: the loss of a training batch
    given in memory format ``fmt``) with every layer on the path it chooses in NCHW, with the layers near a tie
    (:data:`NEAR_TIE`) on the kernels as well, and with every layer masked dense in channels-last; keep the
    fastest, so ``auto`` is never slower than its dense layers would be.
    Returns the memory format the model's inputs must take from now on (the model is converted to it).
    Parameters, their gradients and BatchNorm statistics are left as they were; data-parallel ranks take rank 0's
    choice. Callers time on a quarter of a training batch (:data:`TIMING_SHARE`): the choices come out the same,
    and the timing passes, which hold every path's activations in turn, stay below a training step's peak."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def timed(plan: dict[str, str] | None) -> float:
        """One forward + backward with the layers on ``plan`` in NCHW, or (None) all masked in channels-last."""
        for n, m in layers.items():
            m.fix_backend(plan.get(n, m.backend) if plan is not None else "masked")
        fmt = torch.contiguous_format if plan is not None else torch.channels_last
        model.to(memory_format=fmt)
        t = time.perf_counter()
        loss_of(fmt).backward()
        return time.perf_counter() - t

    timed({})  # warm-up; undecided layers time their paths here
    choices = {n: m.backend for n, m in layers.items()}
    plans = [choices]
    # layers whose kernels came within 10% of their chosen path: per-layer timings on a part of a batch miss
    # what the layout around them costs, so the whole step is also timed with those on the kernels
    near = {n: "direct" for n, m in layers.items() if near_tie(m, m.backend)}
    if near:
        plans.append({**choices, **near})
    timed(None)
    # the layouts alternate, so that a slow stretch of the machine does not fall on one of them alone
    times = [float("inf")] * (len(plans) + 1)
    for _ in range(repeats):
        for i, plan in enumerate([*plans, None]):
            times[i] = min(times[i], timed(plan))
    best = min(range(len(times)), key=times.__getitem__)
    dense = best == len(plans)
    names = sorted(layers)
    # rank 0 decides for all: its layout and every layer's path (timings, and so the plans tried, differ by rank)
    pick = torch.tensor([int(dense)] + [BACKENDS.index("masked" if dense else plans[best][n]) for n in names])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(pick, 0)
    dense = bool(pick[0])
    for n, code in zip(names, pick[1:].tolist()):
        layers[n].fix_backend(BACKENDS[code])
    t_sparse, t_dense = min(times[:-1]), times[-1]
    fmt = torch.channels_last if dense else torch.contiguous_format
    model.to(memory_format=fmt)
    model.load_state_dict(saved)
    for p in model.parameters():
        p.grad = None
    for m in layers.values():
        m.step_timings = {"sparse_nchw": t_sparse, "masked_channels_last": t_dense}
    return fmt


def apply_backend(model: nn.Module, maskset, backend: str) -> dict[str, nn.Module]:
    """Swap the masked layers of ``model`` to compute with ``backend``; returns them by weight name.

    Grouped convolutions and non-zero padding modes stay masked dense. Layers read their
    masks from the MaskSet and rebuild their CSR structure when its ``version`` moves.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend == "semi_structured":
        device = next(iter(maskset.masks.values())).device
        why = semi_structured_available(device) if device.type == "cuda" else f"the model is on {device.type}, not a CUDA GPU"
        if why:
            raise ValueError(f"backend 'semi_structured' cannot run here: {why}")
    modules = dict(model.named_modules())
    swapped = {}
    for wname in maskset.masks:
        m = modules[wname.rsplit(".", 1)[0] if "." in wname else ""]
        if backend == "channel":
            kept_channels(maskset.masks[wname], wname)  # refuses masks that are not whole channels
        if type(m) is nn.Linear:
            if backend == "semi_structured":
                check_two_four(maskset.masks[wname], wname)
            m.__class__ = SparseLinear
        elif type(m) is nn.Conv2d:
            m.__class__ = SparseConv2d
            # semi-structured covers Linear layers; convolutions stay masked dense under it
            unsupported = m.padding_mode != "zeros" or isinstance(m.padding, str) or backend == "semi_structured"
            if unsupported or m.groups != 1:
                m._init_exec(maskset, wname, "masked")
                swapped[wname] = m
                continue
        else:
            continue
        # under "condensed", convolutions take their own condensed form: the direct kernels
        m._init_exec(maskset, wname, "direct" if backend == "condensed" and isinstance(m, SparseConv2d) else backend)
        swapped[wname] = m
    return swapped
