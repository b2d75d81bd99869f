"""1 x 1 convolutions as Linear layers over pixels, and Hugging Face ``Conv1D`` projections under every backend that
runs a Linear: outputs and gradients against float64, plans that list every projection, training equal to masked
dense, and ``remove()`` giving back the model's own classes."""

from __future__ import annotations

import functools
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsetrain as st
from sparsetrain.execution import native
from sparsetrain.execution.backends import DirectStructure, direct_conv2d

transformers = pytest.importorskip("transformers")
needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler: the kernels are not built")


@needs_native
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("cin, cout, size", [(16, 24, 6), (64, 32, 7)])
def test_a_pointwise_convolution_on_the_linear_kernels_equals_float64(stride, cin, cout, size):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, cin, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, 1, 1, generator=g)
    mask = torch.rand(cout, cin, 1, 1, generator=g) > 0.7
    bias = torch.randn(cout, generator=g)
    structure = DirectStructure.from_mask(mask)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w * mask, bias))
    out = direct_conv2d(xs, ws, bs, structure, (stride, stride))
    assert out.is_contiguous(memory_format=torch.channels_last)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w * mask, bias))
    ref = F.conv2d(xd, wd, bd, stride=stride)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    out.backward(grad.float())
    ref.backward(grad)
    torch.testing.assert_close(xs.grad.double(), xd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ws.grad.double(), wd.grad * mask, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bs.grad.double(), bd.grad, rtol=1e-5, atol=1e-5)


class Projections(nn.Module):
    """Two ``Conv1D`` projections around a GELU, as in GPT-2's MLP."""

    def __init__(self, width: int = 24):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.embed = nn.Linear(8, width)
        self.c_fc = Conv1D(4 * width, width)
        self.c_proj = Conv1D(width, 4 * width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.c_proj(F.gelu(self.c_fc(self.embed(x)))))


def _trained(execution: str, steps: int = 3, **kw):
    torch.manual_seed(0)
    model = Projections()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    sp = st.rigl(
        model, opt, sparsity=0.8, total_steps=10, update_every_steps=2, execution=execution, example_inputs=x, **kw
    )
    for _ in range(steps):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, sp, x


@pytest.mark.timing
@pytest.mark.parametrize(
    "execution",
    ["csr", pytest.param("condensed", marks=needs_native), pytest.param("direct", marks=needs_native), "auto"],
)
def test_conv1d_projections_run_on_every_linear_backend_and_train_like_masked_dense(execution):
    dense_model, dense_sp, x = _trained("masked")
    model, sp, _ = _trained(execution)
    assert set(sp.plan.layers) == {"c_fc.weight", "c_proj.weight"}
    if execution != "auto":
        assert {lp.backend for lp in sp.plan.layers.values()} == {execution}
        want = "csr" if execution == "direct" else execution  # direct runs a Linear on CSR products
        assert {m.ran for m in sp.execution_layers.values()} == {want}
    for k, v in dense_sp.export_state().items():
        torch.testing.assert_close(sp.export_state()[k], v, rtol=1e-4, atol=1e-5)
    assert sp.updates == dense_sp.updates > 0  # RigL grew from the Conv1D's dense gradient ([in, out]) alike
    plain = sp.remove()
    from transformers.pytorch_utils import Conv1D

    assert type(plain.c_fc) is Conv1D and type(plain.c_proj) is Conv1D
    torch.testing.assert_close(plain(x), dense_model(x), rtol=1e-4, atol=1e-5)


@needs_native
def test_compact_conv1d_projections_store_only_kept_weights_and_train_like_masked_dense():
    """Under condensed with compact state a Conv1D keeps only its kept weights (in the Linear's row order), AdamW's
    moments alike; RigL's updates re-lay them from the [in, out] dense gradient; the state dict carries the dense
    [in, out] weight, and remove() gives back the Conv1D, all equal to masked dense."""
    from transformers.pytorch_utils import Conv1D

    from sparsetrain.execution.backends.compact import is_compact

    dense_model, dense_sp, x = _trained("masked", steps=5)
    model, sp, _ = _trained("condensed", steps=5, compact_state=True)
    assert len(sp.execution_layers) == 2
    assert all(is_compact(m) and isinstance(m, Conv1D) for m in sp.execution_layers.values())
    assert {lp.compact for lp in sp.plan.layers.values()} == {True}
    kept = int(sp.maskset.masks["c_fc.weight"].sum())
    assert model.c_fc.values.shape == (kept,) and "c_fc.weight" not in dict(model.named_parameters())
    assert sp.updates == dense_sp.updates > 0
    for k, v in dense_sp.export_state().items():
        torch.testing.assert_close(sp.export_state()[k], v, rtol=1e-4, atol=1e-5)
    state = model.state_dict()
    assert state["c_fc.weight"].shape == dense_model.c_fc.weight.shape  # [in, out], as the Conv1D keeps it
    torch.testing.assert_close(state["c_fc.weight"], dense_model.c_fc.weight, rtol=1e-4, atol=1e-5)
    plain = sp.remove()
    assert type(plain.c_fc) is Conv1D and plain.c_fc.weight.is_contiguous()
    torch.testing.assert_close(plain(x), dense_model(x), rtol=1e-4, atol=1e-5)


def _callback_plan(model, make):
    from sparsetrain.integrations.huggingface import SparsityCallback

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cb = SparsityCallback(make, execution="auto")
    args = types.SimpleNamespace(gradient_accumulation_steps=1, output_dir=".")
    state = types.SimpleNamespace(max_steps=10, num_train_epochs=1, global_step=0)
    cb.on_train_begin(args, state, None, model=model, optimizer=opt, train_dataloader=None)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss  # auto plans on this first training batch
    loss.backward()
    opt.step()
    return cb.sparsifier.plan


def _dense_ends(model):
    return [
        n
        for n, _ in model.named_parameters(remove_duplicate=False)
        if "wte" in n or "wpe" in n or "lm_head" in n or "embed" in n
    ]


@pytest.mark.timing
def test_auto_through_the_callback_plans_every_gpt2_conv1d_projection():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    )
    model.train()
    make = functools.partial(st.rigl, sparsity=0.9, dense_layers=_dense_ends(model))
    plan = _callback_plan(model, make)
    projections = {
        f"transformer.h.{i}.{p}.weight"
        for i in range(2)
        for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert set(plan.layers) == projections


@pytest.mark.timing
def test_auto_through_the_callback_plans_every_llama_projection():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=50
    )
    model = transformers.LlamaForCausalLM(cfg)
    model.train()
    make = functools.partial(st.rigl, sparsity=0.9, dense_layers=_dense_ends(model))
    plan = _callback_plan(model, make)
    kinds = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj")
    kinds += ("mlp.up_proj", "mlp.down_proj")
    assert set(plan.layers) == {f"model.layers.{i}.{k}.weight" for i in range(2) for k in kinds}
