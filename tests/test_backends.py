"""Execution backends: CSR products equal masked dense, structures follow mask changes, training agrees."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import keep_masked, prefer_kernels, tiny_datasets

import sparsetrain.execution.backends as backends
from sparsetrain.app import Trainer
from sparsetrain.app.config import ConfigError, load_config
from sparsetrain.core.masks import MaskSet, random_masks
from sparsetrain.execution import native
from sparsetrain.execution.backends import (
    CSRStructure,
    DirectStructure,
    SparseConv2d,
    apply_backend,
    csr_conv2d,
    csr_linear,
    direct,
    direct_conv2d,
)
from sparsetrain.execution.backends.csr import conv_out_size

CONVS = [  # (cin, cout, k, stride, padding, dilation)
    (4, 6, 3, 1, 1, 1),
    (4, 6, 3, 2, 1, 1),
    (3, 5, 1, 1, 0, 1),
    (3, 5, 1, 2, 0, 1),
    (4, 4, 3, 1, 2, 2),
    (2, 3, 5, 1, 2, 1),
]


@pytest.mark.parametrize("cin, cout, k, stride, padding, dilation", CONVS)
def test_csr_conv_equals_masked_dense(cin, cout, k, stride, padding, dilation):
    torch.manual_seed(0)
    mask = torch.rand(cout, cin, k, k) > 0.7
    w = (torch.randn(cout, cin, k, k, dtype=torch.float64) * mask).requires_grad_()
    b = torch.randn(cout, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, cin, 9, 9, dtype=torch.float64, requires_grad=True)
    s = CSRStructure.from_mask(mask.reshape(cout, -1))
    out = csr_conv2d(x, w, b, s, (stride, stride), (padding, padding), (dilation, dilation))
    ref = F.conv2d(x, w, b, stride, padding, dilation)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), g)
    rx, rw, rb = torch.autograd.grad(ref, (x, w, b), g)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw * mask)  # kept-weight gradients; nothing computed elsewhere
    torch.testing.assert_close(gb, rb)


needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler for the direct kernels")


@needs_native
@pytest.mark.parametrize("batch_inner", [False, True])
@pytest.mark.parametrize("cin, cout, k, stride, padding, dilation", CONVS)
def test_direct_conv_equals_masked_dense(cin, cout, k, stride, padding, dilation, batch_inner, monkeypatch):
    monkeypatch.setattr(direct, "_BATCH_INNER_BELOW", 10**9 if batch_inner else 0)
    torch.manual_seed(0)
    mask = torch.rand(cout, cin, k, k) > 0.7
    _check_direct_against_float64(mask, torch.randn(3, cin, 9, 9), stride, padding, dilation)


@needs_native
@pytest.mark.parametrize("width", [9, 14, 20, 28, 40, 56])  # rows of 1-4 vectors, the last one whole or in part
def test_direct_conv_tiled_rows_of_any_width_equal_float64(width):
    torch.manual_seed(0)
    mask = torch.rand(6, 4, 3, 3) > 0.7
    geom = direct.direct_geometry((2, 4, 5, width), mask.shape, (1, 1), (1, 1), (1, 1))
    assert direct.direct_plan(geom, (3, 3))[1:] == (native.tiled_supported(5, width),) * 2
    _check_direct_against_float64(mask, torch.randn(2, 4, 5, width), 1, 1)


@needs_native
@pytest.mark.parametrize("batch", [16, 48, 80])  # whole vectors of the batch: the register-tiled gathers (1-4 a tile)
@pytest.mark.parametrize("cin, cout, k, stride, padding, dilation", CONVS)
def test_direct_conv_batch_innermost_tiled_equals_float64(cin, cout, k, stride, padding, dilation, batch, monkeypatch):
    monkeypatch.setattr(direct, "_BATCH_INNER_BELOW", 10**9)
    torch.manual_seed(0)
    mask = torch.rand(cout, cin, k, k) > 0.7
    _check_direct_against_float64(mask, torch.randn(batch, cin, 7, 6), stride, padding, dilation)


def _check_direct_against_float64(mask, x, stride, padding, dilation=1, layout=None):
    """direct_conv2d's output and gradients (input, kept weights, bias) against float64 autograd: the kernels sum
    in another order than any dense float32 path. ``layout``: the output and input gradient keep it."""
    cout, cin, k, _ = mask.shape
    w = (torch.randn(cout, cin, k, k) * mask).requires_grad_()
    b = torch.randn(cout, requires_grad=True)
    x = x.requires_grad_()
    out = direct_conv2d(
        x, w, b, DirectStructure.from_mask(mask), (stride, stride), (padding, padding), (dilation, dilation)
    )
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = F.conv2d(x64, w64, b64, stride, padding, dilation)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (x, w, b), g.float())
    want = torch.autograd.grad(ref, (x64, w64, b64), g)
    # the weight and bias gradients sum a product per output position of the batch: float32's rounding grows with
    # the square root of their number (5 images of 32 x 32: 5120 terms, 2e-5 apart from float64 in AVX2's order)
    wide = 1e-5 * max(1.0, (ref[:, 0].numel() / 256) ** 0.5)
    for a, r, m, tol in zip(got, want, (1, mask, 1), (1e-5, wide, wide)):
        torch.testing.assert_close(a.double(), r * m, rtol=1e-5, atol=tol)
    if layout is not None:
        assert out.is_contiguous(memory_format=layout) and got[0].is_contiguous(memory_format=layout)


TILED = [  # (cin, cout, k, padding, (h, w)): stride 1 on planes 16 or 32 columns wide (8 with AVX2, 64 with AVX-512)
    (5, 7, 3, 1, (16, 16)),
    (3, 4, 3, 1, (32, 32)),
    (6, 3, 1, 0, (16, 16)),
    (4, 5, 3, 0, (18, 18)),
    (2, 3, 5, 2, (32, 32)),
    (3, 2, 3, 2, (14, 14)),
    # heights that leave rows after the last whole tile with either vector width: the tail tiles
    (3, 4, 3, 1, (13, 16)),
    (2, 3, 3, 1, (7, 32)),
    (4, 2, 1, 0, (31, 16)),
]


CHANNELS_LAST = [  # (n, cin, cout, k, stride, padding, dilation, (h, w)): blocks of 1-16 images, a last block short
    (3, 5, 7, 3, 1, 1, 1, (8, 8)),
    (5, 16, 32, 3, 1, 1, 1, (32, 32)),
    (2, 8, 6, 3, 2, 1, 1, (7, 7)),
    (4, 6, 8, 1, 2, 0, 1, (13, 11)),
    (3, 4, 5, 7, 2, 3, 1, (9, 9)),
    (17, 12, 10, 3, 1, 1, 1, (4, 4)),
    (6, 5, 5, 3, 1, 2, 2, (10, 10)),
    (9, 3, 4, 3, 1, 1, 1, (2, 2)),
    (2, 4, 4, 3, 1, 0, 1, (12, 12)),
    (3, 4, 6, 3, 1, 3, 1, (5, 6)),  # padding beyond the kernel's reach: the input gradient scatters
]


@needs_native
@pytest.mark.parametrize("n, cin, cout, k, stride, padding, dilation, size", CHANNELS_LAST)
def test_channels_last_direct_conv_equals_float64(n, cin, cout, k, stride, padding, dilation, size, monkeypatch):
    """The channels-last kernels (``nhwc_conv.c``): a channels-last input is computed in its layout, forward, input
    gradient (flipped convolution at stride 1, scatter otherwise) and kept-weight gradient, with no NCHW copy."""
    torch.manual_seed(n * cin)
    x = torch.randn(n, cin, *size).contiguous(memory_format=torch.channels_last)
    mask = torch.rand(cout, cin, k, k) > 0.6
    mask[0] = False  # an output channel with no kept weight: its bias alone
    ho, wo = conv_out_size(size, (k, k), (stride,) * 2, (padding,) * 2, (dilation,) * 2)
    # both gradients in one pass where it applies (stride 1, padding within reach, the output rows' padding lanes
    # within the output gradient's padding), else the input gradient's and the weight gradient's kernels
    geom = direct.direct_geometry((n, cin, *size), (cout, cin, k, k), (stride,) * 2, (padding,) * 2, (dilation,) * 2)
    reach, block, lanes = dilation * (k - 1) - padding, native.nhwc_block(geom), native._load().nhwc_lanes()
    fused = stride == 1 and reach >= 0 and -(-wo * block // lanes) * lanes - wo * block <= reach * block
    calls, kernels = [], ("nhwc_conv_forward", "nhwc_conv_input_grad", "nhwc_conv_weight_grad")
    kernels = ("nhwc_conv_forward", "nhwc_conv_backward") if fused else kernels
    if (k == 1 and padding == 0) or n * ho * wo <= direct.UNFOLD_TOKENS:
        # a 1 x 1 convolution is a Linear over pixels, a small output plane one over unfolded patches: the
        # condensed kernels run them
        kernels = ("condensed_forward", "condensed_backward")
    for name in kernels:
        monkeypatch.setattr(
            native, name, lambda *a, _fn=getattr(native, name), _name=name: calls.append(_name) or _fn(*a)
        )
    small = n * ho * wo <= direct.UNFOLD_TOKENS  # (the input gradient of unfolded patches comes back NCHW)
    _check_direct_against_float64(mask, x, stride, padding, dilation, layout=None if small else torch.channels_last)
    assert set(kernels) <= set(calls)
    assert not fused or "nhwc_conv_weight_grad" not in calls


def test_kept_values_of_a_channels_last_weight_are_gathered_in_its_own_layout():
    """A dense channels-last weight gives the same kept values as in NCHW, read in its memory order: nothing is
    copied into NCHW order, and the gradient comes back in the parameter's layout (no copy into it either)."""
    torch.manual_seed(3)
    mask = torch.rand(6, 5, 3, 2) > 0.6
    s = DirectStructure.from_mask(mask)
    w = torch.randn(6, 5, 3, 2)
    nchw, cl = w.clone().requires_grad_(), w.contiguous(memory_format=torch.channels_last).requires_grad_()
    a, b = s.values_of(nchw), s.values_of(cl)
    assert torch.equal(a, w[mask]) and torch.equal(b, w[mask])
    weights = torch.randn(len(a))
    (a * weights).sum().backward()
    (b * weights).sum().backward()
    assert torch.equal(cl.grad, nchw.grad) and torch.equal(cl.grad[mask], weights)
    assert cl.grad.stride() == cl.stride()
    assert s.values_of(weights) is weights  # compact storage: the values themselves


