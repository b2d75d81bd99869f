"""SWAT: gradients against explicitly masked dense autograd, compressed saved activations, variants, conversion."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import tiny_datasets

from sparsetrain.app import Trainer, load_checkpoint
from sparsetrain.app.config import ConfigError, load_config
from sparsetrain.core.accounting import saved_tensor_bytes_by_module
from sparsetrain.execution.activations import BitReLU, replace_activations
from sparsetrain.execution.backends import swat as swat_module
from sparsetrain.execution.backends.swat import (
    SWATConv2d,
    convert,
    harden,
    revert,
    swat_conv2d,
    swat_layers,
    swat_linear,
    threshold_and_share,
    topk_threshold,
)
from sparsetrain.execution.bits import pack_bits, unpack_bits
from sparsetrain.models import build_model

CONV_CASES = [  # (cin, cout, k, stride, padding, dilation, groups)
    (4, 6, 3, 1, 1, 1, 1),
    (4, 6, 3, 2, 0, 1, 1),
    (4, 8, 3, 1, 2, 2, 2),
    (6, 6, 3, 1, 1, 1, 6),
    (3, 5, 1, 2, 0, 1, 1),
]


def _thresholds(w, x, density):
    return topk_threshold(w, density), topk_threshold(x, density)


@pytest.mark.parametrize("cin, cout, k, stride, padding, dilation, groups", CONV_CASES)
def test_conv_gradients_equal_masked_dense_autograd(cin, cout, k, stride, padding, dilation, groups):
    torch.manual_seed(0)
    x = torch.randn(3, cin, 9, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(cout, cin // groups, k, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(cout, dtype=torch.float64, requires_grad=True)
    wt, at = _thresholds(w, x, 0.4)
    # dx: the forward really is conv(x, W_s), so gradcheck (numerical vs analytical) in float64
    assert torch.autograd.gradcheck(
        lambda xx: swat_conv2d(xx, w.detach(), b.detach(), None, wt, at, stride, padding, dilation, groups), (x,)
    )
    out = swat_conv2d(x, w, b, None, wt, at, stride, padding, dilation, groups)
    g = torch.randn_like(out)
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), g)
    # reference: autograd on explicitly masked dense tensors; dW from the top-K input, dense (every weight)
    w_s = (w * (w.abs() >= wt)).detach().requires_grad_()
    x_s = (x * (x.abs() >= at)).detach().requires_grad_()
    x_full = x.detach().requires_grad_()
    ref_gx = torch.autograd.grad(F.conv2d(x_full, w_s.detach(), b, stride, padding, dilation, groups), x_full, g)[0]
    ref_gw = torch.autograd.grad(F.conv2d(x_s, w_s, b, stride, padding, dilation, groups), w_s, g)[0]
    torch.testing.assert_close(gx, ref_gx)
    torch.testing.assert_close(gw, ref_gw)
    torch.testing.assert_close(gb, g.sum((0, 2, 3)))
    assert torch.count_nonzero(gw[w.abs() < wt]) > 0  # the update is dense: pruned weights get gradients


def test_linear_gradients_equal_masked_dense_autograd():
    torch.manual_seed(1)
    x = torch.randn(5, 7, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    wt, at = _thresholds(w, x, 0.3)
    assert torch.autograd.gradcheck(lambda xx: swat_linear(xx, w.detach(), b.detach(), None, wt, at), (x,))
    out = swat_linear(x, w, b, None, wt, at)
    g = torch.randn_like(out)
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), g)
    w_s = (w * (w.abs() >= wt)).detach()
    x_s = (x * (x.abs() >= at)).detach()
    torch.testing.assert_close(gx, g @ w_s)
    torch.testing.assert_close(gw, g.reshape(-1, 9).t() @ x_s.reshape(-1, 12))
    torch.testing.assert_close(gb, g.reshape(-1, 9).sum(0))


@pytest.fixture
def compressed_kernel_calls(monkeypatch):
    """Send every shape to the compressed weight-gradient kernel (the dispatch keeps it to those where it pays,
    see ``test_compressed_weight_gradient_runs_where_it_pays``) and count its calls, so a test can check it ran."""
    from sparsetrain.execution import native

    if not native.available():
        pytest.skip("native kernels unavailable")
    calls, kernel = [], native.compressed_weight_grad
    monkeypatch.setattr(swat_module, "_wgrad_pays", lambda *shape: True)
    monkeypatch.setattr(native, "compressed_weight_grad", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    return calls


COMPRESSED_CASES = [  # (cin, cout, k, stride, padding, dilation, h): stride 1 kernels up to 3 wide take the fast path
    (5, 70, 3, 1, 1, 1, 9),  # a tail block of 6 output channels
    (16, 64, 3, 1, 1, 1, 7),  # one full block
    (8, 130, 3, 2, 1, 1, 9),  # stride 2: the general path
    (6, 9, 3, 1, 2, 2, 8),  # dilation
    (67, 20, 1, 1, 0, 1, 5),  # 1x1, an input tile that is not a multiple of 64
    (4, 12, 5, 1, 2, 1, 6),  # a kernel wider than 3: the general path
]


@pytest.mark.parametrize("cin, cout, k, stride, padding, dilation, h", COMPRESSED_CASES)
def test_weight_gradient_from_the_compressed_input_equals_float64(
    cin, cout, k, stride, padding, dilation, h, compressed_kernel_calls
):
    """dW read straight from the bitmask and values (no rebuilt input) against float64 autograd on x_s."""
    torch.manual_seed(cin + cout)
    x = torch.randn(3, cin, h, h).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(cout, cin, k, k, requires_grad=True)
    wt, at = _thresholds(w, x, 0.15)  # kept input share below COMPRESSED_WGRAD_MAX_DENSITY: the kernel runs
    out = swat_conv2d(x, w, None, None, wt, at, stride, padding, dilation)
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), g)
    x_s = (x * (x.abs() >= at)).detach().double()
    w_s = (w * (w.abs() >= wt)).detach().double().requires_grad_()
    ref_gw = torch.autograd.grad(F.conv2d(x_s, w_s, None, stride, padding, dilation), w_s, g.double())[0]
    ref_gx = torch.nn.grad.conv2d_input(x.shape, w_s.detach(), g.double(), stride, padding, dilation)
    assert compressed_kernel_calls
    torch.testing.assert_close(gw.double(), ref_gw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), ref_gx, rtol=1e-5, atol=1e-5)


def test_linear_weight_gradient_from_the_compressed_input_equals_float64(compressed_kernel_calls):
    torch.manual_seed(2)
    x = torch.randn(6, 50, 96, requires_grad=True)  # 300 tokens: blocks of tokens, a last short one
    w = torch.randn(70, 96, requires_grad=True)
    wt, at = _thresholds(w, x, 0.1)
    out = swat_linear(x, w, None, None, wt, at)
    g = torch.randn_like(out)
    gw = torch.autograd.grad(out, w, g)[0]
    x_s = (x * (x.abs() >= at)).detach().double().reshape(-1, 96)
    assert compressed_kernel_calls
    torch.testing.assert_close(gw.double(), g.double().reshape(-1, 70).t() @ x_s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "cin, cout, k, stride, padding, size",
    [
        (5, 7, 3, 1, 1, 16),  # tiled forward and input gradient
        (4, 6, 3, 2, 1, 9),  # the plain direct kernels, stride 2
        (3, 70, 1, 1, 0, 5),  # 1x1, batch innermost, a tail block of output channels in dW
    ],
)
@pytest.mark.parametrize("layout", ["contiguous_format", "channels_last"])
def test_swat_on_the_direct_kernels_equals_float64(
    cin, cout, k, stride, padding, size, layout, compressed_kernel_calls
):
    """backend "direct": W_s listed from the threshold, forward and input gradient on the direct kernels (NCHW or
    channels-last, as the input comes), dW from the compressed input; the same numbers as float64 autograd on the
    masked tensors, and the input's layout kept."""
    torch.manual_seed(cin * cout)
    holder = nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding))
    convert(holder, {"0.weight": 0.2}, 0.15)
    layer = holder[0]
    layer.fix_backend("direct")
    fmt = getattr(torch, layout)
    x = torch.randn(3, cin, size, size).contiguous(memory_format=fmt).requires_grad_()
    assert layer.runs_direct(x)
    out = holder(x)
    channels_last = layout == "channels_last"  # (NCHW's small planes come back batch-innermost, as a view)
    assert out.is_contiguous(memory_format=fmt) or not channels_last
    g = torch.randn_like(out)
    gx, gw, gb = torch.autograd.grad(out, (x, layer.weight, layer.bias), g)
    w64 = (layer.weight * layer.current_mask()).detach().double()
    x64 = x.detach().double().requires_grad_()
    ref = F.conv2d(x64, w64, layer.bias.detach().double(), stride, padding)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), torch.autograd.grad(ref, x64, g.double())[0], rtol=1e-5, atol=1e-5)
    x_s = (x * (x.abs() >= layer.a_thresh)).detach().double()
    ref_gw = torch.nn.grad.conv2d_weight(x_s, w64.shape, g.double(), stride, padding)
    assert compressed_kernel_calls
    torch.testing.assert_close(gw.double(), ref_gw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb.double(), g.double().sum((0, 2, 3)), rtol=1e-5, atol=1e-5)
    assert gx.is_contiguous(memory_format=fmt) or not channels_last
    with pytest.raises(ValueError, match="unknown SWAT backend 'csr'"):
        layer.fix_backend("csr")


