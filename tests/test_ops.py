"""The kernels as PyTorch operators (``torch.ops.sparsetrain.*``): registered with their fake implementations and
backward, checked by ``torch.library.opcheck``, and compiled by ``torch.compile(fullgraph=True)`` without a graph
break, equal to eager."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsetrain.core.masks import MaskSet
from sparsetrain.core.schemes import parse_scheme
from sparsetrain.execution import native, ops
from sparsetrain.execution.backends import CondensedStructure, apply_backend

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler for the kernels")


def _condensed_args(tokens=70, inp=40, out=24, fan_in=6, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = parse_scheme("fan_in").mask(torch.rand(out, inp, generator=g), fan_in / inp)
    s = CondensedStructure.from_mask(mask)
    x = torch.randn(tokens, inp, generator=g, requires_grad=True)
    values = torch.randn(int(mask.sum()), generator=g, requires_grad=True)
    b = torch.randn(out, generator=g, requires_grad=True) if bias else None
    return (x, values, b, *s.rows, out), s


def test_the_operators_are_registered_under_one_namespace():
    assert torch.ops.sparsetrain.condensed_linear.default is not None
    assert torch.ops.sparsetrain.condensed_linear_backward.default is not None


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_passes_for_the_condensed_linear_operator(bias):
    """Schema, fake (shapes without data), autograd registration and AOT dispatch, as PyTorch checks them."""
    args, _ = _condensed_args(bias=bias)
    torch.library.opcheck(torch.ops.sparsetrain.condensed_linear.default, args)


def test_the_operator_and_its_gradients_equal_a_float64_masked_dense_product():
    args, s = _condensed_args()
    x, values, b, row_ptr, col, out = args
    y = ops.condensed_linear(*args)
    g = torch.randn_like(y)
    gx, gv, gb = torch.autograd.grad(y, (x, values, b), g)
    w64 = s.dense(values.detach().double())
    ref = x.detach().double() @ w64.t() + b.detach().double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), g.double() @ w64, rtol=1e-5, atol=1e-5)
    full = g.double().t() @ x.detach().double()
    torch.testing.assert_close(gv.double(), full.reshape(-1)[s.flat_index], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb.double(), g.double().sum(0), rtol=1e-5, atol=1e-5)


def test_the_fake_gives_shapes_without_running_the_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args, _ = _condensed_args()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(a) if torch.is_tensor(a) else a for a in args]
        y = ops.condensed_linear(*fake)
    assert tuple(y.shape) == (70, 24)


def _fan_in_mlp(compact: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
    ms = MaskSet.for_model(model, [])
    g = torch.Generator().manual_seed(0)
    for n, p in ms.params.items():
        ms.set_mask(n, parse_scheme("fan_in").mask(torch.rand(p.shape, generator=g), 0.25, n))
    layers = apply_backend(model, ms, "condensed")
    if compact:
        from sparsetrain.execution.backends.compact import compact_layers

        compact_layers(layers, ms, None)
    return model


@pytest.mark.parametrize("compact", [False, True])
def test_compile_fullgraph_has_no_graph_break_and_equals_eager(compact):
    model = _fan_in_mlp(compact)
    x, y = torch.randn(40, 32), torch.randint(0, 8, (40,))

    def loss_fn(inp):
        return F.cross_entropy(model(inp), y)

    eager = loss_fn(x)  # a first eager step builds the layers' structures (the mask's lists), as training does
    grads_eager = torch.autograd.grad(eager, list(model.parameters()))
    explained = torch._dynamo.explain(loss_fn)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    grads = torch.autograd.grad(got, list(model.parameters()))
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, grads_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "hw, stride, padding, channels_last, plan",
    [
        (72, 1, 1, False, (False, False)),
        (48, 2, 1, False, (False, False)),
        (16, 1, 1, False, (False, True)),
        (28, 1, 1, False, (False, True)),
        (5, 1, 1, False, (True, False)),
        (12, 1, 1, True, None),
        (9, 2, 0, True, None),
    ],
    ids=["planes", "strided", "tiled", "tiled-part-vector", "batch-inner", "nhwc", "nhwc-strided"],
)
def test_opcheck_passes_for_the_direct_convolution_operator(hw, stride, padding, channels_last, plan):
    """Every path of the direct kernels (NCHW planes, register-tiled, batch innermost, channels-last), with the
    fake giving the same strides as the real output."""
    from sparsetrain.execution.backends.direct import DirectStructure, direct_conv2d_op, direct_geometry, direct_plan

    g = torch.Generator().manual_seed(0)
    mask = torch.rand(8, 5, 3, 3, generator=g) < 0.3
    s = DirectStructure.from_mask(mask)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 5, hw, hw, generator=g).contiguous(memory_format=fmt).requires_grad_()
    if plan is not None:  # the NCHW path this case is for
        geom = direct_geometry(x.shape, mask.shape, [stride] * 2, [padding] * 2, [1, 1])
        assert direct_plan(geom, (3, 3))[:2] == plan
    values = torch.randn(int(mask.sum()), generator=g, requires_grad=True)
    bias = torch.randn(8, generator=g, requires_grad=True)
    args = (x, values, bias, s.tensors(), list(mask.shape), [stride] * 2, [padding] * 2, [1, 1], channels_last)
    torch.library.opcheck(direct_conv2d_op, args)
    out = direct_conv2d_op(*args)
    ref = F.conv2d(x.double(), s.dense(values.double()), bias.double(), stride, padding)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def _small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )


def _train(model, opt, batches, compiled: bool):
    run = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(run(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("execution, compact", [("direct", True), ("direct", False), ("condensed", True)])
def test_compiled_rigl_training_equals_eager_with_one_recompilation_per_mask_update(execution, compact):
    """20 compiled steps of RigL (updating every 5 steps) on the kernels: the same losses, masks and weights as
    eager, with two compiled graphs in all (never one per step or per mask update)."""
    from torch._dynamo.utils import counters

    import sparsetrain as st

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(20)]
    runs = {}
    for compiled in (False, True):
        model = _small_cnn()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = st.rigl(
            model, opt, sparsity=0.8, total_steps=40, update_every_steps=5, execution=execution, compact_state=compact
        )
        _train(model, opt, batches[:1], compiled=False)  # the layers build their lists in an eager step
        torch._dynamo.reset()
        counters.clear()
        losses = _train(model, opt, batches[1:], compiled)
        runs[compiled] = (losses, sp, model, counters["stats"]["unique_graphs"])
    (eager, sp_e, model_e, _), (comp, sp_c, model_c, graphs) = runs[False], runs[True]
    updates = len(range(5, 21, 5))  # the update steps among the compiled steps 2-20 (every 5th step)
    assert sp_c.maskset.version == sp_e.maskset.version > 0  # the masks did change
    for n in sp_e.maskset.masks:
        assert torch.equal(sp_e.maskset.masks[n], sp_c.maskset.masks[n])
    torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)
    for (n, a), b in zip(model_e.state_dict().items(), model_c.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)
    # two graphs for the whole run: the step's, and the update step's (which also computes the full weight gradient
    # RigL grows by), compiled at the first update and reused at the next ones; the new lists after an update are
    # read by the same graph (never a compilation per step, nor one per mask update)
    assert updates == 4 and graphs <= 2, graphs


def _compiled_equals_eager(made, batches):
    """Train a model from ``made()`` (model, optimizer: one eager step done) on ``batches`` eagerly and another
    compiled; assert equal losses and state; return the compiled run's model and its number of compiled graphs."""
    from torch._dynamo.utils import counters

    runs = {}
    for compiled in (False, True):
        model, opt = made()
        torch._dynamo.reset()
        counters.clear()
        runs[compiled] = (_train(model, opt, batches, compiled), model, counters["stats"]["unique_graphs"])
    (eager, model_e, _), (comp, model_c, graphs) = runs[False], runs[True]
    torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)
    for (n, a), b in zip(model_e.state_dict().items(), model_c.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)
    return model_c, graphs