def test_a_channels_last_weight_on_the_csr_path_is_read_and_given_its_gradient_in_its_own_layout():
    """PyTorch's CSR products (where the direct kernels cannot run) read the kept values of a channels-last weight
    through its own memory and give its gradient back in that layout: output and gradients equal the NCHW weight's."""
    torch.manual_seed(4)
    mask = torch.rand(6, 4, 3, 3) > 0.6
    s = CSRStructure.from_mask(mask.reshape(6, -1))
    w = torch.randn(6, 4, 3, 3) * mask
    x = torch.randn(2, 4, 7, 7)
    nchw, cl = w.clone().requires_grad_(), w.contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.equal(s.values_of(cl), w[mask]) and torch.equal(s.values_of(nchw), w[mask])
    outs = [csr_conv2d(x, weight, None, s, (1, 1), (1, 1), (1, 1)) for weight in (nchw, cl)]
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    g = torch.randn_like(outs[0])
    for out in outs:
        out.backward(g)
    torch.testing.assert_close(cl.grad, nchw.grad, rtol=0, atol=0)
    assert cl.grad.stride() == cl.stride() and torch.count_nonzero(cl.grad[~mask]) == 0


@needs_native
def test_channels_last_blocks_fill_a_tile_of_registers_within_the_cache(monkeypatch):
    """Images per block: the output rows that waste the fewest vector lanes; among those the fewest images whose
    output plane fills a tile of accumulators (each kept weight then serves a whole tile), else the most whose
    buffers fit the cache budget; bfloat16 keeps the smallest."""
    lanes, tile = native._load().nhwc_lanes(), native._load().nhwc_accumulators()
    geom = lambda n, c, size: direct.direct_geometry((n, c, size, size), (c, c, 3, 3), (1, 1), (1, 1), (1, 1))  # noqa: E731
    monkeypatch.setattr(native, "block_bytes", lambda: 1 << 30)
    assert native.nhwc_block(geom(128, 512, 32)) == 1  # 32 rows of whole vectors already fill it
    small = native.nhwc_block(geom(128, 512, 4))  # 4 rows: 4 x B / lanes vectors each
    assert 4 * -(-4 * small // lanes) >= tile and 4 * -(-4 * (small // 2) // lanes) < tile
    assert native.nhwc_block(geom(128, 512, 2)) == 16  # no block fills it: the largest
    assert native.nhwc_block(geom(3, 512, 2)) == 2  # (no more images than the batch holds: 4 would waste none)
    monkeypatch.setattr(native, "block_bytes", lambda: 4 * (8 * 512 * 36 + 512 * 4 * 32))  # 8 images of 4 x 4 fit
    assert native.nhwc_block(geom(128, 512, 4)) == min(8, small)
    monkeypatch.setattr(native, "block_bytes", lambda: 0)  # nothing fits: the least waste, fewest images
    assert native.nhwc_block(geom(128, 512, 4)) == lanes // 4
    if native.bf16_kernels():
        assert native.nhwc_block(geom(128, 512, 4), bf16=True) == 2 * lanes // 4


@needs_native
def test_channels_last_kernels_take_both_gradients_in_one_pass_where_it_applies():
    """Of the cases above, those the one-pass backward takes (the same bits as the two kernels) and those it leaves
    to them: strided, padding beyond reach, and (with AVX-512) 12 x 12 unpadded: rows of 10 lanes padded to 16, with
    2 lanes of the output gradient's padding to cover them."""
    taken, lanes = [], native._load().nhwc_lanes()
    for n, cin, cout, k, stride, padding, dilation, size in CHANNELS_LAST:
        torch.manual_seed(n)
        conv = ((k, k), (stride,) * 2, (padding,) * 2, (dilation,) * 2)
        ho, wo = conv_out_size(size, *conv)
        geom = direct.direct_geometry((n, cin, *size), (cout, cin, k, k), *conv[1:])
        s = DirectStructure.from_mask(torch.rand(cout, cin, k, k) > 0.6)
        x, g, values = torch.randn(n, *size, cin), torch.randn(n, ho, wo, cout), torch.randn(len(s.by_out[1]))
        both = native.nhwc_conv_backward(geom, (k, k), x, g, values, s.by_out, s.by_in_flipped())
        taken.append(both is not None)
        if both is not None:
            gx = torch.empty(n, *size, cin)
            native.nhwc_conv_input_grad(geom, (k, k), g, values, s.by_in, s.by_in_flipped(), gx)
            assert torch.equal(both[0], gx)
            assert torch.equal(both[1], native.nhwc_conv_weight_grad(geom, x, g, s.by_out, values.numel()))
    assert taken == [True, True, False, False, False, True, True, True, lanes == 8, False]


@pytest.mark.skipif(not native.bf16_kernels(), reason="no bfloat16 kernels in this build (AVX-512 only)")
@pytest.mark.parametrize("n, cin, cout, k, stride, padding, dilation, size", CHANNELS_LAST)
def test_channels_last_direct_conv_under_bfloat16_autocast_equals_float64(
    n, cin, cout, k, stride, padding, dilation, size
):
    """Under bfloat16 autocast a channels-last convolution at stride 1 with its padding in reach runs the bfloat16
    kernels (bfloat16 output, float32 sums; blocks of several images, odd counts of kept weights, channels beyond a
    vector); the others compute in float32. Either way: within one bfloat16 rounding of the float64 convolution of
    the operands as computed, the kept weights' gradient (float32) within float32 sums."""
    torch.manual_seed(n * cin + 1)
    x = torch.randn(n, cin, *size).contiguous(memory_format=torch.channels_last).requires_grad_()
    mask = torch.rand(cout, cin, k, k) > 0.6
    w = (torch.randn(cout, cin, k, k) * mask).requires_grad_()
    b = torch.randn(cout, requires_grad=True)
    args = ((stride,) * 2, (padding,) * 2, (dilation,) * 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = backends.direct_conv2d(x, w, b, backends.DirectStructure.from_mask(mask), *args)
    in_bf16 = y.dtype == torch.bfloat16
    reach = dilation * (k - 1) >= padding
    ho, wo = conv_out_size(size, (k, k), (stride,) * 2, (padding,) * 2, (dilation,) * 2)
    assert in_bf16 == (stride == 1 and reach or (k == 1 and padding == 0) or n * ho * wo <= direct.UNFOLD_TOKENS)
    g = torch.randn(y.shape).to(y.dtype)
    grads = torch.autograd.grad(y, [x, w, b], g)
    low = torch.bfloat16 if in_bf16 else torch.float32
    x64, w64 = x.detach().to(low).double().requires_grad_(), w.detach().to(low).double().requires_grad_()
    ref = F.conv2d(x64, w64, b.detach().double(), *args)
    ref.backward(g.double())
    tol = 2**-8 if in_bf16 else 1e-5
    # unfolded patches fold their input gradient back in its dtype: up to k * k roundings in bfloat16
    folds = k * k if in_bf16 and n * ho * wo <= direct.UNFOLD_TOKENS else 1
    for got, want, scale in ((y, ref, 1e-2), (grads[0], x64.grad, folds)):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale * want.abs().max().item() + 1e-6)
    torch.testing.assert_close(grads[1][mask].double(), w64.grad[mask], rtol=1e-5, atol=1e-5)
    assert grads[1].dtype == torch.float32 and torch.count_nonzero(grads[1][~mask]) == 0


@pytest.mark.skipif(not native.bf16_kernels(), reason="no bfloat16 kernels in this build (AVX-512 only)")
def test_the_bfloat16_channels_last_kernels_refuse_a_strided_convolution():
    """Handed a strided geometry directly (the layers never do), the bfloat16 kernels refuse it in one line."""
    from sparsetrain.execution.backends.direct import _nhwc, direct_geometry

    mask = torch.rand(8, 4, 3, 3, generator=torch.Generator().manual_seed(0)) < 0.5
    structure = backends.DirectStructure.from_mask(mask)
    x = _nhwc(torch.randn(2, 4, 8, 8).bfloat16().contiguous(memory_format=torch.channels_last))
    geom = direct_geometry((2, 4, 8, 8), (8, 4, 3, 3), (2, 2), (1, 1), (1, 1))
    out = torch.empty((2, 4, 4, 8), dtype=torch.bfloat16)
    values = torch.randn(int(mask.sum()))
    with pytest.raises(ValueError) as e:
        native.nhwc_conv_forward(geom, x, values, None, structure.by_out, out)
    assert str(e.value) == (
        "the channels-last sparse convolution kernels take bfloat16 at stride 1 only (other convolutions compute in "
        "float32)"
    )
    with pytest.raises(ValueError):
        native.nhwc_conv_weight_grad(geom, x, torch.randn(2, 4, 4, 8).bfloat16(), structure.by_out, values.numel())


@needs_native
@pytest.mark.parametrize(
    "n, cin, cout, k, stride, padding, dilation, size",
    [(1, 16, 24, 3, 1, 1, 1, (4, 4)), (1, 8, 8, 3, 1, 1, 1, (2, 2)), (2, 6, 5, 3, 2, 1, 1, (7, 7)),
     (1, 5, 7, 3, 1, 2, 2, (5, 5)), (4, 3, 4, 5, 1, 2, 1, (3, 4))],
)  # fmt: skip
def test_small_output_planes_run_unfolded_and_equal_float64(n, cin, cout, k, stride, padding, dilation, size):
    """An output plane of at most UNFOLD_TOKENS pixels (batch 1 in a network's late layers) runs as a Linear over
    its unfolded patches on the condensed kernels, NCHW and channels-last, forward and both gradients."""
    torch.manual_seed(cin * cout)
    ho, wo = conv_out_size(size, (k, k), (stride,) * 2, (padding,) * 2, (dilation,) * 2)
    assert n * ho * wo <= direct.UNFOLD_TOKENS
    mask = torch.rand(cout, cin, k, k) > 0.7
    mask[0] = False  # an output channel with no kept weight: its bias alone
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(n, cin, *size).contiguous(memory_format=layout)
        _check_direct_against_float64(mask, x, stride, padding, dilation)
        out = direct_conv2d(x, torch.randn(mask.shape) * mask, None, DirectStructure.from_mask(mask), (stride,) * 2,
                            (padding,) * 2, (dilation,) * 2)  # fmt: skip
        assert out.is_contiguous(memory_format=layout)


@needs_native
@pytest.mark.parametrize(
    "cin, cout, k, stride, padding, size",
    [
        (16, 24, 1, 1, 0, (20, 20)),
        (12, 20, 1, 2, 0, (21, 19)),
        (8, 12, 3, 1, 1, (10, 9)),
        (6, 9, 3, 2, 1, (15, 16)),
        (8, 12, 3, 1, 1, (14, 14)),  # (a plane the register-tiled kernels take: not unfolded)
    ],
)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_one_image_at_inference_runs_unfolded_on_the_row_split_kernel(cin, cout, k, stride, padding, size, layout,
                                                                      monkeypatch):  # fmt: skip
    """Inference on one image (gradients off): 1 x 1 convolutions (their patches are their input) and planes up to
    UNFOLD_ONE_IMAGE pixels that the tiled kernels do not take run on native.condensed_forward_few, equal to float64,
    the output in the input's layout (channels-last inputs of 1 x 1 kernels stay on the pointwise path)."""
    torch.manual_seed(cin + k)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(1, cin, *size).contiguous(memory_format=fmt)
    mask = torch.rand(cout, cin, k, k) > 0.7
    w, b = torch.randn(cout, cin, k, k) * mask, torch.randn(cout)
    calls = []
    few = native.condensed_forward_few
    monkeypatch.setattr(native, "condensed_forward_few", lambda *a: calls.append(1) or few(*a))
    with torch.no_grad():
        out = direct_conv2d(x, w, b, DirectStructure.from_mask(mask), (stride,) * 2, (padding,) * 2, (1, 1))
    ref = F.conv2d(x.double(), w.double(), b.double(), stride, padding)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=fmt)
    tiled = k == 3 and stride == 1 and layout == "nchw" and native.tiled_supported(*size)
    assert calls == ([] if (k == 1 and layout == "channels_last") or tiled else [1])