def test_compressed_weight_gradient_runs_where_it_pays(monkeypatch):
    """The kernel sums blocks of 64 output channels at every kernel tap: layers with whole blocks at stride 1 and few
    kept inputs take it; a 16-channel layer, a strided one, or a dense input rebuild and run the dense product."""
    from sparsetrain.execution import native

    if not native.available():
        pytest.skip("native kernels unavailable")
    calls, kernel = [], native.compressed_weight_grad
    monkeypatch.setattr(
        native, "compressed_weight_grad", lambda *a, **k: calls.append(a[3].shape[-1]) or kernel(*a, **k)
    )
    for cout, stride, act in ((64, 1, 0.1), (16, 1, 0.1), (128, 2, 0.1), (128, 1, 0.5)):
        torch.manual_seed(cout)
        x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
        w = torch.randn(cout, 8, 3, 3, requires_grad=True)
        wt, at = _thresholds(w, x, act)
        out = swat_conv2d(x, w, None, None, wt, at, stride, 1)
        gw = torch.autograd.grad(out, w, torch.ones_like(out))[0]
        x_s = (x * (x.abs() >= at)).detach()
        torch.testing.assert_close(
            gw, torch.nn.grad.conv2d_weight(x_s, w.shape, torch.ones_like(out), stride, 1), rtol=1e-4, atol=1e-4
        )
    assert calls == [64]