@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_passes_for_the_swat_operators(channels_last):
    """Schemas (the refresh declares what it mutates), fakes (the saved top-K input a dynamic size) and the
    registered backward of SWAT's operators, by ``torch.library.opcheck``."""
    from sparsetrain.execution.backends import swat as S

    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format).requires_grad_()
    w, b = torch.randn(16, 8, 3, 3, requires_grad=True), torch.randn(16, requires_grad=True)
    wt, at, geometry = S.topk_threshold(w, 0.2), S.topk_threshold(x, 0.3), ([1, 1], [1, 1], [1, 1])
    xl, wl = torch.randn(5, 12, requires_grad=True), torch.randn(7, 12, requires_grad=True)
    buffers = [
        torch.ones(w.shape, dtype=torch.bool),
        torch.zeros(()),
        torch.zeros(()),
        torch.zeros((), dtype=torch.float64),
    ]
    calls = {
        "swat_conv2d": (x, w, b, None, wt, at, *geometry, 1),
        "swat_direct_conv2d": (x, w, b, wt, at, *geometry, False),
        "swat_linear": (xl, wl, None, None, S.topk_threshold(wl, 0.3), S.topk_threshold(xl, 0.5)),
        "swat_refresh": (w.detach(), x.detach(), *buffers, torch.zeros((), dtype=torch.long), 0.2, 0.3, 1, None),
    }
    for name, args in calls.items():
        results = torch.library.opcheck(getattr(torch.ops.sparsetrain, name).default, args)
        assert set(results.values()) == {"SUCCESS"}, (name, results)


