"""The condensed backend for Linear layers: equal to masked dense (float64 reference), compact storage, training."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsetrain.app.config import ConfigError, load_config
from sparsetrain.core.masks import MaskSet, random_masks
from sparsetrain.core.schemes import parse_scheme
from sparsetrain.execution import native
from sparsetrain.execution.backends import CondensedStructure, apply_backend, condensed_linear
from sparsetrain.execution.backends.compact import CompactLinear, compact_layers

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler for the condensed kernels")

SHAPES = [  # (tokens, in, out, density, fan_in)
    (1, 5, 3, 0.4, False),
    (63, 37, 23, 0.3, True),
    (64, 16, 64, 0.1, True),
    (65, 64, 16, 0.5, False),
    (130, 48, 96, 0.1, True),
    (200, 96, 40, 0.05, False),
    (150, 80, 40, 0.25, True),  # rows of 20: a group of 16 reduced together and 4 alone; 16 x 16 tiles and edges
    (97, 200, 33, 0.3, False),  # unstructured rows of about 60, every remainder
    (70, 520, 24, 0.03, False),  # several column chunks, rows with no entries in some of them
]


def _mask(out, inp, density, fan_in, seed=0):
    g = torch.Generator().manual_seed(seed)
    score = torch.rand(out, inp, generator=g)
    return parse_scheme("fan_in").mask(score, density) if fan_in else score < density


@pytest.mark.parametrize("tokens, inp, out, density, fan_in", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_outputs_and_gradients_equal_a_float64_masked_dense_layer(tokens, inp, out, density, fan_in, bias):
    torch.manual_seed(1)
    mask = _mask(out, inp, density, fan_in)
    w = (torch.randn(out, inp) * mask).requires_grad_()
    b = torch.randn(out, requires_grad=True) if bias else None
    x = torch.randn(tokens, inp, requires_grad=True)
    y = condensed_linear(x, w, b, CondensedStructure.from_mask(mask))
    w64, x64 = w.detach().double().requires_grad_(), x.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if bias else None
    ref = F.linear(x64, w64 * mask, b64)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(tokens, out)
    grads = torch.autograd.grad(y, [x, w] + ([b] if bias else []), g)
    refs = torch.autograd.grad(ref, [x64, w64] + ([b64] if bias else []), g.double())
    for got, want in zip(grads, refs):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(grads[1][~mask]) == 0  # no gradient computed for a pruned weight


def test_lists_with_columns_out_of_order_give_the_same_products():
    """The kernels take a row's entries in column chunks; lists whose columns are not ascending are taken whole."""
    torch.manual_seed(3)
    mask = _mask(40, 300, 0.2, False)
    row_ptr, col = CondensedStructure.from_mask(mask).rows
    values = torch.randn(col.numel())
    order = torch.cat([torch.randperm(int(n)) + int(a) for a, n in zip(row_ptr[:-1], row_ptr.diff())])
    x, g, bias = torch.randn(90, 300), torch.randn(90, 40), torch.randn(40)
    rows = (row_ptr, col[order].contiguous())
    y = native.condensed_forward(x, values[order], bias, rows, 40)
    gx, gw = native.condensed_backward(x, g, values[order], rows, True, True)
    w64 = torch.zeros(40, 300, dtype=torch.float64)
    w64[mask] = values.double()
    torch.testing.assert_close(y.double(), x.double() @ w64.T + bias.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), g.double() @ w64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw.double(), (g.double().T @ x.double())[mask][order], rtol=1e-5, atol=1e-5)