def test_a_pointwise_layer_takes_the_compressed_weight_gradient_only_for_few_kept_inputs_on_small_maps():
    """A 1 x 1 kernel reuses nothing across taps: on ResNet-50's 56 x 56 and 28 x 28 maps with 20% kept, the
    rebuilt input and the dense product are faster (measured: see POINTWISE_WGRAD_LIMIT); 3 x 3 layers keep it."""
    pays = swat_module._wgrad_pays
    assert not pays(256, 1, (1, 1), 56 * 56, 0.2) and not pays(128, 1, (1, 1), 28 * 28, 0.2)
    assert pays(256, 1, (1, 1), 14 * 14, 0.2) and pays(128, 1, (1, 1), 28 * 28, 0.1)
    assert pays(64, 1, (3, 3), 56 * 56, 0.2)
    assert not pays(64, 2, (3, 3), 56 * 56, 0.05) and not pays(48, 1, (3, 3), 7 * 7, 0.05)  # strided; no whole block


def test_compressed_weight_gradient_refuses_a_mismatched_bitmask():
    from sparsetrain.execution import native

    if not native.available():
        pytest.skip("native kernels unavailable")
    x = torch.randn(2, 3, 3, 4)
    packed, values = native.compress(x.reshape(-1), 0.5)
    with pytest.raises(ValueError, match="set bits but"):
        native.compressed_weight_grad(packed, values[:-1], (2, 3, 3, 4), torch.randn(2, 3, 3, 5), (1, 1))
    with pytest.raises(ValueError, match="feature maps up to 1023"):
        native.compressed_weight_grad(packed, values, (1, 1024, 1, 2), torch.randn(1, 1024, 1, 5), (1, 1))