@needs_native
@pytest.mark.parametrize("cin, cout, k, padding, size", TILED)
def test_tiled_direct_conv_equals_float64(cin, cout, k, padding, size):
    """The register-tiled kernels (forward, input gradient as a flipped convolution, kept-weight gradient)."""
    torch.manual_seed(1)
    n, (h, w) = 2, size
    ho, wo = h + 2 * padding - k + 1, w + 2 * padding - k + 1
    geom = [n, cin, h, w, cout, ho, wo, 1, 1, padding, padding, 1, 1]
    assert any(direct._tiled(tuple(geom), (k, k)))  # the shapes really take a tiled path
    _check_direct_against_float64(torch.rand(cout, cin, k, k) > 0.6, torch.randn(n, cin, h, w), 1, padding)


@needs_native
@pytest.mark.parametrize("shape", [(7, 5, 3, 3), (64, 70, 1, 1), (3, 2, 5, 5)])
def test_lists_from_a_threshold_equal_the_structure_of_the_mask(shape):
    """SWAT's per-step lists (C, from |w| >= threshold) are exactly DirectStructure.from_mask's, values included."""
    torch.manual_seed(0)
    w = torch.randn(shape)
    thr = float(w.abs().flatten().kthvalue(int(0.8 * w.numel())).values)
    values, by_out, by_in = native.threshold_lists(w, thr)
    ref = DirectStructure.from_mask(w.abs() >= thr)
    assert torch.equal(values, w.reshape(-1)[ref.flat_index])
    for got, want in zip(by_out + by_in, ref.by_out + ref.by_in):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("shape", [(5, 8), (16, 3), (1, 10)])