@pytest.mark.parametrize("execution, layout", [("masked", torch.contiguous_format), ("direct", torch.channels_last)])
def test_compiled_swat_has_no_graph_break_and_trains_like_eager(execution, layout):
    """SWAT's layer calls, their backward and the periodic top-K refresh are operators: ``torch.compile`` keeps a
    SWAT-U 90% model in one graph (``explain``: no break; the saved top-K input a dynamic size), and 8 compiled
    steps across three refreshes (every 3 steps) give eager's losses, weights and thresholds in one graph."""

    import sparsetrain as st
    from sparsetrain.execution.backends.swat import swat_layers

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(9)]
    batches = [(x.contiguous(memory_format=layout), y) for x, y in batches]

    def made():
        model = _small_cnn().to(memory_format=layout)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        st.swat(model, opt, sparsity=0.9, execution=execution, topk_period=3, total_steps=40)
        _train(model, opt, batches[:1], compiled=False)  # an eager step first, as a user would
        return model, opt

    model, _ = made()
    x, y = batches[1]
    explained = torch._dynamo.explain(lambda inp: F.cross_entropy(model(inp), y))(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert {m.ran for m in swat_layers(model).values() if hasattr(m, "ran")} == {execution}
    model_c, graphs = _compiled_equals_eager(made, batches[1:])  # weights, thresholds, step counts
    assert int(swat_layers(model_c)["3.weight"].steps) == 9 and graphs == 1, graphs


@pytest.mark.parametrize("shape", [(2, 5, 6, 8), (1, 3, 7, 5)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_opcheck_passes_for_the_max_pool_operator(shape, layout):
    """``sparsetrain::max_pool2``: schema, fake (the output and positions in the input's layout, odd sizes
    floored) and registered backward, by ``torch.library.opcheck``."""
    from sparsetrain.execution.ops import max_pool2

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=layout)
    torch.library.opcheck(max_pool2, (x.requires_grad_(),))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_compiled_compact_max_pool_is_its_operator_in_the_graph(layout):
    """Under ``torch.compile`` the compact 2 x 2 max-pool stays the project's operator (one byte per output kept,
    its backward registered), not PyTorch's pool: no graph break, the operator in the graph, and outputs and
    gradients equal to eager."""
    from sparsetrain.execution.activations import CompactMaxPool2d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), CompactMaxPool2d(), nn.Flatten(), nn.Linear(128, 4))
    model = model.to(memory_format=layout)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=layout)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    targets = {node.target for graph in explained.graphs for node in graph.graph.nodes}
    assert torch.ops.sparsetrain.max_pool2.default in targets or torch.ops.sparsetrain.max_pool2 in targets, targets
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    outs = []
    for run in (model, compiled):
        model.zero_grad()
        out = run(x)
        out.square().sum().backward()
        outs.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(outs[1][0], outs[0][0])
    for a, b in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(a, b)


