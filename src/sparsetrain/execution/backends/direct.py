"""``direct``: our C kernels for convolutions (:mod:`sparsetrain.execution.native`).

Every kept weight is one shifted multiply-add over an output plane (or, for feature maps of 16 x 16 and smaller,
over the batch laid innermost), in forward, input gradient and kept-weight gradient alike. Work is in proportion
to the kept weights and there is no unfolded copy of the input. Float32 on the CPU, in the layout the input comes
in: NCHW planes (``direct_conv.c``, ``tiled_conv.c``) or channels-last (``nhwc_conv.c``, which transposes blocks
of images in cache, so a channels-last network keeps BatchNorm, ReLU and pooling in its layout with no copies).
Linear layers, and whatever the kernels do not cover, take the CSR path.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core.masks import dense_from_values
from .. import native
from .csr import KeptEntries, conv_out_size, csr_conv2d, csr_linear
from .registry import Backend, autocast_bf16, channels_last, direct_ok, register

if TYPE_CHECKING:
    from .condensed import CondensedStructure

__all__ = [
    "Direct",
    "DirectStructure",
    "channels_last",
    "direct_plan",
    "direct_geometry",
    "direct_forward",
    "direct_input_grad",
    "direct_conv2d",
]


@dataclass
class DirectStructure(KeptEntries):
    """The kept entries of a conv weight [Cout, Cin, KH, KW], listed by output and by input channel.

    ``flat_index`` gives each entry's position in the weight (row-major, so grouped by output
    channel); the by-input-channel lists carry each entry's index into that order. Indices per kept weight are
    int32 (a weight's positions fit), channel and tap numbers int32/int16: 16 bytes a kept weight for all the lists.
    """

    shape: tuple[int, int, int, int]
    flat_index: torch.Tensor | None  # None for lists made from a threshold (SWAT's W_s), which carry their values
    by_out: tuple  # co_ptr int64 [Cout+1], ci int32, kh int16, kw int16
    by_in: tuple  # ci_ptr int64 [Cin+1], co int32, kh int16, kw int16, value index int32
    _flipped: tuple | None = None
    _rows: CondensedStructure | None = None  # a 1 x 1 kernel's lists as a Linear's rows (see :meth:`as_rows`)
    _tensors: list[torch.Tensor] | None = None  # the lists as the direct operators take them (see :meth:`tensors`)
    _plans: dict | None = None  # input geometry -> (geometry array, kernel plan), see :meth:`plan_for`
    _cl_index: torch.Tensor | None = None  # the entries' positions in a channels-last weight (see :meth:`values_of`)

    @classmethod
    def from_mask(cls, mask4d: torch.Tensor) -> "DirectStructure":
        cout, cin, kh, kw = mask4d.shape
        if mask4d.numel() >= 2**31:
            raise ValueError(f"a conv weight of {mask4d.numel()} entries is beyond the direct kernels' int32 indices")
        idx = mask4d.reshape(-1).nonzero().squeeze(1).cpu()
        co, rest = idx // (cin * kh * kw), idx % (cin * kh * kw)
        ci, r = rest // (kh * kw), rest % (kh * kw)
        h, w = r // kw, r % kw
        co_ptr = torch.zeros(cout + 1, dtype=torch.int64)
        co_ptr[1:] = torch.bincount(co, minlength=cout).cumsum(0)
        order = torch.argsort(ci * cout + co, stable=True)
        ci_ptr = torch.zeros(cin + 1, dtype=torch.int64)
        ci_ptr[1:] = torch.bincount(ci, minlength=cin).cumsum(0)
        i32, i16 = torch.int32, torch.int16
        by_out = (co_ptr, ci.to(i32), h.to(i16), w.to(i16))
        by_in = (ci_ptr, co[order].to(i32), h[order].to(i16), w[order].to(i16), order.to(i32))
        made = cls(tuple(mask4d.shape), idx.to(torch.int32), by_out, by_in)
        made.tensors()  # now, not inside a compiled forward (where making it would be a side effect to guard)
        made.as_rows()  # (likewise the rows that small planes and one-image inference read)
        return made

    def by_in_flipped(self) -> tuple:
        """The by-input lists with the kernel flipped (kh -> KH-1-kh, kw -> KW-1-kw) and each entry's value index:
        the input gradient of a stride-1 convolution is the convolution of the padded output gradient with them."""
        if self._flipped is None:
            ptr, co, kh, kw, vidx = self.by_in
            kh_n, kw_n = self.shape[2:]
            self._flipped = (
                ptr,
                co,
                (kh_n - 1 - kh).to(torch.int16),
                (kw_n - 1 - kw).to(torch.int16),
                vidx,
            )
        return self._flipped

    def values_of(self, weight: torch.Tensor) -> torch.Tensor:
        """The kept entries of ``weight`` in the lists' order: the weight itself where it holds only those (compact
        storage), else gathered from the dense weight in its own memory order. ``reshape(-1)`` of a channels-last
        weight is a copy into NCHW order (and its gradient comes back NCHW, copied again into the parameter's
        layout): at VGG-16's 512-channel layers 9.4 MB each way, every step, which made the channels-last step of
        ``auto``'s timing look slower than it trains."""
        return weight if weight.dim() == 1 else self._gather(weight)

    def dense(self, values: torch.Tensor) -> torch.Tensor:
        """The weight with ``values`` at the kept entries and zeros elsewhere."""
        return dense_from_values(values, self.flat_index, self.shape)

    def tensors(self) -> list[torch.Tensor]:
        """The by-output, by-input and flipped lists as tensors (views of the same memory), in the order the
        ``sparsetrain::direct_conv2d`` operators take them; made once per structure, outside any traced code."""
        if self._tensors is None:
            ptr, co, fkh, fkw, vidx = self.by_in_flipped()
            arrays = (*self.by_out, *self.by_in[:4], fkh, fkw)
            self._tensors = [*arrays, vidx]
            _BY_LISTS[id(self._tensors[0])] = self  # (it holds the tensor: the id stays its own while it lives)
        return self._tensors

    def plan_for(self, x_shape, stride, padding, dilation) -> tuple[tuple[int, ...], tuple[bool, bool, bool]]:
        """(:func:`direct_geometry`, :func:`direct_plan`) of this weight on an input of ``x_shape``, made once per
        input geometry (every step passes the same shapes)."""
        key = (tuple(x_shape), tuple(stride), tuple(padding), tuple(dilation))
        if self._plans is None:
            self._plans = {}
        made = self._plans.get(key)
        if made is None:
            geom = direct_geometry(x_shape, self.shape, stride, padding, dilation)
            made = self._plans[key] = (geom, direct_plan(geom, self.shape[2:]))
        return made

    @classmethod
    def from_tensors(cls, shape, lists: list[torch.Tensor]) -> "DirectStructure":
        """The structure :meth:`tensors` listed (inside an operator): the structure that made these very tensors
        while it lives (eager and compiled calls pass them every step; rebuilt, a structure would redo its geometry and
        plans on every call, forward and backward), else one rebuilt from them (no mask, no flat index)."""
        made = _BY_LISTS.get(id(lists[0]))
        if made is not None and made._tensors is not None and made._tensors[0] is lists[0]:
            return made
        co_ptr, ci, kh, kw, ci_ptr, co, kh_in, kw_in, fkh, fkw, vidx = lists
        return cls(
            tuple(int(v) for v in shape),
            None,
            (co_ptr, ci, kh, kw),
            (ci_ptr, co, kh_in, kw_in, vidx),
            (ci_ptr, co, fkh, fkw, vidx),
        )

    def as_rows(self) -> CondensedStructure:
        """The lists as the condensed kernels' rows over [Cout, Cin x KH x KW] (the columns in ``F.unfold``'s order;
        for a 1 x 1 kernel, [Cout, Cin]), values in the same order (both list the kept entries row-major): the
        convolution is then a Linear layer over the batch's pixels (1 x 1) or their unfolded patches."""
        if self._rows is None:
            from .condensed import CondensedStructure  # imported here: the registry lists direct before condensed

            co_ptr, ci, kh, kw = self.by_out
            cout, cin, kh_n, kw_n = self.shape
            col = (ci.to(torch.int64) * kh_n + kh) * kw_n + kw
            rows = (co_ptr, col.to(torch.int32))
            self._rows = CondensedStructure((cout, cin * kh_n * kw_n), rows)
        return self._rows