def test_saved_activation_is_compressed_with_the_stated_nonzeros():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    convert(conv_holder := nn.Sequential(conv), {"0.weight": 0.1})
    x = torch.randn(8, 16, 16, 16)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        conv_holder(x).sum().backward()
    packed, values = saved[0], saved[1]
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(x.numel() / 8)
    assert values.numel() == math.ceil(0.1 * x.numel())  # exact top-K of a continuous input
    stored = packed.nbytes + values.nbytes
    assert stored < 0.2 * x.nbytes
    assert int(conv.current_mask().sum()) == math.ceil(0.1 * conv.weight.numel())


def test_bit_packing_round_trips():
    m = torch.rand(1001) > 0.7
    assert torch.equal(unpack_bits(pack_bits(m), m.numel()), m)


def test_bit_relu_is_an_exact_relu():
    x = torch.randn(4, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(BitReLU(), (x,))
    torch.testing.assert_close(BitReLU()(x), F.relu(x))


@pytest.mark.parametrize("use_native", [True, False])
def test_bit_relu_in_place_overwrites_its_input_and_matches_relu(use_native, monkeypatch):
    from sparsetrain.execution import native

    monkeypatch.setattr(native, "_lib", native._lib if use_native else None)
    x = torch.randn(3, 4, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(3, 4, 5, 5)
    y = x * 1.0
    out = BitReLU(inplace=True)(y)
    assert out.data_ptr() == y.data_ptr()
    (gx,) = torch.autograd.grad(out, x, grad)
    torch.testing.assert_close(out, F.relu(x), rtol=0, atol=0)
    torch.testing.assert_close(gx, grad * (x > 0), rtol=0, atol=0)


def test_bit_relu_returns_the_gradient_in_the_layout_of_its_input():
    # a pooled gradient arrives NCHW while the model runs channels-last: the layers below must stay channels-last
    x = torch.randn(2, 6, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(2, 6, 5, 5)
    (gx,) = torch.autograd.grad(BitReLU()(x), x, grad)
    assert gx.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(gx, grad * (x > 0), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
# (rows of 2 to 16 inputs and of 32 and more run the two vector forms of a contiguous NCHW input; odd sizes and
# widths between, the general one)
@pytest.mark.parametrize(
    "shape", [(2, 3, 6, 8), (2, 20, 7, 9), (1, 1, 4, 4), (3, 2, 2, 2), (2, 5, 16, 16), (2, 3, 32, 40), (1, 2, 6, 12)]
)
def test_compact_max_pool_is_an_exact_max_pool_saving_a_byte_per_output(shape, fmt):
    from sparsetrain.execution.activations import CompactMaxPool2d, compact_pools

    torch.manual_seed(0)
    x = torch.randn(shape)
    x[0, 0, 0, 0] = float("nan")  # NaN wins its window, as in PyTorch
    x[-1, -1, 0, 1] = x[-1, -1, 0, 0]  # a tie: the first position wins
    x = x.contiguous(memory_format=fmt).requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = CompactMaxPool2d()(x)
    ref = nn.MaxPool2d(2)(ref_x)
    torch.testing.assert_close(out, ref, equal_nan=True)
    assert out.is_contiguous(memory_format=fmt) or shape[1] == 1
    g = torch.randn_like(ref)
    assert torch.equal(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, ref_x, g)[0])
    assert [t.dtype for t in saved] == [torch.uint8] and saved[0].numel() == ref.numel()
    with torch.no_grad():  # inference: the same kernel, keeping no positions
        torch.testing.assert_close(CompactMaxPool2d()(x.detach()), ref, equal_nan=True, rtol=0, atol=0)
    model = nn.Sequential(nn.MaxPool2d(2), nn.MaxPool2d(3), nn.MaxPool2d(2, padding=1), nn.MaxPool2d(2, 2))
    assert compact_pools(model) == 2 and [type(m).__name__ for m in model] == [
        "CompactMaxPool2d",
        "MaxPool2d",
        "MaxPool2d",
        "CompactMaxPool2d",
    ]
    assert compact_pools(model, undo=True) == 2 and all(type(m) is nn.MaxPool2d for m in model)


def test_thresholds_refresh_every_period_and_are_checkpointed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10))
    convert(model, {"0.weight": 0.5}, period=3)
    layer = model[0]
    thresholds = []
    for step in range(7):
        model(torch.randn(4, 10)).sum().backward()
        with torch.no_grad():
            model[0].weight.add_(torch.randn(10, 10) * 0.1)
        thresholds.append(float(layer.a_thresh))
    assert (
        thresholds[0]
        == thresholds[1]
        == thresholds[2]
        != thresholds[3]
        == thresholds[4]
        == thresholds[5]
        != thresholds[6]
    )
    assert {"0.w_thresh", "0.a_thresh", "0.steps", "0.w_mask"} <= set(model.state_dict())


def test_convert_revert_and_harden_any_module():
    torch.manual_seed(0)
    model = build_model("resnet20")
    before = {n: p for n, p in model.named_parameters()}
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))][1:]
    convert(model, {f"{n}.weight": 0.2 for n in names})
    assert len(swat_layers(model)) == len(names) and isinstance(model.layer1[0].conv1, SWATConv2d)
    assert all(p is before[n] for n, p in model.named_parameters())  # same parameters: optimizers keep working
    model(torch.randn(2, 3, 32, 32))
    revert(model)
    assert type(model.layer1[0].conv1) is nn.Conv2d and not swat_layers(model)
    convert(model, {f"{n}.weight": 0.2 for n in names})
    plain = harden(model)
    w = plain.layer2[0].conv2.weight
    # exactly the layer's budget, never fewer zeros than asked: floor(0.2 * 9216) = 1843 kept (the forward's top-K
    # rounds up to 1844, which would leave 79.99% zeros)
    assert type(plain.layer2[0].conv2) is nn.Conv2d and int((w != 0).sum()) == math.floor(0.2 * w.numel())
    with pytest.raises(ValueError, match="not the weight of a plain Conv2d or Linear"):
        convert(build_model("resnet20"), {"bn1.weight": 0.5})


