import pytest
import torch
import torch.nn as nn
from conftest import keep_masked

from sparsetrain.core.masks import MaskSet, random_masks, select_parameters
from sparsetrain.models import build_model


def test_selection_policy_first_last_and_patterns():
    model = build_model("resnet20")
    names = list(select_parameters(model, ["first", "last"]))
    assert "conv1.weight" not in names and "fc.weight" not in names and "layer1.0.conv1.weight" in names
    assert len(names) == 19 - 1 + 2  # 18 block convs + 2 shortcut convs
    no_short = select_parameters(model, ["first", "last", "*.shortcut.*"])
    assert not any("shortcut" in n for n in no_short) and len(no_short) == 18
    assert "fc.weight" in select_parameters(model, [])


@pytest.mark.parametrize("model_name", ["resnet20", "vgg16", "mlp"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
def test_random_masks_hit_the_target_exactly(model_name, sparsity):
    model = build_model(model_name)
    ms = MaskSet.for_model(model)
    random_masks(ms, sparsity, torch.Generator().manual_seed(0))
    for ls in ms.layers():
        assert ls.nonzeros == round((1 - sparsity) * ls.numel)
        assert int((ms.params[ls.name] != 0).sum()) <= ls.nonzeros


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-4),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    ],
    ids=["sgd-nesterov-wd", "adam", "adamw"],
)
def test_masked_weights_stay_exactly_zero_through_optimizer_steps(make_opt):
    torch.manual_seed(0)
    model = build_model("small_cnn")
    ms = MaskSet.for_model(model, [])
    random_masks(ms, 0.8, torch.Generator().manual_seed(1))
    opt = make_opt(model.parameters())
    keep_masked(ms, opt)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    before = {n: p.detach().clone() for n, p in ms.params.items()}
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for n, p in ms.params.items():
        m = ms.masks[n]
        assert torch.count_nonzero(p[~m]) == 0
        assert not torch.equal(p[m], before[n][m])  # kept weights do train
        for v in opt.state[p].values():
            if torch.is_tensor(v) and v.shape == p.shape:
                assert torch.count_nonzero(v[~m]) == 0


def test_set_mask_resets_optimizer_state_of_changed_weights():
    model = nn.Linear(8, 4)
    ms = MaskSet({"weight": model.weight})
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    keep_masked(ms, opt)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    buf = opt.state[model.weight]["momentum_buffer"]
    assert torch.count_nonzero(buf) == buf.numel()
    new = torch.ones(4, 8, dtype=torch.bool)
    new[0] = False
    ms.set_mask("weight", new, opt)
    assert torch.count_nonzero(model.weight[0]) == 0 and torch.count_nonzero(buf[0]) == 0
    assert torch.count_nonzero(buf[1:]) == buf[1:].numel()
    with pytest.raises(ValueError, match="shape"):
        ms.set_mask("weight", torch.ones(2, 2, dtype=torch.bool))


def test_state_dict_round_trip_and_mismatch():
    model = build_model("mlp")
    ms = MaskSet.for_model(model)
    random_masks(ms, 0.7, torch.Generator().manual_seed(2))
    state = ms.state_dict()
    other = MaskSet.for_model(build_model("mlp"))
    other.load_state_dict(state)
    assert all(torch.equal(other.masks[n], ms.masks[n]) for n in ms.masks)
    assert all(torch.count_nonzero(other.params[n][~other.masks[n]]) == 0 for n in other.masks)
    with pytest.raises(ValueError, match="do not match"):
        MaskSet.for_model(build_model("small_cnn")).load_state_dict(state)


def test_bad_sparsity_is_refused():
    ms = MaskSet.for_model(build_model("mlp"))
    with pytest.raises(ValueError, match=r"\[0, 1\), got 1.0"):
        random_masks(ms, 1.0, torch.Generator())


def test_masks_of_compact_layers_are_held_at_one_bit_and_read_back_exactly():
    from sparsetrain.core.masks import MaskDict

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(7, 13, generator=g) > 0.5, torch.rand(3, 5, generator=g) > 0.9
    masks = MaskDict({"a": a.clone(), "b": b.clone()})
    masks.pack("a")
    assert (
        dict.__getitem__(masks, "a").dtype == torch.uint8 and dict.__getitem__(masks, "a").numel() == (7 * 13 + 7) // 8
    )
    assert torch.equal(masks["a"], a) and torch.equal(masks.get("a"), a) and masks.get("c") is None
    assert [n for n, _ in masks.items()] == ["a", "b"] and all(m.dtype == torch.bool for m in masks.values())
    masks["a"] = ~a  # setting a packed mask packs it again
    assert dict.__getitem__(masks, "a").dtype == torch.uint8 and torch.equal(masks["a"], ~a)
    assert torch.equal(masks["b"], b)  # the others stay plain tensors
    copied = dict(masks)
    assert type(copied) is dict and torch.equal(copied["a"], ~a) and torch.equal({**masks}["a"], ~a)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-4, amsgrad=True),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    ],
    ids=["sgd-nesterov-wd", "adam-amsgrad", "adamw"],
)
def test_for_zero_preserving_optimizers_masked_gradients_alone_keep_weights_and_state_zero(make_opt):
    """The premise of ``MaskSet.zeros_hold``: zeroed once, then only the gradients masked before each update, the
    masked weights and their optimizer state stay exactly zero."""
    torch.manual_seed(0)
    model = build_model("small_cnn")
    ms = MaskSet.for_model(model, [])
    random_masks(ms, 0.8, torch.Generator().manual_seed(1))
    opt = make_opt(model.parameters())
    ms.apply(opt)
    assert ms.zeros_hold(opt)
    opt.register_step_pre_hook(lambda o, args, kwargs: ms.mask_gradients())
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for n, p in ms.params.items():
        m = ms.masks[n]
        assert torch.count_nonzero(p[~m]) == 0
        assert all(torch.count_nonzero(v[~m]) == 0 for v in opt.state[p].values() if v.shape == p.shape)


def test_a_method_skips_the_after_step_zeroing_only_where_zeros_hold(monkeypatch):
    """After the first step (and after every mask change) the masks are applied; in between, for SGD / Adam / AdamW,
    the zeroing after the step would multiply zeros and is left out; any other optimizer gets it every step."""
    import sparsetrain as st

    calls = []
    real_apply = MaskSet.apply
    monkeypatch.setattr(MaskSet, "apply", lambda self, opt=None: calls.append(opt) or real_apply(self, opt))
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for make_opt, every_step in ((torch.optim.SGD, False), (torch.optim.Adagrad, True)):
        torch.manual_seed(0)
        model = build_model("small_cnn")
        opt = make_opt(model.parameters(), lr=0.1)
        sp = st.static(model, opt, sparsity=0.8, dense_layers=[])
        calls.clear()
        for _ in range(4):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        assert len([c for c in calls if c is opt]) == (4 if every_step else 1), make_opt
        for n, p in sp.maskset.params.items():
            assert torch.count_nonzero(p[~sp.maskset.masks[n]]) == 0


def test_weights_loaded_into_the_model_mid_training_are_zeroed_again_at_the_next_step():
    """The zeroing after a step is left out while zeros hold; a state dict loaded into the model (dense weights,
    say) makes the next step zero every masked entry again."""
    import sparsetrain as st

    torch.manual_seed(0)
    model = build_model("small_cnn")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = st.static(model, opt, sparsity=0.8, dense_layers=[])
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for step in range(4):
        if step == 2:
            model.load_state_dict(dense)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for n, p in sp.maskset.params.items():
        assert torch.count_nonzero(p[~sp.maskset.masks[n]]) == 0, n