# id of a structure's first list tensor -> the structure (held weakly: it goes with its layer's mask)
_BY_LISTS: "weakref.WeakValueDictionary[int, DirectStructure]" = weakref.WeakValueDictionary()

_BATCH_INNER_BELOW = 512  # output planes of 16 x 16 and smaller run with the batch innermost


def _kernel_layout(t: torch.Tensor, batch_inner: bool) -> torch.Tensor:
    """``t`` as the kernels read it: contiguous NCHW, or [C, H, W, N] with the batch innermost."""
    return t.permute(1, 2, 3, 0).contiguous() if batch_inner else t.contiguous()


def _tiled(geom: tuple[int, ...], kernel: tuple[int, int]) -> tuple[bool, bool]:
    """Which products run on the register-tiled kernels: (forward and weight gradient, input gradient). Both need
    stride 1 and dilation 1; the first an output, the second an input, whose rows are 1 to 4 vectors with three
    quarters of their lanes used (``native.tiled_supported``: 12-16 and 24-64 columns with AVX-512; any height); the
    second also padding within the kernel (so that the input gradient is a convolution too)."""
    _, _, h, w, _, ho, wo, sh, sw, ph, pw, dh, dw = geom
    if not sh == sw == dh == dw == 1:
        return False, False
    return native.tiled_supported(ho, wo), 0 <= ph < kernel[0] and 0 <= pw < kernel[1] and native.tiled_supported(h, w)


