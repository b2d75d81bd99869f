"""Every method and backend on a CUDA GPU for a few steps: masks exact, loss finite, resume exact.

Skipped without CUDA; ``benchmarks/gpu_check.sh`` runs them (``pytest -m gpu``) where a GPU is at hand.
"""

import functools
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import train_steps

import sparsetrain as st

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

METHODS = {
    "static": functools.partial(st.static, sparsity=0.9, distribution="erk"),
    "set": functools.partial(st.set, sparsity=0.9, update_every_steps=2),
    "rigl": functools.partial(st.rigl, sparsity=0.9, update_every_steps=2),
    "mest": functools.partial(st.mest, sparsity=0.9, every_epochs=1, soft_bound=True),
    "swat": functools.partial(st.swat, sparsity=0.9, topk_period=2),
}


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).cuda()


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).cuda()


def _steps(model, opt, data, n, start=0):
    return train_steps(model, opt, [data[i % len(data)] for i in range(start, start + n)])


def _data(shape, n=6):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [
        (torch.randn(16, *shape, device="cuda", generator=g), torch.randint(0, 10, (16,), device="cuda", generator=g))
        for _ in range(n)
    ]


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_every_method_trains_on_cuda_with_exact_masks(name, net):
    model = _mlp() if net == "mlp" else _cnn()
    data = _data((64,) if net == "mlp" else (3, 16, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sp = METHODS[name](model, opt, steps_per_epoch=3, epochs=3)
    losses = _steps(model, opt, data, 9)
    assert all(torch.isfinite(torch.tensor(losses)))
    if sp.maskset is not None:
        params = dict(model.named_parameters())
        for n, m in sp.maskset.masks.items():
            assert m.device.type == "cuda" and torch.count_nonzero(params[n].detach()[~m]) == 0, n
        assert sp.sparsity() == pytest.approx(0.9, abs=2e-3) or name == "mest"
    else:
        assert sp.sparsity() == pytest.approx(0.9, abs=5e-3)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_resume_on_cuda_is_exact(name):
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        _resume_check(name)
    finally:
        torch.use_deterministic_algorithms(False)


def _resume_check(name):
    data = _data((64,))

    def build():
        model = _mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return model, opt, METHODS[name](model, opt, steps_per_epoch=3, epochs=3)

    model, opt, sp = build()
    _steps(model, opt, data, 9)
    model2, opt2, sp2 = build()
    _steps(model2, opt2, data, 4)
    buf = io.BytesIO()
    torch.save({"m": model2.state_dict(), "o": opt2.state_dict(), "s": sp2.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    model3, opt3, sp3 = build()
    sp3.load_state_dict(state["s"])
    model3.load_state_dict(state["m"])
    opt3.load_state_dict(state["o"])
    _steps(model3, opt3, data, 5, start=4)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, model3.state_dict()[k], rtol=0, atol=0)


@pytest.mark.parametrize(
    "backend, scheme",
    [("masked", "unstructured"), ("csr", "unstructured"), ("channel", "channel_out"), ("auto", "unstructured")],
)
def test_backends_on_cuda_match_masked_dense(backend, scheme):
    data = _data((3, 16, 16), 1)
    ref = _cnn()
    model = _cnn()
    st.static(
        ref, torch.optim.SGD(ref.parameters(), lr=0.1), sparsity=0.5, scheme=scheme, dense_layers=[]
    )  # the same mask (same seed)
    sp = st.static(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        sparsity=0.5,
        scheme=scheme,
        dense_layers=[],
        execution=backend,
    )
    x, y = data[0]
    F.cross_entropy(ref(x), y).backward()
    F.cross_entropy(model(x), y).backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), model.named_parameters()):
        m = sp.maskset.masks.get(n)
        ga, gb = (a.grad, b.grad) if m is None else (a.grad * m, b.grad * m)
        torch.testing.assert_close(ga, gb, rtol=1e-3, atol=1e-4)


def test_two_four_semi_structured_on_cuda():
    from sparsetrain.execution.backends import semi_structured_available

    why = semi_structured_available("cuda")
    if why:
        pytest.skip(why)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128)).cuda().half()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sp = st.static(model, opt, sparsity=0.5, scheme="nm_2:4", dense_layers=[], execution="semi_structured")
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    for _ in range(3):
        loss = model(x).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    for n, m in sp.maskset.masks.items():
        assert torch.count_nonzero(dict(model.named_parameters())[n].detach()[~m]) == 0