def test_compiled_channel_pruning_on_both_sides_has_no_graph_break_and_trains_like_eager():
    """Channel pruning at 50% with the removed filters' BatchNorm channels and the next layers' inputs gone (the
    layers physically smaller, compact state): no graph break, and 8 compiled steps equal eager in one graph."""

    import sparsetrain as st

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(9)]

    def made():
        model = _small_cnn()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        st.static(
            model, opt, sparsity=0.5, scheme="channel_out", execution="channel", channel_both_sides=True,
            compact_state=True,
        )  # fmt: skip
        _train(model, opt, batches[:1], compiled=False)
        return model, opt

    model, _ = made()
    x, y = batches[1]
    explained = torch._dynamo.explain(lambda inp: F.cross_entropy(model(inp), y))(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    model_c, graphs = _compiled_equals_eager(made, batches[1:])
    assert model_c[7].values.numel() == 16 * 16 * 9  # half its filters, on half its inputs: really smaller
    assert graphs == 1, graphs


AUTOCAST_CHILD = """
import json, warnings, torch, torch.nn as nn, torch.nn.functional as F
import sparsetrain as st
from sparsetrain.execution import native
warnings.simplefilter("always")
out = {}
for execution in ("direct", "condensed", "csr", "auto"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sp = st.static(model, opt, sparsity=0.9, execution=execution, compact_state=execution != "csr")
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
    said = [str(w.message) for w in seen if "compute in float32" in str(w.message)]
    zero = all(torch.count_nonzero(p[~m]) == 0 for n, p in sp.maskset.params.items() for m in [sp.maskset.masks[n]])
    out[execution] = [bool(torch.isfinite(loss)), len(said), zero]
try:
    native.condensed_forward(torch.randn(4, 8, dtype=torch.float16), torch.randn(2), None,
                             (torch.tensor([0, 1, 2]), torch.tensor([0, 1], dtype=torch.int32)), 2)
    out["fp16 to a kernel"] = "ran"
except TypeError as e:
    out["fp16 to a kernel"] = str(e)
print(json.dumps(out))
"""


def test_bfloat16_autocast_trains_every_backend():
    """Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` every backend trains (layers without bfloat16 kernels
    in float32, said once per process), masked weights stay zero, and a float16 tensor handed to a kernel directly
    is refused (read as float32 it would run past its end); in a subprocess, so that a crash fails the test only."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", AUTOCAST_CHILD], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for execution in ("direct", "condensed", "csr", "auto"):
        finite, _, zero = out[execution]
        assert finite and zero, (execution, out[execution])
    assert sum(out[e][1] for e in ("direct", "condensed", "csr", "auto")) == 1  # said once, by the first
    assert out["fp16 to a kernel"] == (
        "the native kernel condensed_forward was handed a torch.float16 tensor; it computes in torch.float32 or "
        "torch.bfloat16 (under torch.autocast the sparse layers cast their inputs to what they compute in; a model "
        "in another dtype runs execution='masked')"
    )


def test_the_direct_operator_reads_the_structure_that_made_its_lists_and_rebuilds_one_otherwise():
    """Eager and compiled calls pass a structure's own list tensors: the operator finds that structure (no rebuild
    per call); lists whose structure is gone (or copies of them, as a reloaded program holds) give an equal one."""
    import gc

    from sparsetrain.execution.backends.direct import DirectStructure

    g = torch.Generator().manual_seed(0)
    mask = torch.rand(8, 5, 3, 3, generator=g) < 0.3
    s = DirectStructure.from_mask(mask)
    lists = s.tensors()
    assert DirectStructure.from_tensors(s.shape, lists) is s
    assert s.plan_for((2, 5, 16, 16), (1, 1), (1, 1), (1, 1)) is s.plan_for((2, 5, 16, 16), [1, 1], [1, 1], [1, 1])
    copies = [t.clone() for t in lists]
    rebuilt = DirectStructure.from_tensors(s.shape, copies)
    assert rebuilt is not s and rebuilt.by_out[0].tolist() == s.by_out[0].tolist()
    del s
    gc.collect()
    again = DirectStructure.from_tensors(mask.shape, lists)
    assert again.flat_index is None and all(a.tolist() == b.tolist() for a, b in zip(again.by_out, rebuilt.by_out))


@pytest.mark.skipif(not native.bf16_kernels(), reason="no bfloat16 kernels in this build (AVX-512 only)")
def test_compiled_training_under_bfloat16_autocast_has_no_graph_break_and_equals_eager():
    """A channels-last CNN on the direct kernels (its Linear on the condensed ones) under bfloat16 autocast: the
    kernels' dtype is chosen inside the graph (no break), and 3 compiled steps equal eager's."""
    import sparsetrain as st

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(4)]
    batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]

    def made():
        model = _small_cnn().to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        st.static(model, opt, sparsity=0.9, dense_layers=(), execution="condensed", compact_state=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _train(model, opt, batches[:1], compiled=False)
        return model, opt

    model, _ = made()
    x, y = batches[1]

    def loss(inp):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.cross_entropy(model(inp), y)

    assert model(x).dtype == torch.float32  # (outside autocast: float32 kernels)
    explained = torch._dynamo.explain(loss)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16
        _compiled_equals_eager(made, batches[1:])