def direct_plan(geom: tuple[int, ...], kernel: tuple[int, int]) -> tuple[bool, bool, bool]:
    """How the direct kernels run a convolution of geometry ``geom``: (batch innermost, forward and weight gradient
    tiled, input gradient tiled)."""
    tiled, tiled_in = _tiled(geom, kernel)
    return not (tiled or tiled_in) and geom[5] * geom[6] < _BATCH_INNER_BELOW, tiled, tiled_in


def direct_geometry(x_shape, kernel_shape, stride, padding, dilation) -> tuple[int, ...]:
    """N, Cin, H, W, Cout, Ho, Wo, strides, paddings, dilations, as the direct kernels read them (an int64 array)."""
    n, cin, h, w = x_shape
    cout, _, kh, kw = kernel_shape
    ho, wo = conv_out_size((h, w), (kh, kw), stride, padding, dilation)
    return tuple(int(v) for v in (n, cin, h, w, cout, ho, wo, *stride, *padding, *dilation))


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """``t`` [N, C, H, W] as the channels-last kernels read it: its NHWC memory, contiguous (no copy when it is
    channels-last already)."""
    return t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)


def direct_forward(
    x: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    structure: DirectStructure,
    geom: tuple[int, ...],
    plan: tuple[bool, bool, bool],
    nhwc: bool | None = None,
) -> torch.Tensor:
    """The convolution over the kept weights (``values`` in the structure's order), out in ``x``'s layout (NCHW
    or channels-last; ``nhwc`` decides for an input that is both, as a one-channel image is)."""
    bi, tiled, _ = plan
    if channels_last(x) if nhwc is None else nhwc:
        n, _, _, _, cout, ho, wo = geom[:7]
        out = torch.empty((n, ho, wo, cout), dtype=x.dtype)
        native.nhwc_conv_forward(geom, _nhwc(x.detach()), values, bias, structure.by_out, out)
        return out.permute(0, 3, 1, 2)
    n, _, _, _, cout, ho, wo = geom[:7]
    out = torch.empty((cout, ho, wo, n) if bi else (n, cout, ho, wo), dtype=x.dtype)
    if tiled:
        native.tiled_conv(x.detach().contiguous(), values, bias, structure.by_out, out, geom[9:11])
    else:
        native.sparse_conv_forward(
            geom, _kernel_layout(x.detach(), bi), values, bias, structure.by_out, out, batch_inner=bi
        )
    return out.permute(3, 0, 1, 2) if bi else out


