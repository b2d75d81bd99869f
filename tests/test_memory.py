"""Lossless activation memory: the same bits as plain training, fewer bytes kept for backward, for any method."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import train_steps

import sparsetrain as st
from sparsetrain.core.accounting import saved_tensor_bytes_by_module
from sparsetrain.execution.activations import BitReLU, CompactMaxPool2d
from sparsetrain.execution.memory import LosslessActivations
from sparsetrain.execution.plan import ExecutionPlan
from sparsetrain.models import build_model


def _step(model, x, y):
    def run():
        F.cross_entropy(model(x), y).backward()

    return run


@pytest.mark.parametrize(
    "name, layout", [("vgg16", "channels_last"), ("vgg16", "contiguous_format"), ("resnet18", "channels_last")]
)
def test_lossless_activations_give_the_same_bits_and_keep_fewer_bytes(name, layout):
    torch.manual_seed(0)
    fmt = getattr(torch, layout)
    plain = build_model(name, width=0.25).to(memory_format=fmt)
    lossless = copy.deepcopy(plain)
    memory = LosslessActivations(lossless)
    x = torch.randn(6, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (6,))
    for _ in range(2):  # twice: the second pass must not match tensors of the first
        kept_plain = saved_tensor_bytes_by_module(_step(plain, x, y), plain)
        kept_lossless = saved_tensor_bytes_by_module(_step(lossless, x, y), lossless)
    for (n, p), q in zip(plain.named_parameters(), lossless.parameters()):
        assert torch.equal(p.grad, q.grad), n  # bit for bit, two accumulated passes
    for (n, b), c in zip(plain.named_buffers(), lossless.buffers()):
        assert torch.equal(b, c), n  # BatchNorm statistics moved once per pass, as in plain training
    assert memory.relus > 0 and not any(type(m) is nn.ReLU for m in lossless.modules())
    # VGG: every ReLU follows a BatchNorm, so the convolutions' inputs are recomputed; ResNet's block outputs (a ReLU
    # after a residual add) are still kept
    assert kept_lossless["total"] < (0.55 if name == "vgg16" else 0.8) * kept_plain["total"]
    memory.remove()
    assert not any(isinstance(m, (BitReLU, CompactMaxPool2d)) for m in lossless.modules())
    kept_after = saved_tensor_bytes_by_module(_step(lossless, x, y), lossless)
    assert kept_after["total"] == kept_plain["total"]


@pytest.mark.parametrize(
    "factory, kwargs",
    [
        (st.static, {"sparsity": 0.9, "execution": "direct", "compact_state": True}),
        (st.rigl, {"sparsity": 0.9, "distribution": "erk", "update_every_steps": 1}),
        (st.swat, {"sparsity": 0.8}),
        (st.dense, {}),
        # BatchNorms shrunk to their producers' kept channels recompute with those channels' scale and shift
        (
            st.static,
            {
                "sparsity": 0.5,
                "scheme": "channel_out",
                "execution": "channel",
                "channel_both_sides": True,
                "compact_state": True,
            },
        ),
    ],
)
def test_every_method_takes_lossless_activations_and_trains_the_same(factory, kwargs):
    def run(lossless):
        torch.manual_seed(0)
        model = build_model("vgg16", width=0.125).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = factory(model, opt, total_steps=3, lossless_activations=lossless, **kwargs)
        g = torch.Generator().manual_seed(1)
        train_steps(
            model,
            opt,
            [
                (
                    torch.randn(4, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last),
                    torch.randint(0, 10, (4,), generator=g),
                )
                for _ in range(3)
            ],
        )
        return sp, model

    sp_plain, plain = run(False)
    sp_lossless, lossless = run(True)
    assert sp_lossless.plan.lossless_activations and not sp_plain.plan.lossless_activations
    assert "lossless activations" in str(sp_lossless.plan)
    for (n, p), q in zip(plain.state_dict().items(), lossless.state_dict().values()):
        assert torch.equal(p, q), n


def test_a_plan_made_with_lossless_activations_is_refused_by_a_sparsifier_without_them():
    model = build_model("vgg16", width=0.125)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.static(model, opt, sparsity=0.9, total_steps=10, lossless_activations=True)
    plan = ExecutionPlan.from_dict(sp.plan.to_dict())
    assert plan.lossless_activations
    other = build_model("vgg16", width=0.125)
    with pytest.raises(
        ValueError,
        match="the execution plan was made with lossless_activations=True; this "
        "sparsifier has lossless_activations=False",
    ):
        st.static(other, torch.optim.SGD(other.parameters(), lr=0.1), sparsity=0.9, total_steps=10, execution=plan)
    sp.remove()
    assert not any(isinstance(m, (BitReLU, CompactMaxPool2d)) for m in model.modules())
