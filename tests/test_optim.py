import pytest

from sparsetrain.app.config import load_config
from sparsetrain.app.optim import build_optimizer, lr_factor
from sparsetrain.models import build_model


def _cfg(*o):
    return load_config(overrides=list(o)).optim


def test_cosine_with_warmup_matches_the_protocol():
    cfg = _cfg("optim.schedule=cosine", "optim.warmup_epochs=0.5")
    spe, total = 391, 15 * 391
    warm = 195
    assert lr_factor(cfg, 0, total, spe) == pytest.approx(1 / warm)
    assert lr_factor(cfg, warm - 1, total, spe) == pytest.approx(1.0)
    assert lr_factor(cfg, warm, total, spe) == pytest.approx(1.0)
    mid = warm + (total - warm) // 2
    assert lr_factor(cfg, mid, total, spe) == pytest.approx(0.5, abs=1e-3)
    assert lr_factor(cfg, total - 1, total, spe) < 1e-5


def test_step_schedule_drops_at_milestones():
    cfg = _cfg("optim.schedule=step", "optim.warmup_epochs=0", "optim.milestones=[0.5,0.75]", "optim.gamma=0.1")
    f = [lr_factor(cfg, s, 100, 10) for s in (0, 49, 50, 74, 75, 99)]
    assert f == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_onecycle_rises_then_anneals():
    cfg = _cfg("optim.schedule=onecycle", "optim.warmup_epochs=0")
    f = [lr_factor(cfg, s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(1 / 25) and max(f) == pytest.approx(1.0, abs=0.01) and f.index(max(f)) == 30
    assert f[-1] < 0.01 and all(a >= b for a, b in zip(f[30:], f[31:]))


def test_weight_decay_exemption_for_bn_and_bias():
    model = build_model("resnet20")
    opt = build_optimizer(model, _cfg("optim.no_decay_bn_bias=true", "optim.weight_decay=0.001"))
    decayed, exempt = opt.param_groups
    assert decayed["weight_decay"] == 0.001 and exempt["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in exempt["params"])
    assert len(decayed["params"]) + len(exempt["params"]) == len(list(model.parameters()))
    plain = build_optimizer(model, _cfg())
    assert len(plain.param_groups) == 1 and plain.defaults["nesterov"] is True