def direct_input_grad(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    structure: DirectStructure,
    geom: tuple[int, ...],
    plan: tuple[bool, bool, bool],
    nhwc: bool = False,
) -> torch.Tensor:
    """The input gradient of :func:`direct_forward`, NCHW (``nhwc``: channels-last, as the input was)."""
    bi, _, tiled_in = plan
    n, cin, h, w = geom[:4]
    if nhwc:
        gx = torch.empty((n, h, w, cin), dtype=grad_out.dtype)
        native.nhwc_conv_input_grad(
            geom, structure.shape[2:], _nhwc(grad_out), values, structure.by_in, structure.by_in_flipped(), gx
        )
        return gx.permute(0, 3, 1, 2)
    g = _kernel_layout(grad_out, bi)
    gx = torch.empty((cin, h, w, n) if bi else (n, cin, h, w), dtype=g.dtype)
    if tiled_in:  # the padded output gradient convolved with the flipped kernel, listed by input channel
        kh, kw = structure.shape[2:]
        ph, pw = geom[9:11]
        ptr, co, fkh, fkw, vidx = structure.by_in_flipped()
        native.tiled_conv(g, values.index_select(0, vidx), None, (ptr, co, fkh, fkw), gx, (kh - 1 - ph, kw - 1 - pw))
    else:
        native.sparse_conv_backward_input(geom, g, values, structure.by_in, gx, batch_inner=bi)
    return gx.permute(3, 0, 1, 2) if bi else gx


def _layout(shape: tuple[int, int, int, int], nhwc: bool, batch_inner: bool) -> torch.Tensor:
    """An empty [N, C, H, W] tensor in the memory layout the kernels write: channels-last, batch innermost
    ([C, H, W, N] memory) or NCHW (the fake implementations give the same strides as the real outputs)."""
    n, c, h, w = shape
    if nhwc:
        return torch.empty((n, h, w, c)).permute(0, 3, 1, 2)
    if batch_inner:
        return torch.empty((c, h, w, n)).permute(3, 0, 1, 2)
    return torch.empty((n, c, h, w))


@torch.library.custom_op("sparsetrain::direct_conv2d", mutates_args=(), device_types="cpu")
def direct_conv2d_op(
    x: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    lists: list[torch.Tensor],
    shape: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    nhwc: bool,
) -> torch.Tensor:
    """The convolution over the kept weights ``values`` of a weight of ``shape``, listed by ``lists``
    (:meth:`DirectStructure.tensors`), in ``x``'s layout (``nhwc``: channels-last)."""
    s = DirectStructure.from_tensors(shape, lists)
    geom, plan = s.plan_for(x.shape, stride, padding, dilation)
    return direct_forward(x, values.contiguous(), bias, s, geom, plan, nhwc)


def _lists_fake(shape, nnz) -> list[torch.Tensor]:
    """Tensors shaped as :meth:`DirectStructure.tensors` lists ``nnz`` kept entries of a weight of ``shape`` (for the
    fake implementations of operators that make the lists)."""
    cout, cin = shape[:2]
    i16, i32, i64 = torch.int16, torch.int32, torch.int64
    sizes = [(cout + 1, i64), (nnz, i32), (nnz, i16), (nnz, i16), (cin + 1, i64), (nnz, i32), (nnz, i16), (nnz, i16)]
    return [torch.empty(n, dtype=dt) for n, dt in sizes + [(nnz, i16), (nnz, i16), (nnz, i32)]]


@direct_conv2d_op.register_fake
def _direct_conv2d_fake(x, values, bias, lists, shape, stride, padding, dilation, nhwc):
    geom = direct_geometry(x.shape, shape, stride, padding, dilation)
    n, _, _, _, cout, ho, wo = geom[:7]
    return _layout((n, cout, ho, wo), nhwc, direct_plan(geom, tuple(shape[2:]))[0]).to(x.dtype)


