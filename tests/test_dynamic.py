"""SET, RigL and MEST: constant budgets, fresh grown weights, scores that see gradients, exact resume."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import full_and_resumed, tiny_datasets

import sparsetrain as st
from sparsetrain.app import Trainer
from sparsetrain.app.config import load_config
from sparsetrain.methods import METHODS
from sparsetrain.methods.mest import phase_value
from sparsetrain.models import build_model
from sparsetrain.recipes.data_efficiency import ForgettingTracker

BASE = [
    "model.name=mlp",
    "data.dataset=mnist",
    "optim.batch_size=32",
    "optim.lr=0.1",
    "run.threads=1",
    "run.progress=false",
    "model.channels_last=false",
    "sparsity.dense_layers=[]",
]


def _manual(method_overrides, steps=12):
    """Drive a method by hand on an MLP, yielding (step, method, optimizer, phase) at each hook."""
    cfg = load_config(overrides=[*BASE, *method_overrides])
    torch.manual_seed(0)
    model = build_model("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    method = METHODS[cfg.sparsity.method](
        model, opt, steps_per_epoch=steps, epochs=1, seed=1, **cfg.sparsity.method_kwargs()
    )
    data = tiny_datasets(n_train=64)["train"]
    x, y = data.images.float() / 255, data.labels
    for step in range(steps):
        b = slice((step * 16) % 64, (step * 16) % 64 + 16)
        opt.zero_grad()
        F.cross_entropy(model(x[b]), y[b]).backward()
        yield step, method, opt, "before"
        method.pre_step()  # what optimizer.step() runs first (its pre-hook then finds it done)
        yield step, method, opt, "pre-step"
        opt.step()
        yield step + 1, method, opt, "after"


@pytest.mark.parametrize("name, check_phase", [("set", "after"), ("rigl", "pre-step")])
def test_set_and_rigl_keep_the_budget_and_start_grown_weights_fresh(name, check_phase):
    overrides = [
        f"sparsity.method={name}",
        "sparsity.sparsity=0.8",
        "sparsity.update_every_steps=3",
        "sparsity.update_end=1.0",
        "sparsity.distribution=erk",
    ]
    counts, previous, updates = None, None, 0
    for step, method, opt, phase in _manual(overrides):
        ms = method.maskset
        if counts is None:
            counts = {n: int(m.sum()) for n, m in ms.masks.items()}
        if phase == "before":
            previous = {n: m.clone() for n, m in ms.masks.items()}
        if phase != check_phase:
            continue
        assert {n: int(m.sum()) for n, m in ms.masks.items()} == counts
        for n, m in ms.masks.items():
            grown = m & ~previous[n]
            if grown.any():
                updates += 1
                p = ms.params[n]
                assert torch.count_nonzero(p[grown]) == 0
                assert torch.count_nonzero(opt.state[p]["momentum_buffer"][grown]) == 0
    assert updates >= 3
    assert method.updates == 3  # steps 3, 6, 9 (12 is the end of training: no update there)


def test_rigl_grows_where_the_dense_gradient_is_largest():
    for step, method, opt, phase in _manual(
        ["sparsity.method=rigl", "sparsity.sparsity=0.8", "sparsity.update_every_steps=3", "sparsity.update_end=1.0"]
    ):
        if phase == "before" and (step + 1) % 3 == 0:
            ms = method.maskset
            n = next(iter(ms.masks))
            old, grad = ms.masks[n].clone(), ms.params[n].grad.abs().clone()
        if phase == "pre-step" and (step + 1) % 3 == 0:
            grown = ms.masks[n] & ~old
            candidates = grad[~old]
            k = int(grown.sum())
            assert k > 0 and torch.equal(grad[grown].sort().values, candidates.topk(k).values.sort().values)
            return


def _mest_trainer(tmp_path, extra, epochs=4):
    cfg = load_config(
        overrides=[
            *BASE,
            f"optim.epochs={epochs}",
            f"run.out_dir={tmp_path}",
            "sparsity.method=mest",
            "sparsity.sparsity=0.8",
            "sparsity.mest.every_epochs=1",
            *extra,
        ]
    )
    return Trainer(cfg, datasets=tiny_datasets())


def test_mest_hard_mutation_keeps_the_count_and_its_score_sees_the_gradient(tmp_path):
    trainer = _mest_trainer(tmp_path, ["sparsity.mest.mutation_ratio=[[0,0.2]]"])
    ms = trainer.method.maskset
    target = {n: int(m.sum()) for n, m in ms.masks.items()}
    changes = []
    real_set = ms.set_mask

    def spy(name, mask, optimizer=None):
        changes.append(int((mask & ~ms.masks[name]).sum()))
        real_set(name, mask, optimizer)
        assert int(ms.masks[name].sum()) == target[name]

    ms.set_mask = spy
    trainer.fit()
    assert trainer.method.updates == 3 and sum(changes) > 0  # epochs 1, 2, 3 (none at the end)
    assert trainer.method.last_grad_abs_sum > 0  # the |w| + lambda|g| score read a real gradient


def test_mest_prune_score_uses_weights_and_last_gradient():
    model = torch.nn.Sequential(torch.nn.Linear(3, 1, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mest = st.mest(model, opt, sparsity=0.5, steps_per_epoch=1, epochs=1, prune_lambda=0.5, dense_layers=[])
    p = model[0].weight
    with torch.no_grad():
        p.copy_(torch.tensor([[1.0, 1.0, 0.1]]))
    p.grad = torch.tensor([[0.0, 2.0, 0.0]])
    torch.testing.assert_close(mest._score("0.weight"), torch.tensor([[1.0, 2.0, 0.1]]))


def test_mest_soft_bound_grows_first_then_prunes_back(tmp_path):
    trainer = _mest_trainer(
        tmp_path,
        [
            "sparsity.mest.soft_bound=true",
            "sparsity.mest.mutation_ratio=[[0,0.2],[0.5,0.1],[0.75,0]]",
            "sparsity.mest.excess=[[0,0.05],[0.5,0.025],[0.75,0]]",
        ],
    )
    ms = trainer.method.maskset
    target = sum(int(m.sum()) for m in ms.masks.values())
    numel = sum(m.numel() for m in ms.masks.values())
    active_after_epoch = []
    real_end = trainer.method._end_epoch

    def spy():
        real_end()
        active_after_epoch.append(sum(int(m.sum()) for m in ms.masks.values()))

    trainer.method._end_epoch = spy
    summary = trainer.fit()
    # epoch 1 (t=.25): +20% of target +5% of all; epoch 2 (t=.5): back to target, then +10% +2.5%;
    # epoch 3 (t=.75): back to target, nothing grown; epoch 4 (end): at target
    per_layer_slack = len(ms.masks)
    assert abs(active_after_epoch[0] - (target + 0.2 * target + 0.05 * numel)) <= 2 * per_layer_slack
    assert abs(active_after_epoch[1] - (target + 0.1 * target + 0.025 * numel)) <= 2 * per_layer_slack
    assert active_after_epoch[2:] == [target, target]
    assert summary["peak_active"] == active_after_epoch[0]
    assert summary["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert 0.2 < summary["train_flops_rel"] < 0.3  # the soft bound's extra weights cost FLOPs


def test_rigl_accounting_includes_its_dense_gradient_steps(tmp_path):
    def rel(method, extra=()):
        cfg = load_config(
            overrides=[
                *BASE,
                "optim.epochs=1",
                f"run.out_dir={tmp_path / method}",
                f"sparsity.method={method}",
                "sparsity.sparsity=0.9",
                *extra,
            ]
        )
        return Trainer(cfg, datasets=tiny_datasets()).fit()["train_flops_rel"]

    static, rigl = rel("static"), rel("rigl", ["sparsity.update_every_steps=2"])
    assert rigl > static * 1.2


def test_phase_values():
    phases = [[0, 0.2], [0.56, 0.1], [0.75, 0.0]]
    assert [phase_value(phases, t) for t in (0, 0.5, 0.56, 0.7, 0.75, 1.0)] == [0.2, 0.2, 0.1, 0.1, 0.0, 0.0]


def test_forgetting_statistics_and_removal():
    tr = ForgettingTracker(6, remove_epoch=3, remove_fraction=0.5)
    outcomes = [  # per epoch, correctness of examples 0..5
        [1, 1, 0, 1, 0, 1],
        [1, 0, 0, 1, 1, 0],
        [1, 1, 0, 0, 1, 1],
    ]
    for e, row in enumerate(outcomes, 1):
        tr.record(torch.arange(6), torch.tensor(row, dtype=torch.bool))
        keep = tr.end_epoch(e)
    assert tr.forgets.tolist() == [0, 1, 0, 1, 0, 1]
    assert tr.learned.tolist() == [True, True, False, True, True, True]
    # least forgotten: 0 and 4 (no events, learned); then one of the 1-event examples; 2 never learned stays
    assert keep is not None and 2 in keep.tolist() and 0 not in keep.tolist() and 4 not in keep.tolist()
    assert len(keep) == 3 and sorted(tr.removed.tolist() + keep.tolist()) == list(range(6))


def test_data_efficiency_trains_fewer_steps_with_the_same_schedule(tmp_path):
    cfg = load_config(
        overrides=[
            *BASE,
            "optim.epochs=3",
            f"run.out_dir={tmp_path}",
            "sparsity.method=mest",
            "sparsity.sparsity=0.5",
            "sparsity.data_efficiency.enabled=true",
            "sparsity.data_efficiency.remove_epoch=1",
            "sparsity.data_efficiency.remove_fraction=0.25",
        ]
    )
    trainer = Trainer(cfg, datasets=tiny_datasets())
    summary = trainer.fit()
    assert summary["steps_full_data"] == 24 and summary["steps"] == 8 + 6 + 6
    # FLOPs are relative to dense training on the full schedule: the skipped examples show as a saving
    assert summary["train_flops_rel"] == pytest.approx(trainer.flops.relative() * (256 + 192 + 192) / (3 * 256))
    assert summary["examples_removed"] == 64
    removed = json.loads((tmp_path / "removed_examples.json").read_text())
    assert len(removed) == 64 and len(set(removed)) == 64
    records = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["lr"] < 0.01  # the cosine still reaches its end with fewer steps per epoch


@pytest.mark.parametrize(
    "method, extra",
    [
        (
            "mest",
            [
                "sparsity.mest.soft_bound=true",
                "sparsity.data_efficiency.enabled=true",
                "sparsity.data_efficiency.remove_epoch=1",
                "sparsity.mest.every_epochs=1",
            ],
        ),
        ("rigl", ["sparsity.update_every_steps=3"]),
        ("set", ["sparsity.update_every_steps=3", "sparsity.scheme=channel_out"]),
    ],
)
def test_resume_mid_training_reproduces_masks_and_weights(tmp_path, method, extra):
    def config(out):
        return load_config(
            overrides=[
                *BASE,
                "optim.epochs=3",
                f"run.out_dir={out}",
                f"sparsity.method={method}",
                "sparsity.sparsity=0.8",
                "run.checkpoint_every_steps=5",
                *extra,
            ]
        )

    # stopped mid-epoch 2 (step 13), after the checkpoint at step 10
    full, resumed = full_and_resumed(lambda out: Trainer(config(out), datasets=tiny_datasets()), tmp_path, 13)
    for n, m in full.method.maskset.masks.items():
        assert torch.equal(m, resumed.method.maskset.masks[n]), n
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