def test_csr_linear_equals_masked_dense(shape):
    torch.manual_seed(1)
    mask = torch.rand(shape) > 0.5
    w = (torch.randn(shape, dtype=torch.float64) * mask).requires_grad_()
    b = torch.randn(shape[0], dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 2, shape[1], dtype=torch.float64, requires_grad=True)
    out = csr_linear(x, w, b, CSRStructure.from_mask(mask))
    ref = F.linear(x, w, b)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, r, m in zip(torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g), (1, mask, 1)):
        torch.testing.assert_close(a, r * m)


@pytest.mark.parametrize("backend", ["csr", pytest.param("direct", marks=needs_native)])
def test_structure_is_rebuilt_when_the_mask_changes_and_only_then(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5))
    ms = MaskSet.for_model(model, [])
    random_masks(ms, 0.6, torch.Generator().manual_seed(0))
    layers = apply_backend(model, ms, backend)
    assert isinstance(model[0], SparseConv2d) and set(layers) == {"0.weight", "3.weight"}
    x = torch.randn(2, 4, 6, 6)
    model(x)
    model(x)
    assert model[0].rebuilds == 1
    new = torch.rand(8, 4, 3, 3) > 0.3
    ms.set_mask("0.weight", new)
    out = model(x)
    assert model[0].rebuilds == 2
    ref_conv = F.conv2d(x, model[0].weight * new, model[0].bias, padding=1)
    torch.testing.assert_close(out, F.linear(F.relu(ref_conv).flatten(1), model[3].weight, model[3].bias))


@pytest.mark.timing
def test_auto_times_both_paths_and_keeps_the_faster():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    ms = MaskSet.for_model(model, [])
    random_masks(ms, 0.9, torch.Generator().manual_seed(0))
    layer = apply_backend(model, ms, "auto")["0.weight"]
    model.eval()
    model(torch.randn(4, 64))
    assert layer.backend == "auto"  # evaluation never decides
    model.train()
    model(torch.randn(32, 64))
    expected = {"masked", "csr", "condensed"} if native.available() else {"masked", "csr"}
    assert layer.backend in expected and set(layer.timings) == expected
    assert layer.backend == min(layer.timings, key=layer.timings.get)
    assert layer.weight.grad is None  # the timing runs leave no gradient behind