@pytest.mark.parametrize("structure", ["channel_out", "kernel"])
def test_structured_swat_keeps_whole_units_by_l1(structure):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3))
    convert(model, {"0.weight": 0.5}, structure=structure)
    mask = model[0].current_mask()
    units = mask.reshape(16, -1) if structure == "channel_out" else mask.reshape(16 * 8, -1)
    assert bool((units.all(1) | ~units.any(1)).all())  # whole units on or off
    norms = model[0].weight.detach().abs().reshape(units.shape[0], -1).sum(1)
    on = units.any(1)
    assert norms[on].min() >= norms[~on].max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # the C kernels and the torch path
def test_threshold_keeps_only_nonzeros_when_fewer_than_k_exist(dtype):
    x = torch.zeros(1000, dtype=dtype)
    x[:300] = torch.linspace(0.5, 3.0, 300, dtype=dtype)  # 30% nonzero, asked to keep 50%
    thr, share = threshold_and_share(x, 0.5)
    assert float(thr) == 0.5 and share == 0.3
    thr, share = threshold_and_share(torch.zeros(10, dtype=dtype), 0.5)
    assert float(thr) > 0 and share == 0.0


def test_structured_swat_keeps_every_class_of_the_classifier():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    convert(model, {"0.weight": 0.5, "2.weight": 0.5}, structure="channel_out")
    conv_units = model[0].current_mask().reshape(8, -1)
    assert int(conv_units.all(1).sum()) == 4  # convolution: whole output channels
    kept = model[2].current_mask()
    assert int(kept.sum()) == kept.numel() // 2 and bool(
        kept.any(1).all()
    )  # classifier: single weights, no class dropped


def test_swat_m_follows_momentum_and_respects_its_cap(tmp_path):
    cfg = load_config(
        overrides=[
            "model.name=small_cnn",
            "data.dataset=mnist",
            "optim.batch_size=32",
            "run.threads=1",
            "run.progress=false",
            "model.channels_last=false",
            "optim.epochs=1",
            f"run.out_dir={tmp_path}",
            "sparsity.method=swat",
            "sparsity.sparsity=0.8",
            "sparsity.swat.variant=m",
            "sparsity.swat.m_max_density=0.6",
        ]
    )
    trainer = Trainer(cfg, datasets=tiny_datasets())
    trainer.fit()
    method = trainer.method
    dens = method.rebalance()
    assert max(dens.values()) <= 0.6 + 1e-9
    total = sum(method.numel.values())
    assert sum(dens[n] * method.numel[n] for n in dens) == pytest.approx(0.2 * total, rel=1e-6)


