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
from sparsetrain.execution.backends import get_backend
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


def _images(n_batches, batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last),
            torch.randint(0, 10, (batch,), generator=g),
        )
        for _ in range(n_batches)
    ]


def _tokens(n_batches, batch=4, context=16, vocab=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, vocab, (batch, context), generator=g), torch.randint(0, vocab, (batch, context), generator=g))
        for _ in range(n_batches)
    ]


def _cnn():
    return build_model("vgg16", width=0.25).to(memory_format=torch.channels_last)


def _gpt():
    return build_model("gpt", num_classes=32, width=0.5, context=16)


RECOMPUTE_CASES = {
    # a CNN on the direct kernels: BatchNorm's inputs recomputed, the ReLU outputs the next layers read compressed
    "cnn-direct": (
        _cnn,
        st.static,
        {"sparsity": 0.95, "execution": "direct", "compact_state": True, "seed": 3},
        _images,
        0.85,
    ),
    # a transformer on the condensed kernels: GELU's and the attention's inputs (views of the projection's output)
    # recomputed, the LayerNorm and GELU outputs the projections read remade from their inputs
    "gpt-condensed": (
        _gpt,
        st.static,
        {"sparsity": 0.9, "execution": "condensed", "compact_state": True, "scheme": "fan_in", "seed": 3},
        _tokens,
        0.6,
    ),
    # RigL growing from the dense gradient (its tap keeps the layer input too) with mask updates every other step
    "cnn-rigl": (
        _cnn,
        st.rigl,
        {"sparsity": 0.9, "execution": "direct", "compact_state": True, "update_every_steps": 2, "seed": 3},
        _images,
        0.85,
    ),
    # 1 x 1 convolutions on the Linear kernels keep a flattened view of their input; strided ones a copy
    "resnet-pointwise": (
        lambda: build_model("resnet50", width=0.125).to(memory_format=torch.channels_last),
        st.static,
        {"sparsity": 0.9, "execution": "direct", "compact_state": True, "seed": 3},
        _images,
        0.85,
    ),
    # SWAT keeps its whole input (compressed) instead of its top-K and takes the top-K in backward; at 16 images,
    # since its kept weights' lists (made each forward, held until backward: 28 bytes a kept weight, counted with
    # the saved tensors) outweigh a batch of 4's activations
    "swat-direct": (
        _cnn,
        st.swat,
        {"sparsity": 0.9, "execution": "direct"},
        lambda n_batches, seed=1: _images(n_batches, batch=16, seed=seed),
        0.85,
    ),
}