@pytest.mark.timing
@needs_native
def test_auto_considers_the_direct_kernels_for_convolutions():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1))
    ms = MaskSet.for_model(model, [])
    random_masks(ms, 0.95, torch.Generator().manual_seed(0))
    layer = apply_backend(model, ms, "auto")["0.weight"]
    model(torch.randn(4, 8, 12, 12))
    assert set(layer.timings) == {"masked", "direct"} and layer.backend == min(layer.timings, key=layer.timings.get)


SET_EVERY_2 = ["sparsity.method=set", "sparsity.update_every_steps=2"]


@pytest.mark.parametrize(
    "backend, method, channels_last",
    [
        ("csr", SET_EVERY_2, False),
        pytest.param("direct", SET_EVERY_2, False, marks=needs_native),
        pytest.param("direct", SET_EVERY_2, True, marks=needs_native),
        ("channel", ["sparsity.method=static", "sparsity.scheme=channel_out"], False),
    ],
)
def test_training_with_a_sparse_backend_matches_masked_dense(tmp_path, backend, method, channels_last, monkeypatch):
    nhwc_calls = []
    if channels_last and native.available():
        kernel = native.nhwc_conv_forward
        monkeypatch.setattr(native, "nhwc_conv_forward", lambda *a: nhwc_calls.append(1) or kernel(*a))

    def run(backend):
        cfg = load_config(
            overrides=[
                "model.name=small_cnn",
                "data.dataset=mnist",
                "optim.batch_size=32",
                "run.threads=1",
                "run.progress=false",
                f"model.channels_last={str(channels_last).lower()}",
                "optim.epochs=1",
                f"run.out_dir={tmp_path / backend}",
                *method,
                "sparsity.sparsity=0.8",
                "sparsity.dense_layers=[]",
                f"sparsity.backend={backend}",
            ]
        )
        trainer = Trainer(cfg, datasets=tiny_datasets(n_train=128))
        summary = trainer.fit()
        return trainer, summary

    dense, _ = run("masked")
    sparse, summary = run(backend)
    ran = summary["backends"]  # what really ran: a Linear's direct path is the CSR product
    convs = {n for n in ran if sparse.method.maskset.masks[n].dim() == 4}
    assert {ran[n] for n in convs} == {backend}
    assert {ran[n] for n in set(ran) - convs} <= ({"csr"} if backend == "direct" else {backend})
    assert bool(nhwc_calls) == (channels_last and backend == "direct")  # channels-last layers ran in their layout
    if "sparsity.method=set" in method:
        assert sparse.method.execution_layers["0.weight"].rebuilds > 1  # SET changed the masks during training
    for k, v in dense.model.state_dict().items():
        torch.testing.assert_close(sparse.model.state_dict()[k], v, rtol=1e-4, atol=1e-5)


def test_backend_needs_masks():
    with pytest.raises(ConfigError, match="backend 'csr' runs masked layers sparse; method 'dense' has no masks"):
        load_config(overrides=["sparsity.backend=csr"])


def test_two_four_masks_are_checked():
    from sparsetrain.execution.backends import check_two_four

    ok = torch.tensor([[1, 1, 0, 0, 0, 1, 0, 1]], dtype=torch.bool)
    check_two_four(ok)
    with pytest.raises(ValueError, match="fc.weight: not 2:4 sparse \\(a group of 4 input weights keeps 3\\)"):
        check_two_four(torch.tensor([[1, 1, 1, 0]], dtype=torch.bool), "fc.weight")
    with pytest.raises(ValueError, match="multiple of 4, got \\(2, 6\\)"):
        check_two_four(torch.zeros(2, 6, dtype=torch.bool))


def test_semi_structured_needs_its_scheme_and_a_capable_gpu():
    with pytest.raises(ConfigError, match="backend 'semi_structured' runs 2:4 masks; set sparsity.scheme=nm_2:4"):
        load_config(overrides=["sparsity.method=static", "sparsity.sparsity=0.5", "sparsity.backend=semi_structured"])
    model = nn.Sequential(nn.Linear(8, 4))
    ms = MaskSet.for_model(model, [])
    if backends.semi_structured_available() is None:
        pytest.skip("a GPU with sparse tensor cores is present: the refusal cannot be shown")
    with pytest.raises(ValueError, match="backend 'semi_structured' cannot run here: the model is on cpu"):
        apply_backend(model, ms, "semi_structured")


@pytest.mark.skipif(
    backends.semi_structured_available() is not None,
    reason=f"2:4 semi-structured path not runnable here: {backends.semi_structured_available()}",
)
def test_semi_structured_linear_equals_masked_dense():
    from sparsetrain.core.schemes import parse_scheme

    torch.manual_seed(0)
    layer = nn.Linear(128, 64).cuda().half()
    ms = MaskSet.for_model(nn.Sequential(layer), [])
    ms.set_mask("0.weight", parse_scheme("nm_2:4").mask(torch.rand(64, 128, device="cuda"), 0.5))
    ref_w = (layer.weight * ms.masks["0.weight"]).detach().clone().requires_grad_()
    x = torch.randn(32, 128, device="cuda", dtype=torch.half, requires_grad=True)
    apply_backend(nn.Sequential(layer), ms, "semi_structured")
    out = layer(x)
    ref = F.linear(x, ref_w, layer.bias)
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    out.sum().backward()
    assert torch.all(layer.weight.grad[~ms.masks["0.weight"]] == 0)


def _channel_mask(shape, keep_every=2):
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[::keep_every] = True
    return mask


@pytest.mark.parametrize(
    "layer, x",
    [
        (nn.Conv2d(4, 6, 3, stride=2, padding=1), torch.randn(2, 4, 9, 9)),
        (nn.Conv2d(4, 6, 1, bias=False), torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)),
        (nn.Linear(5, 7), torch.randn(3, 2, 5)),
    ],
)
def test_channel_backend_equals_masked_dense(layer, x):
    torch.manual_seed(0)
    ref = type(layer)(
        *(
            [layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding]
            if isinstance(layer, nn.Conv2d)
            else [layer.in_features, layer.out_features]
        ),
        bias=layer.bias is not None,
    )
    ref.load_state_dict(layer.state_dict())
    ms = MaskSet.for_model(nn.Sequential(layer), [])
    ms.set_mask("0.weight", _channel_mask(layer.weight.shape))
    with torch.no_grad():
        ref.weight.mul_(ms.masks["0.weight"])
    apply_backend(nn.Sequential(layer), ms, "channel")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = layer(xa), ref(xb)
    torch.testing.assert_close(out, want)  # dropped channels carry their bias, as under masked dense
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad * ms.masks["0.weight"])
    if layer.bias is not None:
        torch.testing.assert_close(layer.bias.grad, ref.bias.grad)


