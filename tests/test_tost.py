"""ToST: ghost soft activations and skips come and go cleanly, rescaled init is a per-tensor scalar."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import full_and_resumed, tiny_datasets

from sparsetrain.app import Trainer
from sparsetrain.app.config import RecipeConfig, load_config
from sparsetrain.core.masks import MaskSet, random_masks
from sparsetrain.models import build_model
from sparsetrain.recipes.tost import (
    GhostSkips,
    GhostSoftActivation,
    ToST,
    find_conv_pairs,
    gradinit_scales,
    rescale_fan_in,
)

BASE = [
    "model.name=resnet20",
    "data.dataset=cifar10",
    "optim.batch_size=32",
    "optim.lr=0.05",
    "run.threads=1",
    "run.progress=false",
    "model.channels_last=false",
    "sparsity.method=static",
    "sparsity.sparsity=0.9",
]


def _data():
    return tiny_datasets(n_train=96, n_test=32, shape=(3, 32, 32))


def test_after_the_ghost_phase_the_model_is_the_plain_relu_network(tmp_path):
    cfg = load_config(
        overrides=[
            *BASE,
            "optim.epochs=2",
            f"run.out_dir={tmp_path}",
            "recipe.name=tost",
            "recipe.ghost_skip=true",
            "recipe.gradinit_steps=2",
            "recipe.soft_hold=0.2",
            "recipe.soft_blend_end=0.5",
            "recipe.skip_end=0.5",
        ]
    )
    trainer = Trainer(cfg, datasets=_data())
    assert trainer.recipe.ghost_acts and trainer.recipe.skips is not None
    n_params = sum(p.numel() for p in trainer.model.parameters())
    trainer.fit()
    model = trainer.model
    assert not any(isinstance(m, GhostSoftActivation) for m in model.modules())
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 19
    assert trainer.recipe.skips is None and sum(p.numel() for p in model.parameters()) == n_params
    plain = build_model("resnet20")
    plain.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 32, 32)
    model.eval(), plain.eval()
    torch.testing.assert_close(model(x), plain(x))


def test_tost_default_leaves_ghost_skips_and_rescaling_off_unless_switched_on():
    default = RecipeConfig(name="tost")
    assert default.components() == ["ghost-soft", "label-smoothing"]
    assert default.rescale_init == "none" and not default.ghost_skip
    assert RecipeConfig(name="tost", ghost_skip=True, rescale_init="gradinit").components() == [
        "ghost-soft",
        "ghost-skip",
        "rescale-init",
        "label-smoothing",
    ]
    assert RecipeConfig(ghost_skip=True).components() == ["ghost-skip"]


def test_blend_is_exactly_the_stated_mix():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(4, 4), relu)
    recipe = ToST(
        model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=100, soft_hold=0.1, soft_blend_end=0.3
    )
    g = model[1]
    assert isinstance(g, GhostSoftActivation) and recipe.ghost_acts == [g]
    x = torch.randn(100)
    for t, a in ((0.0, 0.0), (0.1, 0.0), (0.15, 0.25), (0.2, 0.5), (0.25, 0.75)):
        recipe.on_progress(t)
        assert g.a == pytest.approx(a)
        torch.testing.assert_close(g(x), (1 - a) * F.silu(x) + a * F.relu(x))
    recipe.on_progress(0.3)
    assert model[1] is relu


def test_ghost_skips_bridge_conv_pairs_outside_the_model():
    model = build_model("resnet20")
    pairs = find_conv_pairs(model)
    assert len(pairs) == 9  # one per basic block
    assert len(find_conv_pairs(build_model("vgg16"))) == 5  # conv pairs inside each VGG stage
    before = {n for n, _ in model.named_parameters()}
    skips = GhostSkips(model, (3, 32, 32), "cpu", channels_last=False)
    assert {n for n, _ in model.named_parameters()} == before  # nothing added to the model
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    skips.alpha = 0.0
    base = model(x)
    skips.alpha = 0.5
    assert not torch.allclose(model(x), base)
    # FLOPs: 3 x (2 x cin x cout x H x W) per skip; first stage 16->16 at 32x32
    assert skips.flops_per_sample >= 3 * 2 * 16 * 16 * 32 * 32 * 3
    skips.remove()
    torch.testing.assert_close(model(x), base)


def test_ghost_skips_count_in_training_flops_not_in_parameters(tmp_path):
    def run(extra, name):
        cfg = load_config(overrides=[*BASE, "optim.epochs=1", f"run.out_dir={tmp_path / name}", *extra])
        return Trainer(cfg, datasets=_data()).fit()

    plain, ghost = run([], "plain"), run(["recipe.ghost_skip=true", "recipe.skip_end=1.0"], "ghost")
    assert ghost["train_flops_rel"] > plain["train_flops_rel"] * 1.05
    assert ghost["sparsity"] == plain["sparsity"] and ghost["layers"] == plain["layers"]


def _masked_model():
    torch.manual_seed(0)
    model = build_model("resnet20")
    ms = MaskSet.for_model(model)
    random_masks(ms, 0.9, torch.Generator().manual_seed(0))
    return model, ms


def test_fan_in_rescaling_is_a_scalar_per_tensor_and_keeps_zeros():
    model, ms = _masked_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scales = rescale_fan_in(model, ms.densities())
    for n, p in model.named_parameters():
        if n in scales:
            assert scales[n] == pytest.approx(1 / ms.densities()[n] ** 0.5)
            torch.testing.assert_close(p, before[n] * scales[n])
            assert torch.count_nonzero(p[~ms.masks[n]]) == 0
        else:
            assert torch.equal(p, before[n])


def test_gradinit_scales_each_tensor_by_a_scalar_and_keeps_zeros(tmp_path):
    cfg = load_config(
        overrides=[
            *BASE,
            "optim.epochs=1",
            f"run.out_dir={tmp_path}",
            "recipe.rescale_init=gradinit",
            "recipe.gradinit_steps=5",
        ]
    )
    torch.manual_seed(cfg.run.seed)
    reference = build_model("resnet20")
    trainer = Trainer(cfg, datasets=_data())
    scales = trainer.recipe.init_scales
    assert scales and any(abs(s - 1) > 1e-4 for s in scales.values())
    assert trainer.finish()["init_scales"] == scales
    ms = trainer.method.maskset
    ref = dict(reference.named_parameters())
    for n, p in trainer.model.named_parameters():
        expected = ref[n] * ms.masks[n] if n in ms.masks else ref[n]
        torch.testing.assert_close(p, expected * scales.get(n, 1.0))
        if n in ms.masks:
            assert torch.count_nonzero(p[~ms.masks[n]]) == 0


def test_gradinit_leaves_its_model_untouched():
    model, _ = _masked_model()
    state = copy.deepcopy(model.state_dict())
    gradinit_scales(model, [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))], steps=2)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_gradinit_learns_on_the_network_that_will_train(tmp_path, monkeypatch):
    seen = {}

    def spy(model, batches, steps, masks=None, criterion=None):
        seen.update(
            ghosts=sum(isinstance(m, GhostSoftActivation) for m in model.modules()),
            masks=masks,
            smoothing=criterion.label_smoothing,
        )
        return {}

    monkeypatch.setattr("sparsetrain.recipes.tost.gradinit_scales", spy)
    cfg = load_config(
        overrides=[
            *BASE,
            "optim.epochs=1",
            f"run.out_dir={tmp_path}",
            "recipe.name=tost",
            "recipe.rescale_init=gradinit",
        ]
    )
    trainer = Trainer(cfg, datasets=_data())
    assert seen["ghosts"] == 19 and seen["smoothing"] == pytest.approx(0.1)
    assert seen["masks"] is trainer.method.maskset.masks


def test_gradinit_look_ahead_step_moves_kept_weights_only(monkeypatch):
    import sparsetrain.recipes.tost as tost

    model, ms = _masked_model()
    stepped = []

    def recording_call(net, params, args):
        if any(n in ms.masks and torch.count_nonzero(t[~ms.masks[n]]) for n, t in params.items()):
            stepped.append(params)
        return tost.functional_call.__wrapped__(net, params, args)

    recording_call.__wrapped__ = tost.functional_call
    monkeypatch.setattr(tost, "functional_call", recording_call)
    batch = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))]
    assert all(torch.count_nonzero(p[~ms.masks[n]]) == 0 for n, p in model.named_parameters() if n in ms.masks)
    gradinit_scales(model, batch, steps=2, grad_bound=float("inf"))
    assert stepped, "without masks the look-ahead moves pruned weights (the spy sees it)"
    stepped.clear()
    gradinit_scales(model, batch, steps=2, grad_bound=float("inf"), masks=ms.masks)
    assert not stepped


def test_teacher_soft_labels_mix_kl_and_cross_entropy():
    teacher = nn.Linear(5, 3)
    student = nn.Linear(5, 3)
    recipe = ToST(
        student,
        torch.optim.SGD(student.parameters(), lr=0.1),
        ghost_soft=False,
        label_smoothing=0.0,
        teacher=teacher,
        teacher_weight=0.3,
        teacher_temperature=2.0,
    )
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    out = torch.randn(4, 3)
    ce = nn.CrossEntropyLoss()
    expected = 0.7 * ce(out, y) + 0.3 * 4 * F.kl_div(
        F.log_softmax(out / 2, 1), F.softmax(teacher(x) / 2, 1), reduction="batchmean"
    )
    torch.testing.assert_close(recipe.loss(out, y, x, ce), expected)


def test_resume_inside_the_ghost_phase_matches_an_uninterrupted_run(tmp_path):
    def config(out):
        return load_config(
            overrides=[
                *BASE,
                "optim.epochs=2",
                f"run.out_dir={out}",
                "recipe.ghost_skip=true",
                "recipe.ghost_soft=true",
                "recipe.skip_end=0.9",
                "recipe.soft_blend_end=0.9",
                "run.checkpoint_every_steps=2",
            ]
        )

    full, resumed = full_and_resumed(lambda out: Trainer(config(out), datasets=_data()), tmp_path, 3)
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(v, resumed.model.state_dict()[k], rtol=0, atol=0)


def test_ghost_soft_on_a_model_without_relu_warns_and_is_not_recorded():
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    with pytest.warns(RuntimeWarning, match="no ReLU"):
        recipe = ToST(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10)
    assert recipe.components() == ["label-smoothing"]