@torch.library.custom_op("sparsetrain::direct_conv2d_backward", mutates_args=(), device_types="cpu")
def direct_conv2d_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    values: torch.Tensor,
    lists: list[torch.Tensor],
    shape: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    nhwc: bool,
    input_grad: bool,
    weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of ``sparsetrain::direct_conv2d`` for ``x`` and for the kept weights (in their listed order),
    each only when asked for (an empty tensor otherwise)."""
    s = DirectStructure.from_tensors(shape, lists)
    geom, plan = s.plan_for(x.shape, stride, padding, dilation)
    bi, tiled, _ = plan
    gx, gv = x.new_empty(0), values.new_empty(0)
    both = (
        native.nhwc_conv_backward(geom, s.shape[2:], _nhwc(x), _nhwc(grad), values, s.by_out, s.by_in_flipped())
        # (stride 1 asked first: a strided layer would lay out its NHWC operands only to be refused)
        if nhwc and input_grad and weight_grad and tuple(stride) == (1, 1) and x.dtype == torch.float32
        else None
    )
    if both is not None:  # (one pass: the output gradient laid out once for both)
        return both[0].permute(0, 3, 1, 2), both[1]
    if input_grad:
        gx = direct_input_grad(grad, values, s, geom, plan, nhwc)
    if weight_grad:
        if nhwc:
            gv = native.nhwc_conv_weight_grad(geom, _nhwc(x), _nhwc(grad), s.by_out, values.numel())
        elif tiled:
            pad = geom[9:11]
            gv = native.tiled_conv_weight_grad(x.contiguous(), grad.contiguous(), s.by_out, values.numel(), pad)
        else:
            gv = native.sparse_conv_backward_weight(
                geom, _kernel_layout(x, bi), _kernel_layout(grad, bi), s.by_out, values.numel(), batch_inner=bi
            )
    return gx, gv


@direct_conv2d_backward.register_fake
def _direct_conv2d_backward_fake(
    grad, x, values, lists, shape, stride, padding, dilation, nhwc, input_grad, weight_grad
):
    geom = direct_geometry(x.shape, shape, stride, padding, dilation)
    gx = _layout(tuple(x.shape), nhwc, direct_plan(geom, tuple(shape[2:]))[0]).to(x.dtype)
    return (gx if input_grad else x.new_empty(0), values.new_empty(values.shape if weight_grad else (0,)))


def _direct_setup(ctx, inputs, output) -> None:
    x, values, bias, lists, shape, stride, padding, dilation, nhwc = inputs
    # the input as given: usually the tensor the layer before saves anyway, where a re-laid copy would be extra memory
    ctx.save_for_backward(x, values, *lists)
    ctx.conf = (shape, stride, padding, dilation, nhwc, bias is not None)


def _direct_backward(ctx, grad):
    x, values, *lists = ctx.saved_tensors
    shape, stride, padding, dilation, nhwc, has_bias = ctx.conf
    need_x, need_v, need_b = ctx.needs_input_grad[:3]
    grad = grad.to(x.dtype)  # (the gradient of a bfloat16 output is bfloat16 unless a caller changed it)
    gx, gv = direct_conv2d_backward(grad, x, values, lists, shape, stride, padding, dilation, nhwc, need_x, need_v)
    gb = grad.sum((0, 2, 3)) if has_bias and need_b else None
    return gx if need_x else None, gv if need_v else None, gb, [None] * len(lists), None, None, None, None, None


direct_conv2d_op.register_autograd(_direct_backward, setup_context=_direct_setup)
# (no autocast rule: the operator computes in its input's dtype, float32 or bfloat16 where _in_bf16 chose it)


def pointwise(structure: DirectStructure, padding, dilation, x: torch.Tensor) -> bool:
    """Whether this convolution is a Linear layer over pixels: a 1 x 1 kernel without padding on a channels-last
    input (any stride: the strided pixels are a view)."""
    return structure.shape[2:] == (1, 1) and tuple(padding) == (0, 0) and channels_last(x) and x.shape[1] > 1


def pointwise_conv2d(x, values, bias, structure: DirectStructure, stride) -> torch.Tensor:
    """A 1 x 1 convolution of a channels-last ``x`` on the condensed Linear kernels: every (strided) pixel a token,
    the output channels-last; the gradients flow back through the views (strided pixels get theirs, the rest 0)."""
    from .condensed import condensed_values_linear

    sh, sw = stride
    # [N, H, W, Cin] views; sliced in that order, the input's gradient comes back channels-last too
    pixels = x.permute(0, 2, 3, 1)[:, ::sh, ::sw, :]
    out = condensed_values_linear(pixels, values, bias, structure.as_rows())
    return out.permute(0, 3, 1, 2)  # [N, Cout, H, W] in channels-last memory


UNFOLD_TOKENS = 64  # output planes of at most this many pixels (batch included) run as unfolded patches
# and at inference, one image: every 1 x 1 convolution (its patches are its input) and planes up to 16 x 16 that the
# tiled kernels do not take (batch 1, 5% kept, 256 channels 3 x 3 at 14 x 14: plane kernel 5.9 ms, unfolded 0.66 ms,
# dense 1.1 ms, tiled 0.20 ms; at 28 x 28 the unfolded copy costs more than the direct kernels save)
UNFOLD_ONE_IMAGE = 256


def unfolded_conv2d(x, values, bias, structure: DirectStructure, stride, padding, dilation) -> torch.Tensor:
    """A convolution as a Linear layer over its unfolded patches on the condensed kernels, for small output planes
    (batch 1 in the late layers of a CIFAR network: 4 x 4, 2 x 2), where the direct kernels' per-weight set-up costs
    more than the plane's products (measured at batch 1, 512 channels, 5% kept, 2 x 2 plane: direct 2.2 ms,
    unfolded 0.5 ms, dense 1.5 ms), and for any one-image batch at inference, where the patches come laid with the
    pixels innermost as the row-split forward reads them (``native.condensed_forward_few``). The output keeps the
    input's layout; the input's gradient comes back through the fold, NCHW."""
    from .condensed import _forward_only, condensed_values_linear

    n, _, h, w = x.shape
    kh, kw = structure.shape[2:]
    ho, wo = conv_out_size((h, w), (kh, kw), stride, padding, dilation)
    if (kh, kw) == (1, 1) and tuple(padding) == (0, 0):
        cols = x[:, :, :: stride[0], :: stride[1]].reshape(n, x.shape[1], ho * wo)  # a 1 x 1 kernel's patches
    else:
        cols = F.unfold(x, (kh, kw), dilation, padding, stride)  # [N, Cin*KH*KW, L]
    if n == 1 and _forward_only(cols[0].t(), any_tokens=True):
        out = native.condensed_forward_few(cols[0], values, bias, structure.as_rows().rows, structure.shape[0])
        out = out.reshape(1, structure.shape[0], ho, wo)
        return out.contiguous(memory_format=torch.channels_last if channels_last(x) else torch.contiguous_format)
    out = condensed_values_linear(cols.transpose(1, 2), values, bias, structure.as_rows())  # [N, L, Cout]
    out = out.transpose(1, 2).reshape(n, structure.shape[0], ho, wo)  # channels-last in memory
    return out if channels_last(x) else out.contiguous()  # (a small plane: the copy costs little)


def _unfolded(structure: DirectStructure, stride, padding, dilation, x: torch.Tensor) -> bool:
    """Whether the convolution runs as unfolded patches: an output plane (batch included) of at most
    :data:`UNFOLD_TOKENS` pixels, or one image with gradients off (inference), 1 x 1 or with a plane of at most
    :data:`UNFOLD_ONE_IMAGE` pixels that the register-tiled kernels do not take (they run 256 channels at 14 x 14,
    5% kept, in 0.20 ms)."""
    from .condensed import _forward_only

    n, _, h, w = x.shape
    kh, kw = structure.shape[2:]
    ho, wo = conv_out_size((h, w), (kh, kw), stride, padding, dilation)
    small = ho * wo <= UNFOLD_ONE_IMAGE
    if small and n == 1 and not channels_last(x):  # (NCHW: the tiled kernels read planes)
        small = not _tiled(direct_geometry(x.shape, structure.shape, stride, padding, dilation), (kh, kw))[0]
    one_image = n == 1 and ((kh, kw) == (1, 1) or small)
    return n * ho * wo <= UNFOLD_TOKENS or (one_image and _forward_only(x[0, 0], any_tokens=True))


def _in_bf16(nhwc: bool, stride, padding, dilation, kernel) -> bool:
    """Whether the direct kernels compute this convolution in bfloat16 now: under bfloat16 autocast, channels-last
    at stride 1 with its padding within the kernel's reach (the channels-last kernels have bfloat16 paths, and the
    input gradient is their forward); the others compute in float32."""
    reach = all(d * (k - 1) >= p for d, k, p in zip(dilation, kernel, padding))
    return nhwc and tuple(stride) == (1, 1) and reach and autocast_bf16()


def direct_conv2d(x, weight, bias, structure: DirectStructure, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """Conv2d (groups=1, float32 on the CPU; under bfloat16 autocast, channels-last at stride 1 in bfloat16)
    computing only the kept weights in ``structure``: no unfolded copy, work in proportion to the kept entries (the
    C kernels of :mod:`sparsetrain.native`); a 1 x 1 convolution of a channels-last input runs as a Linear layer
    over pixels (:func:`pointwise_conv2d`). ``weight`` is the dense weight, or (compact storage) just the kept
    values in the structure's order."""
    values = structure.values_of(weight)
    if pointwise(structure, padding, dilation, x):
        return pointwise_conv2d(x, values, bias, structure, stride)
    if _unfolded(structure, stride, padding, dilation, x):
        return unfolded_conv2d(x, values, bias, structure, tuple(stride), tuple(padding), tuple(dilation))
    # an input that is both NCHW and channels-last (one channel) comes out in the layout of a channels-last weight,
    # as PyTorch's own convolution does (a compact layer's weight has no layout: NCHW)
    model_cl = weight.dim() == 4 and channels_last(weight)
    nhwc = channels_last(x) or (model_cl and x.is_contiguous(memory_format=torch.channels_last))
    # under bfloat16 autocast as a dense convolution there (input rounded, float32 sums, bfloat16 output); else float32
    x = x.to(torch.bfloat16 if _in_bf16(nhwc, stride, padding, dilation, structure.shape[2:]) else torch.float32)
    return direct_conv2d_op(
        x, values, bias, structure.tensors(), list(structure.shape), list(stride), list(padding), list(dilation), nhwc
    )