def test_channel_backend_refuses_masks_inside_channels():
    layer = nn.Conv2d(2, 4, 3)
    ms = MaskSet.for_model(nn.Sequential(layer), [])
    mask = _channel_mask(layer.weight.shape)
    mask[1, 0, 0, 0] = True
    ms.set_mask("0.weight", mask)
    with pytest.raises(ValueError, match="0.weight: the mask keeps part of 1 output channel"):
        apply_backend(nn.Sequential(layer), ms, "channel")
    with pytest.raises(ConfigError, match="backend 'channel' runs masks of whole output channels"):
        load_config(overrides=["sparsity.method=static", "sparsity.sparsity=0.5", "sparsity.backend=channel"])


def test_channel_backend_recompacts_when_the_mask_changes():
    layer = nn.Conv2d(3, 6, 3, padding=1)
    ms = MaskSet.for_model(nn.Sequential(layer), [])
    ms.set_mask("0.weight", _channel_mask(layer.weight.shape))
    apply_backend(nn.Sequential(layer), ms, "channel")
    x = torch.randn(2, 3, 5, 5)
    layer(x)
    new = torch.zeros_like(ms.masks["0.weight"])
    new[[1, 4]] = True
    ms.set_mask("0.weight", new)
    out = layer(x)
    assert layer.rebuilds == 2
    torch.testing.assert_close(out, F.conv2d(x, layer.weight * new, layer.bias, padding=1))


@pytest.mark.parametrize(
    "fast", [("channels_last", "choices"), ("contiguous_format", "choices"), ("contiguous_format", "masked")]
)
@pytest.mark.parametrize("per_layer", ["kernels faster", "masked faster"])
def test_auto_keeps_the_fastest_whole_step_and_leaves_the_model_as_it_was(fast, per_layer, monkeypatch):
    """Every timing this test asserts on is injected: the per-layer timings (in both orders) and the whole steps
    (the fast candidate runs, every other sleeps), so no CPU can decide it."""
    import time as _time

    from sparsetrain.execution.backends import layers as layers_module
    from sparsetrain.execution.backends import settle_layout

    costs = {"masked": 3.0, "csr": 2.0, "direct": 1.0, "condensed": 1.0, "channel": 4.0}
    if per_layer == "masked faster":
        costs = {**{k: 5.0 - v for k, v in costs.items()}, "channel": 4.0}

    def injected_choose(self, x):
        self.timings = {name: costs[name] for name in self.candidates(x)}
        self.backend = min(self.timings, key=self.timings.get)

    monkeypatch.setattr(layers_module._SparseExec, "_choose", injected_choose)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 4),
    )
    ms = MaskSet.for_model(model, [])
    random_masks(ms, 0.9, torch.Generator().manual_seed(0))
    layers = apply_backend(model, ms, "auto")
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 4, (4,))
    fast_format, fast_kind = getattr(torch, fast[0]), fast[1]
    own: dict[str, str] = {}

    def loss_of(fmt):
        masked = all(m.backend == "masked" for m in layers.values())
        chosen = bool(own) and {n: m.backend for n, m in layers.items()} == own
        is_fast = fmt == fast_format and (masked if fast_kind == "masked" else chosen and not masked)
        if not is_fast:
            _time.sleep(0.1)  # every other candidate's whole step is the slower one
        return F.cross_entropy(model(x.contiguous(memory_format=fmt)), y)

    model(x)  # the layers choose (injected) before the whole step is timed
    own.update({n: m.backend for n, m in layers.items()})
    for m in layers.values():
        m.fix_backend("auto")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if fast_kind == "choices" and all(v == "masked" for v in own.values()):
        pytest.skip("the per-layer choices are all masked: the same plan as the all-masked candidate")
    fmt = settle_layout(model, layers, loss_of, repeats=2)
    assert fmt == fast_format
    assert model[0].weight.is_contiguous(memory_format=fast_format)
    got = {n: m.backend for n, m in layers.items()}
    if fast_kind == "choices":  # the per-layer choices (made in channels-last) win, in the fast layout
        assert got == own and got == {n: min(m.timings, key=m.timings.get) for n, m in layers.items()}
    else:  # every layer masked dense, in the model's own layout (NCHW here)
        assert all(v == "masked" for v in got.values())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics included
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("own", ["contiguous_format", "channels_last"])
def test_auto_leaving_every_layer_masked_keeps_the_models_own_layout_untimed(own, monkeypatch):
    """When every layer chooses masked dense (and none is near a tie), the step is the dense step: the model keeps
    the layout it came in, and no whole step is timed (a layout picked on a quarter of a batch can lose on a whole
    one, which put ResNet-20 at 50% above dense)."""
    from sparsetrain.execution.backends import layers as layers_module
    from sparsetrain.execution.backends import settle_layout

    def injected_choose(self, x):
        self.timings = {name: (1.0 if name == "masked" else 9.0) for name in self.candidates(x)}
        self.backend = "masked"

    monkeypatch.setattr(layers_module._SparseExec, "_choose", injected_choose)
    torch.manual_seed(0)
    fmt_own = getattr(torch, own)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).to(
        memory_format=fmt_own
    )
    ms = MaskSet.for_model(model, [])
    random_masks(ms, 0.5, torch.Generator().manual_seed(0))
    layers = apply_backend(model, ms, "auto")
    x = torch.randn(4, 3, 6, 6)
    passes = []

    def loss_of(fmt):
        passes.append(fmt)
        return model(x.contiguous(memory_format=fmt)).square().mean()

    assert settle_layout(model, layers, loss_of, repeats=3) == fmt_own
    assert passes == [torch.channels_last]  # the one pass in which the layers choose; no whole step timed
    assert all(m.backend == "masked" for m in layers.values())
    assert model[0].weight.is_contiguous(memory_format=fmt_own)


def _injected_clock(monkeypatch):
    """``auto``'s clock replaced by one that stands still until a test moves it on (``clock.now += seconds``): the
    whole-step timings a test injects, exactly, whatever the machine does meanwhile."""
    from sparsetrain.execution.backends import auto

    class Clock:
        now = 0.0

        @classmethod
        def perf_counter(cls) -> float:
            return cls.now

    monkeypatch.setattr(auto, "time", Clock)
    return Clock


