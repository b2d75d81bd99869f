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