@register
class Direct(Backend):
    """The direct sparse-convolution kernels; Linear layers on CSR products."""

    name = "direct"
    rank = 20
    summary = (
        "C kernels over the kept weights of convolutions (float32, CPU, NCHW or channels-last); Linear layers on CSR"
    )
    compact = True
    own_layers = True  # SWAT's convolutions on the kernels, over the top-K weights
    retry_near_ties = True  # timed alone on part of a batch, the kernels miss what the layout around them costs

    def build_structure(self, mask: torch.Tensor, name: str) -> DirectStructure:
        return DirectStructure.from_mask(mask)

    def path(self, layer: nn.Module, x: torch.Tensor) -> str:
        return "direct" if isinstance(layer, nn.Conv2d) and direct_ok(x, layer.weight) else "csr"

    def follows_autocast(self, layer: nn.Module, x: torch.Tensor) -> bool:
        conv = isinstance(layer, nn.Conv2d)
        nhwc = channels_last(x) or channels_last(layer.weight)
        return conv and _in_bf16(nhwc, layer.stride, layer.padding, layer.dilation, layer.kernel_size)

    def run_linear(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return csr_linear(x, layer.weight, layer.bias, layer.structure())  # a Linear is a matrix product: CSR

    def run_conv(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if direct_ok(x, layer.weight):
            return direct_conv2d(
                x, layer.weight, layer.bias, layer.structure(self.name), layer.stride, layer.padding, layer.dilation
            )
        return csr_conv2d(x, layer.weight, layer.bias, layer.structure(), layer.stride, layer.padding, layer.dilation)