def test_batched_inputs_empty_rows_and_compact_values():
    torch.manual_seed(2)
    mask = _mask(12, 20, 0.3, False)
    mask[3] = False  # an output with no inputs: its bias alone
    mask[:, 7] = False  # an input no output reads: zero gradient
    s = CondensedStructure.from_mask(mask)
    w, b = torch.randn(12, 20) * mask, torch.randn(12)
    values = w.reshape(-1)[s.flat_index].clone().requires_grad_()
    x = torch.randn(3, 5, 20, requires_grad=True)
    y = condensed_linear(x, values, b, s)
    assert y.shape == (3, 5, 12)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[..., 3], b[3].expand(3, 5))
    g = torch.randn_like(y)
    gx, gv = torch.autograd.grad(y, (x, values), g)
    gw = g.reshape(-1, 12).t() @ x.detach().reshape(-1, 20)
    torch.testing.assert_close(gv, gw.reshape(-1)[s.flat_index], rtol=1e-5, atol=1e-5)  # kept weights, in row order
    torch.testing.assert_close(gx, g @ w, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(gx[..., 7]) == 0 and gv.shape == (int(mask.sum()),)


def test_the_backend_falls_back_to_csr_where_the_kernels_do_not_apply():
    model = nn.Sequential(nn.Linear(16, 8)).double()
    ms = MaskSet.for_model(model, [])
    random_masks(ms, 0.5, torch.Generator().manual_seed(0))
    layer = apply_backend(model, ms, "condensed")["0.weight"]
    model(torch.randn(4, 16, dtype=torch.float64))
    assert layer.ran == "csr"  # float64: what the float32 kernels do not cover
    model.float()
    model(torch.randn(4, 16))
    assert layer.ran == "condensed"


@pytest.mark.timing
def test_auto_considers_the_condensed_kernels_for_linear_layers():
    model = nn.Sequential(nn.Linear(256, 256))
    ms = MaskSet.for_model(model, [])
    random_masks(ms, 0.9, torch.Generator().manual_seed(0))
    layer = apply_backend(model, ms, "auto")["0.weight"]
    model(torch.randn(128, 256))
    assert set(layer.timings) == {"masked", "csr", "condensed"}
    assert layer.backend == min(layer.timings, key=layer.timings.get)


def test_convolutions_under_condensed_take_the_direct_kernels():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 36, 10))
    ms = MaskSet.for_model(model, [])
    random_masks(ms, 0.8, torch.Generator().manual_seed(0))
    layers = apply_backend(model, ms, "condensed")
    model(torch.randn(2, 3, 6, 6))
    assert {n: m.ran for n, m in layers.items()} == {"0.weight": "direct", "2.weight": "condensed"}


def _mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 48), nn.GELU(), nn.Linear(48, 5))


