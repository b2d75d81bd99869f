"""Compact state: layers under the direct backend store, differentiate and optimise only their kept weights,
and follow mask updates (MEST) with their optimizer state."""

import gc
import weakref

import pytest
import torch
import torch.nn as nn
from conftest import full_and_resumed, tiny_datasets

from sparsetrain.app import Trainer
from sparsetrain.app.config import ConfigError, load_config
from sparsetrain.core.masks import MaskSet, random_masks
from sparsetrain.execution import native
from sparsetrain.execution.backends import apply_backend
from sparsetrain.execution.backends.compact import CompactConv2d, compact_layers

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler for the direct kernels")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.Flatten(),
        nn.Linear(8 * 5 * 5, 4),
    )


def test_compact_layer_holds_only_kept_weights_and_matches_masked_dense():
    model, ref = _model(), _model()
    ms = MaskSet.for_model(model, ["last"])
    random_masks(ms, 0.8, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, mask in ms.masks.items():
            ref.get_parameter(name).mul_(mask)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    old = weakref.ref(model[0].weight)
    names = compact_layers(apply_backend(model, ms, "direct"), ms, opt)
    gc.collect()
    assert names == ["0.weight", "2.weight"] and isinstance(model[0], CompactConv2d)
    assert old() is None  # the dense weight is gone: nothing holds it
    assert "weight" not in dict(model[0].named_parameters())
    assert model[0].values.numel() == int(ms.masks["0.weight"].sum())
    assert any(p is model[0].values for g in opt.param_groups for p in g["params"])
    # the state dict is the plain model's
    state = model.state_dict()
    assert set(state) == set(ref.state_dict())
    torch.testing.assert_close(state["0.weight"], ref[0].weight)
    x = torch.randn(2, 3, 10, 10)
    out, want = model(x), ref(x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    want.square().sum().backward()
    kept = ms.masks["0.weight"]
    torch.testing.assert_close(model[0].values.grad, ref[0].weight.grad[kept], rtol=1e-4, atol=1e-5)
    opt.step()
    assert opt.state[model[0].values]["momentum_buffer"].shape == model[0].values.shape

    # a mask change re-lays weights and momentum: kept by both masks keep theirs, grown ones start at zero
    before_w, before_m = (
        model[0].weight.clone(),
        ms.owners["0.weight"].compact.dense(opt.state[model[0].values]["momentum_buffer"]),
    )
    new = kept.clone()
    new.view(-1)[kept.view(-1).nonzero()[:5]] = False
    new.view(-1)[(~kept).view(-1).nonzero()[:5]] = True
    ms.set_mask("0.weight", new, opt)
    values = model[0].values
    assert values.numel() == int(new.sum()) and opt.state[values]["momentum_buffer"].shape == values.shape
    both = new & kept
    torch.testing.assert_close(model[0].weight[both], before_w[both])
    momentum = ms.owners["0.weight"].compact.dense(opt.state[values]["momentum_buffer"])
    torch.testing.assert_close(momentum[both], before_m[both])
    assert torch.all(model[0].weight[new & ~kept] == 0) and torch.all(momentum[new & ~kept] == 0)
    assert torch.all(model[0].weight[~new] == 0)


def test_loading_a_plain_state_dict_fills_the_kept_weights():
    model = _model()
    ms = MaskSet.for_model(model, ["last"])
    random_masks(ms, 0.5, torch.Generator().manual_seed(1))
    compact_layers(apply_backend(model, ms, "direct"), ms, None)
    plain = _model().state_dict()
    plain["0.weight"] = plain["0.weight"] * ms.masks["0.weight"]
    model.load_state_dict(plain)
    torch.testing.assert_close(model[0].weight, plain["0.weight"])


def _config(out, extra=()):
    return load_config(
        overrides=[
            "model.name=small_cnn",
            "data.dataset=mnist",
            "optim.batch_size=32",
            "run.threads=1",
            "run.progress=false",
            "model.channels_last=false",
            "optim.epochs=2",
            "run.checkpoint_every_steps=3",
            f"run.out_dir={out}",
            "sparsity.method=static",
            "sparsity.sparsity=0.8",
            "sparsity.dense_layers=[last]",
            *extra,
        ]
    )


def test_training_with_compact_state_matches_masked_dense_and_resumes(tmp_path):
    data = tiny_datasets(n_train=96)
    masked = Trainer(_config(tmp_path / "masked"), datasets=data)
    masked.fit()
    compact = ["sparsity.backend=direct", "sparsity.compact_state=true"]
    full, resumed = full_and_resumed(
        lambda out: Trainer(_config(out, compact), datasets=data), tmp_path / "c", stop_at_step=4
    )
    assert isinstance(full.model[3], CompactConv2d) and isinstance(resumed.model[3], CompactConv2d)
    for k, v in masked.model.state_dict().items():
        torch.testing.assert_close(full.model.state_dict()[k], v, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(resumed.model.state_dict()[k], full.model.state_dict()[k], rtol=0, atol=0)


def test_mest_with_compact_state_matches_masked_dense_and_resumes_across_a_mutation(tmp_path):
    data = tiny_datasets(n_train=96)
    mest = ["sparsity.method=mest", "sparsity.mest.every_epochs=1", "sparsity.mest.soft_bound=true", "optim.epochs=3"]
    masked = Trainer(_config(tmp_path / "masked", mest), datasets=data)
    masked.fit()
    compact = [*mest, "sparsity.backend=direct", "sparsity.compact_state=true"]
    full, resumed = full_and_resumed(
        lambda out: Trainer(_config(out, compact), datasets=data), tmp_path / "c", stop_at_step=5
    )
    assert full.method.updates >= 2 and isinstance(full.model[3], CompactConv2d)
    for n, m in masked.method.maskset.masks.items():
        assert torch.equal(full.method.maskset.masks[n], m)
        assert torch.equal(resumed.method.maskset.masks[n], m)
    for k, v in masked.model.state_dict().items():
        torch.testing.assert_close(full.model.state_dict()[k], v, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(resumed.model.state_dict()[k], full.model.state_dict()[k], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_rigl_and_set_with_compact_state_match_masked_dense_and_resume(tmp_path, method):
    data = tiny_datasets(n_train=96)
    dst = [f"sparsity.method={method}", "sparsity.update_every_steps=2", "sparsity.update_end=1.0", "optim.epochs=3"]
    masked = Trainer(_config(tmp_path / "masked", dst), datasets=data)
    masked.fit()
    compact = [*dst, "sparsity.backend=direct", "sparsity.compact_state=true"]
    full, resumed = full_and_resumed(
        lambda out: Trainer(_config(out, compact), datasets=data), tmp_path / "c", stop_at_step=5
    )
    assert full.method.updates >= 4 and isinstance(full.model[3], CompactConv2d)
    assert not full.method.maskset.captured  # the full weight gradients live only until the update read them
    for n, m in masked.method.maskset.masks.items():
        assert torch.equal(full.method.maskset.masks[n], m), n  # RigL grew where the dense gradient said
        assert torch.equal(resumed.method.maskset.masks[n], m), n
    for k, v in masked.model.state_dict().items():
        torch.testing.assert_close(full.model.state_dict()[k], v, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(resumed.model.state_dict()[k], full.model.state_dict()[k], rtol=0, atol=0)


def test_compact_state_needs_the_direct_backend_and_a_method_without_dense_gradients():
    with pytest.raises(
        ConfigError, match="compact_state stores only kept weights under backend 'direct', 'condensed' or 'auto'"
    ):
        load_config(overrides=["sparsity.method=static", "sparsity.sparsity=0.5", "sparsity.compact_state=true"])
    with pytest.raises(ConfigError, match="method 'lottery'"):
        load_config(
            overrides=[
                "sparsity.method=lottery",
                "sparsity.sparsity=0.5",
                "sparsity.backend=direct",
                "sparsity.compact_state=true",
            ]
        )