def _auto_layers_choosing_kernels(monkeypatch):
    """A small CNN's layers on ``auto`` (90% masks) whose per-layer timings are injected: the kernels three times
    faster than masked dense. Returns the model, its layers and a batch of 8."""
    prefer_kernels(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    ms = MaskSet.for_model(model, [])
    random_masks(ms, 0.9, torch.Generator().manual_seed(0))
    return model, apply_backend(model, ms, "auto"), torch.randn(8, 3, 6, 6)


@pytest.mark.parametrize("close", [True, False])
def test_a_close_call_on_part_of_a_batch_is_settled_on_the_whole_batch(close, monkeypatch):
    """On a quarter batch every layer masked runs a little faster; on the whole batch the kernels do (ResNet-20 at
    95%): within CLOSE_CALL the two are timed again on the whole batch, which decides. Far apart, the whole batch is
    never run. Every timing is injected (a clock that each pass moves on)."""
    from sparsetrain.execution.backends import CLOSE_CALL, settle_layout

    model, layers, x = _auto_layers_choosing_kernels(monkeypatch)
    clock = _injected_clock(monkeypatch)
    quarter_sparse = 0.06 * (1.1 if close else 2 * CLOSE_CALL)  # against 0.06 all masked
    whole = []

    def loss_of(fmt, batch=x[:2]):
        masked = all(m.backend == "masked" for m in layers.values())
        clock.now += 0.06 if masked else quarter_sparse
        return model(batch.contiguous(memory_format=fmt)).square().mean()

    def whole_loss_of(fmt):
        masked = all(m.backend == "masked" for m in layers.values())
        whole.append("masked" if masked else "sparse")
        clock.now += 0.12 if masked else 0.03
        return model(x.contiguous(memory_format=fmt)).square().mean()

    model(x[:2])  # the layers choose (injected)
    for m in layers.values():
        m.fix_backend("auto")
    settled = []
    settle_layout(model, layers, loss_of, repeats=2, whole_loss_of=whole_loss_of, settled=lambda: settled.append(1))
    got = {m.backend for m in layers.values()}
    assert settled == []  # every layer masked still in the running (or the winner): nothing may be compacted
    if close:
        assert got != {"masked"} and set(whole) == {"masked", "sparse"}
    else:
        assert got == {"masked"} and whole == []


@pytest.mark.parametrize("tie", [True, False])
def test_a_layout_tie_on_part_of_a_batch_is_settled_on_the_whole_batch(tie, monkeypatch):
    """On a quarter batch the sparse plan runs a little faster in NCHW; on the whole batch channels-last is faster
    (VGG-16 SWAT-U 90%): within LAYOUT_TIE the two layouts are timed again on the whole batch, which decides, and
    every layer masked, far behind, is not. Apart by more, the quarter batch decides. Timings injected (a clock)."""
    from sparsetrain.execution.backends import LAYOUT_TIE, settle_layout

    model, layers, x = _auto_layers_choosing_kernels(monkeypatch)
    clock = _injected_clock(monkeypatch)
    quarter_cl = 0.08 * (1.0 if tie else 1.3 * LAYOUT_TIE)  # against 0.08 in NCHW, 0.3 all masked
    whole = []

    def loss_of(fmt, batch=x[:2]):
        masked = all(m.backend == "masked" for m in layers.values())
        clock.now += 0.3 if masked else quarter_cl if fmt == torch.channels_last else 0.08
        return model(batch.contiguous(memory_format=fmt)).square().mean()

    def whole_loss_of(fmt):
        masked = all(m.backend == "masked" for m in layers.values())
        whole.append("masked" if masked else fmt)
        clock.now += 0.4 if masked else 0.1 if fmt == torch.channels_last else 0.2
        return model(x.contiguous(memory_format=fmt)).square().mean()

    model(x[:2])  # the layers choose (injected)
    for m in layers.values():
        m.fix_backend("auto")
    settled = []  # the planner compacts here: the plan's paths fixed, before the whole-batch passes
    fmt = settle_layout(
        model, layers, loss_of, repeats=2, whole_loss_of=whole_loss_of,
        settled=lambda: settled.append(({m.backend for m in layers.values()}, len(whole))),
    )  # fmt: skip
    paths = {m.backend for m in layers.values()}
    assert "masked" not in paths and "auto" not in paths
    if tie:
        assert fmt == torch.channels_last and set(whole) == {torch.channels_last, torch.contiguous_format}
        assert settled == [(paths, 0)]
    else:
        assert fmt == torch.contiguous_format and whole == [] and settled == []


def test_each_whole_step_timing_casts_the_weights_afresh_under_autocast(monkeypatch):
    """Under autocast the weights' casts are kept while its region lasts, and ``auto`` plans inside the training
    loop's region: a cast made in one layout must not serve the pass timed in the other (VGG-16 under bfloat16:
    NCHW timed as fast as channels-last with channels-last casts, then 1.9x slower in training). Every pass starts
    with autocast's cache empty."""
    from sparsetrain.execution.backends import settle_layout

    model, layers, x = _auto_layers_choosing_kernels(monkeypatch)
    events = []
    clear = torch.clear_autocast_cache
    monkeypatch.setattr(torch, "clear_autocast_cache", lambda: (events.append("cleared"), clear())[1])

    def loss_of(fmt):
        events.append("pass")
        return model(x[:2].contiguous(memory_format=fmt)).square().mean()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        settle_layout(model, layers, loss_of, repeats=2)
        seen = list(events)  # (leaving the region clears the cache once more)
    assert seen.count("pass") > 2 and seen == ["cleared", "pass"] * seen.count("pass")


def test_every_layer_masked_is_kept_unless_a_sparse_plan_is_clearly_faster():
    """The candidates' timings end with every layer masked; a sparse plan faster by less than MASKED_UNLESS loses to
    it (nearer than that the machine's noise decides), one faster by more wins, and so does the fastest sparse plan
    among several."""
    from sparsetrain.execution.backends import MASKED_UNLESS
    from sparsetrain.execution.backends.auto import _fastest

    masked = 1.0
    assert _fastest([masked / (MASKED_UNLESS - 0.01), masked]) == 1
    assert _fastest([masked / (MASKED_UNLESS + 0.01), masked]) == 0
    assert _fastest([0.9, 0.8, 1.2, masked]) == 1
    assert _fastest([1.1, masked]) == 1


def _channel_pair(model_name: str, width: float):
    """A float64 zoo model with 50% channel masks under the channel backend shrunk on both sides, and its masked-dense
    definition: the same model where a removed filter's BatchNorm gamma and beta are zero too."""
    import copy

    from sparsetrain.core.schemes import parse_scheme
    from sparsetrain.execution.backends.channel_pairs import shrink_both_sides
    from sparsetrain.models import build_model

    torch.manual_seed(0)
    model = build_model(model_name, 10, width).double()
    ms = MaskSet.for_model(model, ["first", "last"])
    g = torch.Generator().manual_seed(0)
    for n, p in ms.params.items():
        ms.set_mask(n, parse_scheme("channel_out").mask(torch.rand(p.shape, generator=g, dtype=torch.float64), 0.5, n))
    chains = shrink_both_sides(model, apply_backend(model, ms, "channel"))
    ref = copy.deepcopy(model)
    for m in ref.modules():  # back to plain layers: the reference is masked dense
        if isinstance(m, nn.Conv2d):
            m.__class__ = nn.Conv2d
        elif isinstance(m, nn.BatchNorm2d):
            m.__class__ = nn.BatchNorm2d
        elif isinstance(m, nn.Linear):
            m.__class__ = nn.Linear
    return model, ref, ms, chains


def _train_side_by_side(nets, masksets, opts, seed: int, steps: int = 3) -> None:
    """``steps`` SGD steps of each net on the same float64 CIFAR-size batches, each with its masks attached."""
    for ms, opt in zip(masksets, opts):
        keep_masked(ms, opt)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g)
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()


