import math

import pytest
import torch

from sparsetrain.core.distributions import layer_densities
from sparsetrain.core.masks import select_parameters
from sparsetrain.core.schemes import KERNEL_PATTERNS, parse_scheme
from sparsetrain.models import build_model


def _shapes(name, dense=("first", "last")):
    return {n: tuple(p.shape) for n, p in select_parameters(build_model(name), dense).items()}


@pytest.mark.parametrize("model", ["resnet20", "vgg16", "mobilenetv2", "mlp"])
@pytest.mark.parametrize("kind", ["uniform", "er", "erk"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
def test_distributions_meet_the_global_budget_and_cap_at_one(model, kind, sparsity):
    shapes = _shapes(model, dense=[])
    d = layer_densities(kind, shapes, sparsity)
    numel = {n: math.prod(s) for n, s in shapes.items()}
    assert all(0 < v <= 1.0 for v in d.values())
    kept = sum(round(d[n] * numel[n]) for n in shapes)
    assert abs(kept - (1 - sparsity) * sum(numel.values())) <= len(shapes)


def test_erk_caps_small_layers_dense_and_resolves_the_rest():
    shapes = _shapes("resnet20", dense=[])
    d = layer_densities("erk", shapes, 0.5)
    assert d["conv1.weight"] == 1.0 and d["fc.weight"] == 1.0  # 3x16x3x3 stem and 64x10 classifier would pass 1
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    sparse = [n for n, v in d.items() if v < 1]
    eps = {d[n] / raw[n] for n in sparse}
    assert len(sparse) > 10 and max(eps) - min(eps) < 1e-9  # one scale for every layer that is not capped
    assert all(min(eps) * raw[n] >= 1 for n, v in d.items() if v == 1.0)  # capped layers really would pass 1


def test_custom_distribution_and_its_errors():
    shapes = _shapes("resnet20")
    d = layer_densities("custom", shapes, 0.9, {"layer1.0.conv1.weight": 0.5})
    assert d["layer1.0.conv1.weight"] == 0.5 and d["layer3.2.conv2.weight"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="not sparse parameters: \\['nope'\\]"):
        layer_densities("custom", shapes, 0.9, {"nope": 0.5})
    with pytest.raises(ValueError, match="unknown distribution 'zipf'"):
        layer_densities("zipf", shapes, 0.9)


SCHEMES = ["unstructured", "channel_out", "channel_in", "kernel", "block_4x1", "block_2x2"]


@pytest.mark.parametrize("model", ["resnet20", "vgg16"])
@pytest.mark.parametrize("scheme_name", SCHEMES + ["pattern"])
def test_schemes_reach_their_target_to_one_unit(model, scheme_name):
    scheme = parse_scheme(scheme_name)
    density = 0.3
    for n, s in _shapes(model, ("first", "last", "*shortcut*")).items():  # 1x1 shortcuts take no 3x3 patterns
        w = torch.randn(s)
        mask = scheme.mask(w.abs(), density, n)
        units = scheme.group(mask)
        n_units = units.shape[0]
        on = units.any(1)
        if scheme_name == "pattern":
            assert int(on.sum()) == round(density * w.numel() / 4)
            assert all(any(torch.equal(u, p) for p in KERNEL_PATTERNS) for u in units[on][:50])
        else:
            expected = round(
                density
                * (w.numel() if scheme_name in ("unstructured",) or scheme_name.startswith("block_") else n_units)
                / (1 if not scheme_name.startswith("block_") else units.shape[1])
            )
            if scheme_name.startswith("block_"):
                expected = round(density * n_units)
            assert abs(int(on.sum()) - expected) <= 1
            assert bool(units[on].all())  # whole units kept
        assert abs(mask.float().mean().item() - density) <= (units.shape[1] / w.numel()) + 0.12 * (
            scheme_name == "pattern"
        )


def test_schemes_keep_the_best_units():
    w = torch.zeros(4, 3, 3, 3)
    w[2] = 5.0
    mask = parse_scheme("channel_out").mask(w.abs(), 0.25)
    assert mask[2].all() and not mask[[0, 1, 3]].any()
    lin = torch.zeros(8, 8)
    lin[4:8, 3] = 1.0
    b = parse_scheme("block_4x1").mask(lin, 1 / 16)  # one 4x1 block of sixteen
    assert b[4:8, 3].all() and int(b.sum()) == 4


def test_nm_keeps_n_of_every_m_along_the_input():
    w = torch.randn(16, 32)
    mask = parse_scheme("nm_2:4").mask(w.abs(), 0.5)
    groups = mask.reshape(-1, 4)
    assert (groups.sum(1) == 2).all()
    kept = w.abs().reshape(-1, 4)[groups].reshape(-1, 2).min(1).values
    dropped = w.abs().reshape(-1, 4)[~groups].reshape(-1, 2).max(1).values
    assert (kept >= dropped).all()
    with pytest.raises(ValueError, match="density 0.5; density 0.1000 asked"):
        parse_scheme("nm_2:4").mask(w, 0.1)


@pytest.mark.parametrize(
    "scheme, shape, message",
    [
        ("block_4x1", (10, 3, 3, 3), "does not divide into 4x1 blocks"),
        ("nm_2:4", (8, 6), "does not divide into groups of 4"),
        ("kernel", (8, 6), "Conv2d weights only"),
        ("pattern", (8, 4, 5, 5), "needs 3x3 kernels"),
    ],
)
def test_shapes_that_do_not_fit_are_refused(scheme, shape, message):
    with pytest.raises(ValueError, match=message):
        parse_scheme(scheme).mask(torch.rand(shape), 0.25, "some.layer")


def test_pattern_density_above_four_ninths_is_refused():
    with pytest.raises(ValueError, match="at most 4 of 9"):
        parse_scheme("pattern").mask(torch.rand(8, 8, 3, 3), 0.6)


@pytest.mark.parametrize("scheme_name", SCHEMES + ["pattern"])
def test_update_prunes_and_grows_whole_units_at_a_constant_count(scheme_name):
    scheme = parse_scheme(scheme_name)
    w = torch.randn(16, 8, 3, 3)
    mask = scheme.mask(w.abs(), 0.25)
    before = scheme.group(mask).any(1)
    g = torch.Generator().manual_seed(0)
    k = max(1, int(before.sum()) // 2)
    new = scheme.update(mask, w.abs() * mask, k, k, None, g)
    after = scheme.group(new).any(1)
    assert int(after.sum()) == int(before.sum())
    assert int((before & ~after).sum()) == k and int((after & ~before).sum()) == k
    assert int(new.sum()) == int(mask.sum())  # same number of weights, units whole (or one pattern each)


def _fan_in(mask):
    return mask.reshape(mask.shape[0], -1).sum(1)


@pytest.mark.parametrize("shape", [(64, 100), (16, 8, 3, 3)])
def test_fan_in_masks_keep_the_same_inputs_per_row_by_score(shape):
    from sparsetrain.core.schemes import parse_scheme

    score = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    m = parse_scheme("fan_in").mask(score, 0.1)
    k = round(0.1 * score[0].numel())
    assert set(_fan_in(m).tolist()) == {k}
    rows, keep = score.reshape(shape[0], -1), m.reshape(shape[0], -1)
    assert torch.all(rows[keep].reshape(shape[0], k).min(1).values >= rows.masked_fill(keep, -1).max(1).values)


@pytest.mark.parametrize("factory", ["set", "rigl", "mest"])
def test_fan_in_stays_constant_through_every_update(factory):
    import torch.nn.functional as F

    import sparsetrain as st

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    kw = dict(sparsity=0.8, scheme="fan_in", dense_layers=["last"], steps_per_epoch=4, epochs=4)
    sp = {
        "set": lambda: st.set(model, opt, update_every_steps=2, update_end=1.0, **kw),
        "rigl": lambda: st.rigl(model, opt, update_every_steps=2, update_end=1.0, **kw),
        "mest": lambda: st.mest(model, opt, every_epochs=1, mutation_ratio=[[0, 0.3]], **kw),
    }[factory]()
    start = {n: _fan_in(m) for n, m in sp.maskset.masks.items()}
    x, y = torch.randn(64, 32), torch.randint(0, 4, (64,))
    changed = 0
    for _ in range(16):
        before = {n: m.clone() for n, m in sp.maskset.masks.items()}
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for n, m in sp.maskset.masks.items():
            assert torch.equal(_fan_in(m), start[n]), n  # every row, after every update
            changed += int(not torch.equal(m, before[n]))
    assert changed > 0 and sp.updates > 0


def test_srigl_neuron_ablation_empties_weak_neurons_and_spreads_their_weights():
    from sparsetrain.core.schemes import parse_scheme

    scheme = parse_scheme("fan_in")
    g = torch.Generator().manual_seed(0)
    mask = scheme.mask(torch.rand(8, 20, generator=g), 0.25)  # fan-in 5, 40 weights
    w = torch.rand(8, 20, generator=g) + 1.0
    w[2] = 1e-3  # neuron 2: every weight tiny, so none survives the magnitude prune
    grad = torch.rand(8, 20, generator=g) * 1e-3
    grad[5] = 10.0  # neuron 5's inactive weights are the ones the gradient would grow
    kept, live, fan = scheme.ablate(mask, w * mask, grad, n_swap=8, threshold=0.3)
    assert live.tolist() == [r != 2 for r in range(8)] and not kept[2].any()
    assert fan == 40 // 7  # the layer's weights spread over the 7 neurons left
    new = scheme.prune_and_grow_rows(kept, w * mask, 1, 1 + fan - 5, grad, g, live)
    assert set(_fan_in(new)[live].tolist()) == {fan} and not new[2].any()
    # with nothing ablated (threshold 0), the fan-in and the row count stay as they are
    same, live0, fan0 = scheme.ablate(mask, w * mask, grad, 8, 0.0)
    assert torch.equal(same, mask) and bool(live0.all()) and fan0 == 5


def test_rigl_with_neuron_ablation_keeps_a_constant_fan_in_on_live_neurons():
    import torch.nn.functional as F

    import sparsetrain as st

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with torch.no_grad():
        model[0].weight[:8] *= 1e-4  # eight neurons with no salient weight
    sp = st.rigl(
        model,
        opt,
        sparsity=0.8,
        scheme="fan_in",
        dense_layers=["last"],
        total_steps=8,
        update_every_steps=2,
        update_end=1.0,
        neuron_ablation=0.3,
    )
    assert "neuron_ablation=0.3" in repr(sp)
    x, y = torch.randn(64, 32), torch.randint(0, 4, (64,))
    for _ in range(8):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        fans = _fan_in(sp.maskset.masks["0.weight"])
        assert len(set(fans[fans > 0].tolist())) == 1  # the live neurons share one fan-in
    dead = (fans == 0).nonzero().squeeze(1).tolist()
    assert len(dead) >= 4 and max(dead) < 8  # only weakened neurons were ablated
    assert int(fans.max()) * (64 - len(dead)) <= round(0.2 * 32) * 64  # no more weights than the budget
    with pytest.raises(
        ValueError, match="neuron_ablation is SRigL's rule for constant fan-in masks; it needs scheme 'fan_in'"
    ):
        st.rigl(
            torch.nn.Sequential(torch.nn.Linear(4, 4)),
            None,
            sparsity=0.5,
            total_steps=4,
            dense_layers=[],
            neuron_ablation=0.3,
        )
    with pytest.raises(ValueError, match=r"neuron_ablation must be in \[0, 1\)"):
        st.rigl(
            torch.nn.Sequential(torch.nn.Linear(4, 4)),
            None,
            sparsity=0.5,
            total_steps=4,
            dense_layers=[],
            scheme="fan_in",
            neuron_ablation=1.5,
        )
