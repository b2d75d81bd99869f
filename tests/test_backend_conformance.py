"""The backend contract, one run per registered backend: a new backend is its file under ``execution/backends/``
plus its entry in :data:`CASES` (the scheme its masks need, and whether this machine can run it).

Each backend runs a small CNN with a convolution and a Linear layer through a static mask and is checked for:
forward output and every gradient against masked dense in float64; a mask change (outputs follow the new mask);
compact state where it declares it (kept weights only, a state dict of dense weights, loaded back equal); the
sparsifier's state dict restored into a fresh one; and its plan saved to JSON, loaded and applied without timing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import sparsetrain as st
from sparsetrain.execution import native
from sparsetrain.execution.backends import BACKENDS, ExecutionRequest, not_supported_reasons
from sparsetrain.execution.options import ExecutionOptions
from sparsetrain.execution.plan import ExecutionPlan
from sparsetrain.methods import Static

# backend -> (scheme of its masks, why this machine cannot run it or None)
CASES = {
    "masked": ("unstructured", None),
    "csr": ("unstructured", None),
    "direct": ("unstructured", None if native.available() else "no C compiler: the kernels are not built"),
    "condensed": ("unstructured", None if native.available() else "no C compiler: the kernels are not built"),
    "channel": ("channel_out", None),
    "semi_structured": ("nm_2:4", "runs on CUDA GPUs with sparse tensor cores only"),
    "auto": ("unstructured", None),
}


def test_every_registered_backend_has_a_conformance_case():
    assert set(CASES) == set(BACKENDS)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.fc = nn.Linear(16 * 16, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = torch.relu(self.conv(torch.relu(self.conv0(x))))
        return self.head(torch.relu(self.fc(x.flatten(1))))


def _build(backend: str, scheme: str, compact: bool, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    sp = st.static(
        model, opt, sparsity=0.5, scheme=scheme, execution=backend, compact_state=compact, example_inputs=x, **kw
    )
    return model, opt, sp, x


def _reference(model: nn.Module, sp, x: torch.Tensor):
    """Masked dense in float64: output and gradients of every parameter (dense weights, masked)."""
    ref = Net().double()
    state = {k: v.double() for k, v in sp.export_state().items()}
    ref.load_state_dict(state)
    xd = x.double().requires_grad_()
    out = ref(xd)
    out.square().sum().backward()
    return out, xd.grad, {n: p.grad for n, p in ref.named_parameters()}


def _compact_ok(backend: str) -> bool:
    req = ExecutionRequest(Static.name, Static.traits, CASES[backend][0], ExecutionOptions(compact_state=True))
    return not not_supported_reasons(backend, req)


def _dense_grads(model: nn.Module, sp) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        if n.endswith("values"):
            layer = n.rsplit(".", 1)[0]
            out[f"{layer}.weight"] = dict(model.named_modules())[layer].dense_grad()
        else:
            out[n] = p.grad
    return out


@pytest.fixture(params=list(CASES))
def backend(request):
    scheme, why_not = CASES[request.param]
    if why_not:
        pytest.skip(f"backend {request.param!r}: {why_not}")
    return request.param


@pytest.mark.timing
@pytest.mark.parametrize("compact", [False, True])
def test_forward_and_gradients_equal_masked_dense_in_float64(backend, compact):
    if compact and not _compact_ok(backend):
        pytest.skip(f"backend {backend!r} stores dense weights")
    model, opt, sp, x = _build(backend, CASES[backend][0], compact)
    planned = set(sp.maskset.masks) if BACKENDS[backend].swaps_layers else set()  # masked: the layers as they are
    assert sp.plan is not None and set(sp.plan.layers) == planned
    ref_out, ref_gx, ref_grads = _reference(model, sp, x)
    xx = x.clone().requires_grad_()
    out = model(xx)
    out.square().sum().backward()
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xx.grad.double(), ref_gx, rtol=1e-4, atol=1e-4)
    grads = _dense_grads(model, sp)
    for n, g in ref_grads.items():
        mask = sp.maskset.masks.get(n)
        want = g * mask if mask is not None else g  # only kept weights have a gradient under a mask
        torch.testing.assert_close(grads[n].double() * (mask if mask is not None else 1), want, rtol=1e-4, atol=1e-4)
    opt.step()
    for n, mask in sp.maskset.masks.items():
        assert not sp.export_state()[n][~mask].any(), n  # masked weights stay zero through the optimizer step


@pytest.mark.timing
def test_a_mask_change_is_followed(backend):
    model, opt, sp, x = _build(backend, CASES[backend][0], compact=False)
    name = "fc.weight"
    mask = sp.maskset.masks[name]
    flipped = mask.flip(0) if CASES[backend][0] == "channel_out" else mask.roll(1, dims=1)
    sp.maskset.set_mask(name, flipped)
    out = model(x)
    ref_out, _, _ = _reference(model, sp, x)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)


@pytest.mark.timing
def test_state_and_plan_round_trip_without_timing(backend, tmp_path):
    compact = _compact_ok(backend)
    model, opt, sp, x = _build(backend, CASES[backend][0], compact)
    model(x).square().sum().backward()
    opt.step()
    state = {"model": copy.deepcopy(model.state_dict()), "sparsity": sp.state_dict()}
    sp.plan.save(tmp_path / "plan.json")
    plan = ExecutionPlan.load(tmp_path / "plan.json")
    assert plan.to_dict() == sp.plan.to_dict()

    torch.manual_seed(5)
    model2 = Net()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    sp2 = st.static(model2, opt2, sparsity=0.5, scheme=CASES[backend][0], execution=plan, compact_state=compact)
    assert sp2.plan.to_dict() == plan.to_dict()  # applied as saved: nothing timed
    sp2.load_state_dict(state["sparsity"])
    model2.load_state_dict(state["model"])
    for k, v in sp.export_state().items():
        assert torch.equal(sp2.export_state()[k], v), k
    torch.testing.assert_close(model2(x), model(x))
