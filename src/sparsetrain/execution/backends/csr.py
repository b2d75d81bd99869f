"""``csr``: PyTorch's CSR sparse-dense products.

Forward W_s·X, input gradient W_sᵀ·dY (CSR of the transpose), and the weight gradient only at kept positions
(``torch.sparse.sampled_addmm``). Convolutions run as a product over unfolded inputs (1x1 convolutions need no
unfolding). The sparsity *structure* (row pointers, column indices, the transpose's permutation) is rebuilt
only when the mask changes; each step gathers the kept values from the weight, so any optimizer keeps working
on the ordinary dense parameter. It is also the path of what the C kernels do not cover (other dtypes,
devices), and a Linear layer's path under ``direct``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core.masks import dense_from_values
from .. import native
from .registry import Backend, channels_last, direct_ok, register

__all__ = ["CSR", "CSRStructure", "KeptEntries", "channels_last_positions", "csr_linear", "csr_conv2d", "conv_out_size"]


def _csr(crow, col, values, shape) -> torch.Tensor:
    """A CSR tensor, without PyTorch's "support is in beta" warning: the products this backend uses are the ones it
    tests, and the warning would reach users who never asked for CSR tensors themselves."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def conv_out_size(size, kernel, stride, padding, dilation) -> tuple[int, int]:
    """Output height and width of a convolution."""
    return tuple((size[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2))


def channels_last_positions(flat_index: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Where the entries at ``flat_index`` of a 4-D weight's NCHW order lie in its channels-last memory (the order of
    ``weight.permute(0, 2, 3, 1).reshape(-1)``), in ``flat_index``'s dtype."""
    cout, cin, kh, kw = shape
    idx = flat_index.long()
    co, tap, ci = idx // (cin * kh * kw), idx % (kh * kw), idx // (kh * kw) % cin
    return ((co * (kh * kw) + tap) * cin + ci).to(flat_index.dtype)


class KeptEntries:
    """For structures that list a weight's kept entries at ``flat_index`` (its NCHW / row-major positions) and cache
    their channels-last positions in ``_cl_index``: the kept values gathered, and a gradient laid back, in the
    weight's own memory. ``reshape(-1)`` of a channels-last convolution weight is a copy of the whole weight into
    NCHW order (and a gradient built in NCHW order is copied again into the parameter's layout), every call."""

    def _cl_positions(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The kept entries' positions in ``weight``'s memory when it is a channels-last convolution weight."""
        if not channels_last(weight):
            return None
        if self._cl_index is None:
            self._cl_index = channels_last_positions(self.flat_index, tuple(weight.shape))
        return self._cl_index

    def _gather(self, weight: torch.Tensor) -> torch.Tensor:
        """The kept entries of the dense ``weight``, in the lists' order, read in its own memory."""
        cl = self._cl_positions(weight)
        return weight.reshape(-1)[self.flat_index] if cl is None else weight.permute(0, 2, 3, 1).reshape(-1)[cl]


@dataclass
class CSRStructure(KeptEntries):
    """The fixed part of a CSR matrix for a 2-D mask [rows, cols], and of its transpose."""

    shape: tuple[int, int]
    flat_index: torch.Tensor  # positions of the kept entries in the row-major dense matrix (CSR order)
    crow: torch.Tensor
    col: torch.Tensor
    crow_t: torch.Tensor
    col_t: torch.Tensor
    perm_t: torch.Tensor  # CSR-of-transpose order, as indices into this matrix's value order
    _cl_index: torch.Tensor | None = None  # the entries' positions in a channels-last weight (see values_of)

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
        return _csr(self.crow, self.col, values, self.shape)

    def matrix_t(self, values: torch.Tensor) -> torch.Tensor:
        """The transposed sparse weight as a CSR matrix (for the input gradient)."""
        return _csr(self.crow_t, self.col_t, values[self.perm_t], self.shape[::-1])

    def values_of(self, weight: torch.Tensor) -> torch.Tensor:
        """The kept entries of ``weight`` in CSR order, read in the weight's own memory (see :class:`KeptEntries`)."""
        return self._gather(weight)

    def dense_grad(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A dense gradient for the weight with ``values`` at the kept positions and zeros elsewhere, in the
        weight's own layout (else the gradient is copied into it once more)."""
        cl = self._cl_positions(like)
        if cl is None:
            return dense_from_values(values, self.flat_index, like.shape)
        cout, cin, kh, kw = like.shape
        return dense_from_values(values, cl, (cout, kh, kw, cin)).permute(0, 3, 1, 2)


def _sampled(structure: CSRStructure, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a @ b) at the kept positions only, in CSR value order."""
    template = structure.matrix(torch.zeros(structure.flat_index.numel(), dtype=a.dtype, device=a.device))
    return torch.sparse.sampled_addmm(template, a, b, beta=0.0).values()


# PyTorch's CSR products have no bfloat16 kernels: under CPU autocast these layers take their inputs in float32 and
# compute with autocast off (a float32 output), as the native kernels' operators do
_FLOAT32_UNDER_AUTOCAST = torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
_AUTOCAST_AS_FORWARD = torch.amp.custom_bwd(device_type="cpu")


class _CSRLinearFn(torch.autograd.Function):
    @staticmethod
    @_FLOAT32_UNDER_AUTOCAST
    def forward(ctx, x, weight, bias, structure: CSRStructure):
        values = structure.values_of(weight)
        x2 = x.reshape(-1, x.shape[-1])
        out = (structure.matrix(values) @ x2.t()).t()
        if bias is not None:
            out = out + bias
        ctx.save_for_backward(x, weight)
        ctx.structure, ctx.has_bias = structure, bias is not None
        return out.reshape(*x.shape[:-1], -1)

    @staticmethod
    @_AUTOCAST_AS_FORWARD
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        s = ctx.structure
        g2 = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            values = s.values_of(weight)
            gx = (s.matrix_t(values) @ g2.t()).t().reshape(x.shape)
        if ctx.needs_input_grad[1]:
            gw = s.dense_grad(_sampled(s, g2.t().contiguous(), x.reshape(-1, x.shape[-1]).contiguous()), weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb, None


def _refuse_export() -> None:
    """``torch.export`` traces without graph breaks, and PyTorch's CSR tensors cannot be built from the fake tensors
    it traces with: say so (``torch.compile`` runs them at a graph break)."""
    if torch.compiler.is_exporting():
        raise native.NoDataError(
            "torch.export cannot capture PyTorch's sparse CSR products; export over execution='masked' (or "
            "'condensed' for Linear layers), or over the model sp.remove() returns"
        )


def csr_linear(x, weight, bias, structure: CSRStructure):
    """Linear with only the weights in ``structure`` (the rest are zero), via CSR products."""
    _refuse_export()
    return _CSRLinearFn.apply(x, weight, bias, structure)


class _CSRConv2dFn(torch.autograd.Function):
    @staticmethod
    @_FLOAT32_UNDER_AUTOCAST
    def forward(ctx, x, weight, bias, structure: CSRStructure, stride, padding, dilation):
        n, _, h, w = x.shape
        cout, _, kh, kw = weight.shape
        ho, wo = conv_out_size((h, w), (kh, kw), stride, padding, dilation)
        cols = _unfold(x, (kh, kw), dilation, padding, stride)  # [Cin*kh*kw, N*L]
        values = structure.values_of(weight)
        out = structure.matrix(values) @ cols  # [Cout, N*L]
        out = out.view(cout, n, ho, wo).permute(1, 0, 2, 3)
        if bias is not None:
            out = out + bias.view(1, -1, 1, 1)
        ctx.save_for_backward(x, weight)
        ctx.conf = (structure, stride, padding, dilation, bias is not None)
        return out

    @staticmethod
    @_AUTOCAST_AS_FORWARD
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        s, stride, padding, dilation, has_bias = ctx.conf
        n, cin, h, w = x.shape
        cout, _, kh, kw = weight.shape
        g2 = grad_out.permute(1, 0, 2, 3).reshape(cout, -1).contiguous()  # [Cout, N*L]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            values = s.values_of(weight)
            gcols = s.matrix_t(values) @ g2  # [Cin*kh*kw, N*L]
            gcols = gcols.view(cin * kh * kw, n, -1).permute(1, 0, 2)
            gx = F.fold(gcols, (h, w), (kh, kw), dilation=dilation, padding=padding, stride=stride)
        if ctx.needs_input_grad[1]:
            cols = _unfold(x, (kh, kw), dilation, padding, stride)
            gw = s.dense_grad(_sampled(s, g2, cols.t().contiguous()), weight)
        if has_bias and ctx.needs_input_grad[2]:
            gb = grad_out.sum((0, 2, 3))
        return gx, gw, gb, None, None, None, None


def _unfold(x, kernel, dilation, padding, stride) -> torch.Tensor:
    """Input columns [Cin*kh*kw, N*L] for a convolution as one matrix product (a 1x1 stride-1 conv needs no copy of patches)."""
    n, cin = x.shape[:2]
    if kernel == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0):
        return x.permute(1, 0, 2, 3).reshape(cin, -1)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [N, Cin*k*k, L]
    return cols.permute(1, 0, 2).reshape(cols.shape[1], -1)


def csr_conv2d(x, weight, bias, structure: CSRStructure, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """Conv2d (groups=1) with only the weights in ``structure``, as a CSR product over unfolded input."""
    _refuse_export()
    return _CSRConv2dFn.apply(x, weight, bias, structure, tuple(stride), tuple(padding), tuple(dilation))


@register
class CSR(Backend):
    """PyTorch CSR products for forward, input gradient and the kept weights' gradient."""

    name = "csr"
    rank = 10
    summary = "PyTorch CSR sparse-dense products (convolutions over unfolded inputs)"

    def build_structure(self, mask: torch.Tensor, name: str) -> CSRStructure:
        return CSRStructure.from_mask(mask.reshape(mask.shape[0], -1))

    def candidate(self, layer: nn.Module, x: torch.Tensor) -> bool:
        # where the direct kernels run a convolution, CSR (an unfolded copy of the input) is slower and far larger
        if isinstance(layer, nn.Conv2d) and direct_ok(x, layer.weight):
            return False
        return super().candidate(layer, x)

    def run_linear(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return csr_linear(x, layer.weight, layer.bias, layer.structure())

    def run_conv(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return csr_conv2d(x, layer.weight, layer.bias, layer.structure(), layer.stride, layer.padding, layer.dilation)