def test_channels_shrunk_on_both_sides_compute_the_masked_dense_definition_in_float64():
    model, ref, ms, chains = _channel_pair("vgg16", 0.25)
    assert len(chains) == 12 and chains[-1][2] == "classifier"  # every sparse conv, the last one into the classifier
    bns = {bn for _, bn, _ in chains}
    mods = dict(ref.named_modules())
    for _, bn, _ in chains:  # the definition: the removed channels' gamma and beta are zero
        assert int((mods[bn].weight == 0).sum()) == mods[bn].num_features // 2
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    out, want = model(x), ref(x)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    want.square().sum().backward()
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        expected = ref_params[n].grad * ms.masks[n] if n in ms.masks else ref_params[n].grad
        torch.testing.assert_close(p.grad, expected, rtol=1e-10, atol=1e-12, msg=n)
    assert all(dict(model.named_modules())[bn].running_mean.abs().sum() > 0 for bn in bns)
    model.eval(), ref.eval()
    torch.testing.assert_close(model(x), ref(x), rtol=1e-12, atol=1e-12)  # running statistics agree too
    # each weight once in the state dict (a consumer's producer is a reference, not a submodule)
    assert len(model.state_dict()) == len(dict(model.named_parameters())) + len(dict(model.named_buffers()))


def test_channels_shrunk_on_both_sides_train_like_masked_dense_and_keep_residual_adds_one_sided():
    model, ref, ms, chains = _channel_pair("resnet20", 0.5)
    assert chains and all(c.endswith("conv1") and n.endswith("conv2") for c, _, n in chains)  # within blocks only
    ref_masks = MaskSet({n: dict(ref.named_parameters())[n] for n in ms.params})
    for n, m in ms.masks.items():
        ref_masks.set_mask(n, m)
    opts = [torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4) for net in (model, ref)]
    _train_side_by_side((model, ref), (ms, ref_masks), opts, seed=1)
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, ref_params[n], rtol=1e-9, atol=1e-11, msg=n)


def test_channel_both_sides_needs_the_channel_backend_and_a_static_mask():
    with pytest.raises(ValueError, match="channel_both_sides removes a filter's BatchNorm channel"):
        load_config(
            overrides=[
                "model.name=vgg16",
                "sparsity.method=rigl",
                "sparsity.sparsity=0.5",
                "sparsity.scheme=channel_out",
                "sparsity.backend=channel",
                "sparsity.channel_both_sides=true",
            ]
        )


def test_compact_channel_blocks_train_like_the_uncompacted_layers_and_export_dense_weights():
    import copy

    from sparsetrain.execution.backends.compact import compact_layers

    model, _, ms, chains = _channel_pair("vgg16", 0.25)
    small = copy.deepcopy(model)
    small_ms = MaskSet({n: dict(small.named_parameters())[n] for n in ms.params})
    for n, m in ms.masks.items():
        small_ms.set_mask(n, m)
    for mod in small.modules():  # the copies follow the copied MaskSet
        if hasattr(mod, "maskset"):
            mod.maskset = small_ms
    layers = {n: mod for n, mod in small.named_modules() if hasattr(mod, "backend") and mod.backend == "channel"}
    opts = [torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9) for net in (model, small)]
    done = compact_layers({f"{n}.weight": mod for n, mod in layers.items()}, small_ms, opts[1])
    assert len(done) == 12
    first = dict(small.named_modules())[chains[1][0]]  # a layer that reads a shrunk input: [32, 16 of 32, 3, 3] stored
    assert first.values.numel() == first.out_channels // 2 * first.in_channels // 2 * 9
    _train_side_by_side((model, small), (ms, small_ms), opts, seed=2)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(small(x), model(x), rtol=1e-10, atol=1e-12)
    state = small.state_dict()  # the plain model's keys and shapes, dense weights
    assert state[f"{chains[1][0]}.weight"].shape == dict(model.named_parameters())[f"{chains[1][0]}.weight"].shape
    plain = copy.deepcopy(model)
    plain.load_state_dict(state)
    torch.testing.assert_close(plain(x), model(x), rtol=1e-10, atol=1e-12)


def test_pytorchs_csr_beta_warning_does_not_reach_the_user():
    """PyTorch warns once per process that its CSR tensors are in beta; the CSR backend builds them for the user, who
    never asked for one (checked in a fresh process: the warning is emitted only once)."""
    import subprocess
    import sys

    child = (
        "import warnings, torch, torch.nn as nn\n"
        "import sparsetrain as st\n"
        "warnings.simplefilter('always')\n"
        "model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "sp = st.static(model, opt, sparsity=0.9, dense_layers=[], execution='csr')\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    model(torch.randn(8, 16)).sum().backward(); opt.step()\n"
        "print([str(w.message)[:60] for w in seen if 'CSR' in str(w.message)])\n"
        "print({n: m.ran for n, m in model.named_modules() if hasattr(m, 'ran')})\n"
    )
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-1000:]
    seen, ran = done.stdout.strip().splitlines()[-2:]
    assert seen == "[]" and "csr" in ran, (seen, ran, done.stderr[-500:])
    assert "beta state" not in done.stderr