def _loss(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


@pytest.mark.parametrize("case", sorted(RECOMPUTE_CASES))
def test_recomputed_outputs_and_compressed_inputs_give_the_same_bits_and_keep_fewer_bytes(case):
    make_model, factory, kwargs, data, share = RECOMPUTE_CASES[case]  # share: of the bytes kept without recompute

    def run(lossless, recompute_outputs=True):
        torch.manual_seed(0)
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = factory(
            model,
            opt,
            total_steps=6,
            lossless_activations=lossless,
            recompute_outputs=recompute_outputs,
            **kwargs,
        )
        losses = []
        for x, y in data(6):
            opt.zero_grad()
            loss = _loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        x, y = data(1, seed=9)[0]
        kept = saved_tensor_bytes_by_module(lambda: _loss(model(x), y).backward(), model)
        return sp, model, losses, kept

    sp_plain, plain, losses_plain, kept_plain = run(False)
    sp_lossless, lossless, losses_lossless, kept_lossless = run(True)
    sp_without, _, losses_without, kept_without = run(True, recompute_outputs=False)  # the other savings alone
    assert losses_without == losses_plain and not any(lp.recompute for lp in sp_without.plan.layers.values())
    assert "recompute" not in str(sp_without.plan)
    assert losses_lossless == losses_plain
    for (n, p), q in zip(plain.named_parameters(), lossless.parameters()):
        assert torch.equal(p, q), n
        assert torch.equal(p.grad, q.grad), n  # the last backward read recomputed and decompressed tensors
    if "update_every_steps" in kwargs:
        assert sp_lossless.updates >= 2
        assert all(torch.equal(m, sp_lossless.maskset.masks[n]) for n, m in sp_plain.maskset.masks.items())
    # a backend named: every layer on a kernel recomputes (nothing was timed to weigh it)
    plan = sp_lossless.plan
    assert all(lp.recompute == get_backend(lp.backend).swaps_layers for lp in plan.layers.values())
    assert any(lp.recompute for lp in plan.layers.values())
    assert "recompute" in str(plan) and "recompute" not in str(sp_plain.plan)
    # the CNNs' dense first convolution (27 or 147 products an output) is recomputed too, and the BatchNorm-ReLU
    # output after it remade through it: neither is kept
    assert plan.stems == (
        () if case.startswith("gpt") else (("conv1.weight",) if "resnet" in case else ("features.0.weight",))
    )
    assert all(f"recomputed in backward: {n}" in str(plan) for n in plan.stems)
    again = ExecutionPlan.from_dict(plan.to_dict())  # saved with the run, applied on resume
    assert again.layers == plan.layers and again.stems == plan.stems
    assert kept_lossless["total"] < share * kept_without["total"]


def test_a_resumed_run_recomputes_the_same_layers_and_finishes_bit_identical():
    def fresh():
        torch.manual_seed(0)
        model = _cnn()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = st.rigl(
            model,
            opt,
            sparsity=0.9,
            execution="direct",
            compact_state=True,
            update_every_steps=2,
            lossless_activations=True,
            total_steps=6,
            seed=3,
        )
        return model, opt, sp

    def train(model, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            _loss(model(x), y).backward()
            opt.step()

    batches = _images(6)
    model, opt, sp = fresh()
    train(model, opt, batches)
    cut_model, cut_opt, cut_sp = fresh()
    train(cut_model, cut_opt, batches[:3])
    state = copy.deepcopy({"sp": cut_sp.state_dict(), "model": cut_model.state_dict(), "opt": cut_opt.state_dict()})
    del cut_model, cut_opt, cut_sp
    model2, opt2, sp2 = fresh()
    sp2.load_state_dict(state["sp"])
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    assert sp2.plan.layers == sp.plan.layers and any(lp.recompute for lp in sp2.plan.layers.values())
    train(model2, opt2, batches[3:])
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k


def test_a_plan_recomputing_a_dense_layer_the_model_lacks_is_refused_by_name():
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = st.static(model, opt, sparsity=0.9, execution="direct", lossless_activations=True, total_steps=2)
    plan = ExecutionPlan.from_dict({**sp.plan.to_dict(), "stems": ["features.3.weight"]})
    model2 = _cnn()
    with pytest.raises(ValueError) as err:
        st.static(
            model2,
            torch.optim.SGD(model2.parameters(), lr=0.05),
            sparsity=0.9,
            execution=plan,
            lossless_activations=True,
            total_steps=2,
        )
    assert str(err.value) == (
        "the execution plan recomputes dense layers this model has no cheap convolution for: ['features.3.weight'] "
        "(allowed: ['features.0.weight'])"
    )


def test_saved_bytes_leave_out_what_the_modules_hold_between_steps():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.table = torch.randn(4, 8)  # a plain attribute (as a sparse layer's index lists are), saved by mul

        def forward(self, x):
            return self.lin(x) * self.table

    model, x = Scaled(), torch.randn(4, 8)
    kept = saved_tensor_bytes_by_module(lambda: model(x).sum().backward(), model)
    # the Linear keeps its input (its parameters are left out), mul the table (the gradient of the Linear's output)
    assert kept["total"] == x.nbytes
    assert kept["module_state"] == model.table.nbytes


def test_compress_nonzero_is_exact_and_declines_dense_tensors():
    native = pytest.importorskip("sparsetrain.execution.native")
    if not native.available():
        pytest.skip("native kernels not built")
    x = torch.relu(torch.randn(100_003))
    x[5], x[6], x[7] = -0.0, float("nan"), -3.0
    packed, values = native.compress_nonzero(x)
    back = native.decompress(packed, values, x.numel())
    assert torch.equal(back.view(torch.int32), x.view(torch.int32))  # bit for bit: -0.0 and NaN included
    assert values.numel() == int((x.view(torch.int32) != 0).sum())
    assert native.compress_nonzero(torch.randn(1000) + 10, max_share=0.75) is None