def test_swat_m_rebalances_between_epochs_but_not_after_the_last(tmp_path):
    cfg = load_config(
        overrides=[
            "model.name=small_cnn",
            "data.dataset=mnist",
            "optim.batch_size=32",
            "run.threads=1",
            "run.progress=false",
            "model.channels_last=false",
            "optim.epochs=2",
            f"run.out_dir={tmp_path}",
            "sparsity.method=swat",
            "sparsity.sparsity=0.8",
            "sparsity.swat.variant=m",
        ]
    )
    trainer = Trainer(cfg, datasets=tiny_datasets())
    method = trainer.method
    calls = []
    original = method.rebalance
    method.rebalance = lambda: calls.append(method.clock.epoch) or original()
    trainer.fit()
    assert calls == [1]  # after epoch 1 of 2; the final model is evaluated on the budgets it trained with


def test_swat_training_reports_sparsities_flops_and_exports_a_plain_sparse_model(tmp_path):
    cfg = load_config(
        overrides=[
            "model.name=small_cnn",
            "data.dataset=mnist",
            "optim.batch_size=32",
            "run.threads=1",
            "run.progress=false",
            "model.channels_last=false",
            "optim.epochs=2",
            f"run.out_dir={tmp_path}",
            "sparsity.method=swat",
            "sparsity.sparsity=0.8",
            "sparsity.swat.activation_sparsity=0.5",
            "sparsity.swat.topk_period=4",
        ]
    )
    summary = Trainer(cfg, datasets=tiny_datasets()).fit()
    assert summary["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert summary["activation_sparsity"] == pytest.approx(0.5, abs=0.02)
    # forward and input gradient at 20% of the sparse layers, weight gradient at 50% (first conv dense)
    assert 0.2 < summary["train_flops_rel"] < 0.5
    state = load_checkpoint(tmp_path / "model.pt")["model"]
    plain = build_model("small_cnn")
    plain.load_state_dict(state)  # the plain architecture's keys
    w = plain[3].weight
    assert (w != 0).float().mean().item() == pytest.approx(0.2, abs=0.01)


def test_swat_training_on_the_direct_kernels_matches_the_dense_products(tmp_path, compressed_kernel_calls):
    """backend direct (NCHW, 32 x 32 planes: the tiled kernels, dW from the compressed input) takes the same
    training step as backend masked, thresholds and optimizer included. One step: the top-K sets depend on which
    entry sits at the K-th place, and float sums in another order can move that boundary by one entry on later
    steps (the layers' own products are checked against float64 above). An unknown backend is refused."""
    from sparsetrain.execution import native

    if not native.available():
        pytest.skip("native kernels unavailable")

    def run(backend):
        cfg = load_config(
            overrides=[
                "model.name=resnet20",
                "data.dataset=cifar10",
                "optim.batch_size=32",
                "run.threads=1",
                "run.progress=false",
                "model.channels_last=false",
                "optim.epochs=1",
                f"run.out_dir={tmp_path / backend}",
                "sparsity.method=swat",
                "sparsity.sparsity=0.9",
                "sparsity.swat.activation_sparsity=0.9",
                "sparsity.swat.topk_period=2",
                f"sparsity.backend={backend}",
            ]
        )
        trainer = Trainer(cfg, datasets=tiny_datasets(n_train=32, shape=(3, 32, 32)))
        trainer.fit()
        return trainer

    masked = run("masked")
    calls_masked = len(compressed_kernel_calls)  # the classifier's only: masked NCHW convolutions rebuild the input
    direct = run("direct")
    assert len(compressed_kernel_calls) > 2 * calls_masked
    layers = [m for m in direct.model.modules() if isinstance(m, SWATConv2d) and m.density < 1]
    assert layers and all(m.ran == "direct" for m in layers)
    for k, v in masked.model.state_dict().items():
        torch.testing.assert_close(direct.model.state_dict()[k], v, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="method 'swat' runs under backend 'masked', 'direct' or 'auto'"):
        load_config(overrides=["sparsity.method=swat", "sparsity.sparsity=0.9", "sparsity.backend=csr"])


def test_swat_cuts_what_conv_layers_save_for_backward():
    torch.manual_seed(0)
    model = build_model("resnet20")
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    step = lambda: F.cross_entropy(model(x), y).backward()  # noqa: E731
    dense = saved_tensor_bytes_by_module(step, model)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))][1:]
    convert(model, {f"{n}.weight": 0.1 for n in names})
    replace_activations(model, nn.ReLU, lambda old: BitReLU())
    sparse = saved_tensor_bytes_by_module(step, model)
    assert sparse["Conv2d"] < 0.5 * dense["Conv2d"]
    assert sparse["total"] < 0.77 * dense["total"]