def _train(backend: str, compact: bool, method: str, steps: int = 6):
    import sparsetrain as st

    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    kw = dict(sparsity=0.8, scheme="fan_in", dense_layers=["last"], steps_per_epoch=2, epochs=steps // 2)
    sp = {
        "static": lambda: st.static(model, opt, **kw),
        "mest": lambda: st.mest(model, opt, every_epochs=1, **kw),
        "rigl": lambda: st.rigl(model, opt, update_every_steps=2, update_end=1.0, **kw),
    }[method]()
    if backend != "masked":
        layers = apply_backend(model, sp.maskset, backend)
        if compact:
            assert sorted(compact_layers(layers, sp.maskset, opt)) == ["0.weight", "2.weight"]
            assert all(type(layers[n]) is CompactLinear for n in ("0.weight", "2.weight"))
    g = torch.Generator().manual_seed(4)
    masks = []
    for _ in range(steps):
        x, y = torch.randn(70, 24, generator=g), torch.randint(0, 5, (70,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        masks.append({n: m.clone() for n, m in sp.maskset.masks.items()})
    return model, masks


@pytest.mark.parametrize("method", ["static", "mest", "rigl"])
@pytest.mark.parametrize("compact", [False, True])
def test_training_equals_masked_dense_over_a_few_steps(method, compact):
    ref, ref_masks = _train("masked", False, method)
    got, got_masks = _train("condensed", compact, method)
    for a, b in zip(ref_masks, got_masks):
        for n in a:
            assert torch.equal(a[n], b[n]), n  # the same mask decisions at every step
    if method != "static":  # the masks did move (RigL's growth read the full gradient the kernels do not compute)
        assert not torch.equal(ref_masks[0]["0.weight"], ref_masks[-1]["0.weight"])
    ref_state, got_state = ref.state_dict(), got.state_dict()
    assert ref_state.keys() == got_state.keys()  # compact layers still save a dense weight
    for k in ref_state:
        torch.testing.assert_close(got_state[k], ref_state[k], rtol=1e-4, atol=1e-5)


def test_compact_state_holds_only_the_kept_weights_and_their_adam_moments():
    import sparsetrain as st

    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = st.static(model, opt, sparsity=0.9, scheme="fan_in", dense_layers=["last"], total_steps=3)
    compact_layers(apply_backend(model, sp.maskset, "condensed"), sp.maskset, opt)
    F.cross_entropy(model(torch.randn(8, 24)), torch.randint(0, 5, (8,))).backward()
    opt.step()
    layer = model[2]
    k = round(0.1 * 48)
    assert layer.values.shape == (48 * k,) and "weight" not in layer._parameters
    assert {v.shape for v in opt.state[layer.values].values() if v.dim()} == {(48 * k,)}


def test_the_config_takes_condensed_with_compact_state_and_refuses_it_elsewhere():
    cfg = load_config(
        overrides=[
            "sparsity.method=static",
            "sparsity.sparsity=0.9",
            "sparsity.backend=condensed",
            "sparsity.compact_state=true",
        ]
    )
    assert cfg.sparsity.backend == "condensed"
    with pytest.raises(
        ConfigError, match="compact_state stores only kept weights under backend 'direct', 'condensed' or 'auto'"
    ):
        load_config(
            overrides=[
                "sparsity.method=static",
                "sparsity.sparsity=0.9",
                "sparsity.backend=csr",
                "sparsity.compact_state=true",
            ]
        )
    with pytest.raises(ConfigError, match="condensed"):
        load_config(overrides=["sparsity.backend=fast"])


@pytest.mark.parametrize("tokens", [1, 4, 7, 16, 33, 64])
def test_a_few_tokens_without_gradients_take_the_row_split_forward_and_equal_float64(tokens, monkeypatch):
    """Inference at batch 1 (gradients off, at most FEW_TOKENS tokens): the row-split kernel, padded to whole
    vectors, equals float64; with gradients on the same input takes the operator."""
    torch.manual_seed(tokens)
    mask = torch.rand(40, 70) < 0.2
    mask[3] = False  # a row with no kept weight: its bias alone
    w, b, x = torch.randn(40, 70) * mask, torch.randn(40), torch.randn(tokens, 70)
    calls = []
    few = native.condensed_forward_few
    monkeypatch.setattr(native, "condensed_forward_few", lambda *a: calls.append(1) or few(*a))
    with torch.no_grad():
        got = condensed_linear(x, w, b, CondensedStructure.from_mask(mask))
    assert calls == [1]
    torch.testing.assert_close(got.double(), F.linear(x.double(), w.double(), b.double()), rtol=1e-5, atol=1e-5)
    condensed_linear(x.requires_grad_(), w, b, CondensedStructure.from_mask(mask)).sum().backward()
    assert calls == [1] and x.grad is not None


@pytest.mark.parametrize("input_grad, weight_grad", [(True, False), (False, True)])
def test_each_gradient_alone_equals_the_one_computed_beside_the_other(input_grad, weight_grad):
    """The input gradient runs over the entries listed by input, the weights' over the rows: neither reads the
    other's buffers, so one asked for alone is bit-identical to the same one computed with both."""
    torch.manual_seed(3)
    s = CondensedStructure.from_mask(_mask(40, 70, 0.2, False))
    values, x, g = torch.randn(s.rows[1].numel()), torch.randn(130, 70), torch.randn(130, 40)
    gx, gv = native.condensed_backward(x, g, values, s.rows, True, True)
    alone = native.condensed_backward(x, g, values, s.rows, input_grad, weight_grad)
    assert (alone[0] is None) != input_grad and (alone[1] is None) != weight_grad
    assert torch.equal(alone[0] if input_grad else alone[1], gx if input_grad else gv)


needs_bf16 = pytest.mark.skipif(not native.bf16_kernels(), reason="no bfloat16 kernels in this build (AVX-512 only)")


@needs_bf16
@pytest.mark.parametrize("tokens, inp, out, density, fan_in", SHAPES)
def test_bfloat16_kernels_equal_float64_over_the_rounded_inputs(tokens, inp, out, density, fan_in):
    """bfloat16 inputs and gradients, float32 kept weights rounded to bfloat16 once: every output and input gradient
    within one rounding of the float64 product of the rounded operands, the kept weights' gradient (float32 sums of
    exact products) within float32's; odd rows pair their last weight with zeros, partial blocks and edges."""
    torch.manual_seed(2)
    mask = _mask(out, inp, density, fan_in)
    structure = CondensedStructure.from_mask(mask)
    values = torch.randn(int(mask.sum()))
    bias = torch.randn(out)
    x = torch.randn(tokens, inp).bfloat16()
    g = torch.randn(tokens, out).bfloat16()
    y = native.condensed_forward(x, values, bias, structure.rows, out)
    gx, gv = native.condensed_backward(x, g, values, structure.rows, True, True)
    assert (y.dtype, gx.dtype, gv.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    w = structure.dense(values.bfloat16().double())
    want_y = x.double() @ w.t() + bias.double()
    want_gx = g.double() @ w
    want_gv = (g.double().t() @ x.double())[mask]
    for got, want in ((y, want_y), (gx, want_gx)):  # one bfloat16 rounding (2^-8 relative), and float32 sums
        torch.testing.assert_close(got.double(), want, rtol=2**-8, atol=1e-5 * want.abs().max().item() + 1e-6)
    torch.testing.assert_close(gv.double(), want_gv, rtol=1e-5, atol=1e-5)


@needs_bf16
def test_bfloat16_autocast_runs_condensed_layers_in_bfloat16_like_a_masked_layer_under_autocast():
    """Under CPU autocast to bfloat16 a condensed Linear (dense weight or compact values) returns bfloat16 as a
    masked dense Linear does under autocast, close to it; its weights and their gradients stay float32; no float32
    warning is said for it; the masked weights stay zero through optimizer steps; torch.compile sees no break."""
    import warnings

    import sparsetrain as st

    def run(execution, compact):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(96, 128), nn.GELU(), nn.Linear(128, 96))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sp = st.static(model, opt, sparsity=0.8, dense_layers=(), execution=execution, compact_state=compact)
        x = torch.randn(3, 70, 96, generator=torch.Generator().manual_seed(5))
        outs = []
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing said: these layers follow autocast
            for _ in range(3):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y = model(x)
                outs.append(y.detach())
                opt.zero_grad()
                y.float().square().mean().backward()
                opt.step()
        return sp, outs

    ref_sp, ref = run("masked", False)
    for compact in (False, True):
        sp, got = run("condensed", compact)
        assert all(y.dtype == torch.bfloat16 for y in got)
        if compact:  # the same under torch.compile: one graph, the dtype decided in it

            def loss(x):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return sp.model(x).float().square().mean()

            explained = torch._dynamo.explain(loss)(torch.randn(2, 70, 96))
            assert explained.graph_break_count == 0, explained.break_reasons
        torch.testing.assert_close(got[0].float(), ref[0].float(), rtol=0.02, atol=0.02)
        weights = sp.export_state()
        for name, mask in sp.maskset.masks.items():
            assert weights[name].dtype == torch.float32
            assert torch.count_nonzero(weights[name][~mask]) == 0