def test_flops_cli_gives_swat_reductions_by_the_formulas():
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparsetrain.app.cli",
            "flops",
            "--model",
            "resnet20",
            "--dataset",
            "cifar10",
            "--method",
            "swat",
            "--sparsity",
            "0.9",
            "--activation-sparsity",
            "0.5",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    r = json.loads(out.stdout)
    dense, sparse = r["train_flops_dense"], r["train_flops"]
    first = next(ly for ly in r["layers"] if ly["name"] == "conv1.weight")
    assert first["density"] == 1.0 and next(ly for ly in r["layers"] if ly["name"] == "fc.weight")[
        "density"
    ] == pytest.approx(0.1)
    rest_fwd = dense["forward"] - first["forward_flops"]
    assert sparse["forward"] == pytest.approx(first["forward_flops"] + 0.1 * rest_fwd)
    assert sparse["input_grad"] == pytest.approx(0.1 * dense["input_grad"])  # the first layer has none
    assert sparse["weight_grad"] == pytest.approx(first["forward_flops"] + 0.5 * rest_fwd)
    assert r["infer_flops_rel"] == pytest.approx(sparse["forward"] / dense["forward"])


def test_channels_last_inputs_give_the_same_gradients():
    torch.manual_seed(3)
    x = torch.randn(4, 8, 10, 10)
    w = torch.randn(6, 8, 3, 3, requires_grad=True)
    wt, at = topk_threshold(w, 0.3), topk_threshold(x, 0.3)
    grads = []
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        inp = inp.detach().requires_grad_()
        out = swat_conv2d(inp, w, None, None, wt, at, 1, 1)
        gx, gw = torch.autograd.grad(out, (inp, w), torch.ones_like(out))
        grads.append((gx.contiguous(), gw))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    y = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = BitReLU()(y)
    torch.testing.assert_close(torch.autograd.grad(out, y, torch.ones_like(out))[0], (y > 0).float())


def test_removed_filters_get_inflated_gradients_under_channel_out_but_not_kernel():
    """Why structured SWAT keeps kernels by default: a removed filter's output is constant, and BatchNorm
    scales the gradient of a constant channel by 1/sqrt(eps), so the dense update inflates removed filters."""
    torch.manual_seed(0)
    base = nn.Sequential(
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
    )
    x, r = torch.randn(8, 16, 8, 8), torch.randn(8, 32, 8, 8)
    ratios = {}
    for structure in ("channel_out", "kernel"):
        model = copy.deepcopy(base)
        convert(model, {"3.weight": 0.5}, 0.5, 20, structure)
        (model(x) * r).sum().backward()
        keep, g = model[3].w_mask, model[3].weight.grad
        rms = lambda t: float(t.norm() / t.numel() ** 0.5)  # noqa: E731
        ratios[structure] = rms(g[~keep]) / rms(g[keep])
    assert ratios["channel_out"] > 20
    assert 0.2 < ratios["kernel"] < 5


def test_padding_same_is_taken_where_both_sides_pad_alike_and_refused_otherwise():
    """``padding="same"`` on an odd kernel is its numbers (equal to the layer's own output); on an even kernel, which
    pads one side more, SWAT refuses it naming the kernel and what to give instead."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    odd = nn.Sequential(nn.Conv2d(3, 4, 3, padding="same"))
    want = odd(x)
    convert(odd, {"0.weight": 1.0})
    torch.testing.assert_close(odd(x), want)
    even = nn.Sequential(nn.Conv2d(3, 4, 2, padding="same"))
    convert(even, {"0.weight": 1.0})
    with pytest.raises(ValueError) as e:
        even(x)
    assert str(e.value) == (
        "SWAT takes padding='same' where it pads both sides alike (odd kernels); this layer's kernel (2, 2) with "
        "dilation (1, 1) does not: give its padding in numbers"
    )
