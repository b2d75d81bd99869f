"""The public contract: every method from ``import sparsetrain as st`` in a plain loop, the Trainer on the same
objects (bit-identical), exact resume of a killed loop, export, and the messages of refused inputs."""

import copy
import dataclasses
import functools
import io
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import tiny_datasets

import sparsetrain as st
from sparsetrain.app import Trainer, method_seed
from sparsetrain.app.config import ConfigError, load_config
from sparsetrain.data.images import DATASETS, BatchLoader

EPOCHS, BATCH, LR = 2, 32, 1e-3
INFO = dataclasses.replace(DATASETS["mnist"], crop_padding=0, flip=False)


class UserNet(nn.Module):
    """A network the library has never seen: two convs with BN, pooling, two Linear layers."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16)
        self.act1, self.act2, self.act3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.fc1, self.fc2 = nn.Linear(16 * 7 * 7, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.pool(self.act2(self.bn2(self.conv2(x))))
        return self.fc2(self.act3(self.fc1(x.flatten(1))))


@pytest.fixture(scope="module")
def data():
    return tiny_datasets(n_train=256, n_test=64)


def _fresh(seed=0):
    torch.set_num_threads(1)  # as the Trainer's run.threads=1: the float sums of a step depend on the thread count
    torch.manual_seed(seed)
    model = UserNet()
    return model, torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=5e-4)


def _loader(data):
    return BatchLoader(data["train"], INFO, BATCH, train=True, seed=0)


def _train(model, opt, loader, sp, epochs=EPOCHS, stop_at=None, loss_fn=F.cross_entropy):
    """A plain PyTorch loop; with ``stop_at`` it returns after that many optimizer steps in all."""
    for epoch in range(loader.epoch, epochs):
        if loader.epoch != epoch or loader.position == 0:
            loader.start_epoch(epoch)
        for x, y, _ in loader:
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if stop_at is not None and sp.clock.step == stop_at:
                return


# name -> (factory with its knobs, the same as config overrides)
METHOD_CASES = {
    "static": (
        functools.partial(st.static, sparsity=0.9, distribution="erk", init="snip"),
        ["sparsity.method=static", "sparsity.sparsity=0.9", "sparsity.distribution=erk", "sparsity.init=snip"],
    ),
    "set": (
        functools.partial(st.set, sparsity=0.8, update_every_steps=3, distribution="erk"),
        ["sparsity.method=set", "sparsity.sparsity=0.8", "sparsity.update_every_steps=3", "sparsity.distribution=erk"],
    ),
    "rigl": (
        functools.partial(st.rigl, sparsity=0.9, update_every_steps=3, distribution="erk"),
        ["sparsity.method=rigl", "sparsity.sparsity=0.9", "sparsity.update_every_steps=3", "sparsity.distribution=erk"],
    ),
    "mest": (
        functools.partial(st.mest, sparsity=0.9, every_epochs=1, soft_bound=True),
        [
            "sparsity.method=mest",
            "sparsity.sparsity=0.9",
            "sparsity.mest.every_epochs=1",
            "sparsity.mest.soft_bound=true",
        ],
    ),
    "swat": (
        functools.partial(st.swat, sparsity=0.8, topk_period=3),
        ["sparsity.method=swat", "sparsity.sparsity=0.8", "sparsity.swat.topk_period=3"],
    ),
}


def _snip_batches(data):
    """The batches the Trainer scores SNIP with (its scoring loader, seeded apart from the training order)."""
    loader = BatchLoader(data["train"], INFO, BATCH, train=True, seed=1)
    return [next(iter(loader))[:2]]


def _plain(name, data):
    make, _ = METHOD_CASES[name]
    model, opt = _fresh()
    loader = _loader(data)
    extra = {"batches": _snip_batches(data)} if name == "static" else {}
    seed = {} if name == "swat" else {"seed": method_seed(0)}
    sp = make(model, opt, steps_per_epoch=len(loader), epochs=EPOCHS, **seed, **extra)
    _train(model, opt, loader, sp)
    return model, sp


def _trainer_config(tmp_path, overrides):
    return load_config(
        overrides=[
            "data.dataset=mnist",
            "data.augment=false",
            "model.channels_last=false",
            f"optim.epochs={EPOCHS}",
            f"optim.batch_size={BATCH}",
            "optim.name=adamw",
            f"optim.lr={LR}",
            "optim.schedule=constant",
            "optim.warmup_epochs=0",
            "run.progress=false",
            "run.threads=1",
            "run.eval_batch_size=64",
            f"run.out_dir={tmp_path}",
            *overrides,
        ]
    )


@pytest.mark.parametrize("name", sorted(METHOD_CASES))
def test_each_factory_trains_a_user_model_with_adamw_at_its_exact_sparsity(name, data):
    model, sp = _plain(name, data)
    target = {"static": 0.9, "set": 0.8, "rigl": 0.9, "mest": 0.9, "swat": 0.8}[name]
    if name == "swat":  # per-layer top-K budgets: ceil(density * numel) kept (and ties) per layer
        assert sp.sparsity() == pytest.approx(target, abs=5e-3)
    else:
        assert sp.sparsity() == pytest.approx(target, abs=1e-3)
        for n, m in sp.maskset.masks.items():  # masked weights and AdamW's moments stay exactly zero
            p = dict(model.named_parameters())[n]
            assert torch.count_nonzero(p[~m]) == 0, n
            for v in sp.optimizer.state[p].values():
                if torch.is_tensor(v) and v.shape == p.shape:
                    assert torch.count_nonzero(v[~m]) == 0, n
    assert sp.clock.step == EPOCHS * 8 and sp.clock.epoch == EPOCHS
    if name in ("set", "rigl", "mest"):
        assert sp.updates > 0
    assert f"step={EPOCHS * 8}/{EPOCHS * 8}" in repr(sp) and type(sp).__name__ in repr(sp)
    assert [ls.name for ls in sp.report()] and all(0 <= ls.density <= 1 for ls in sp.report())


@pytest.mark.parametrize("name", sorted(METHOD_CASES))
def test_the_trainer_runs_the_same_object_as_a_plain_loop(name, data, tmp_path):
    model, sp = _plain(name, data)
    user_model, _ = _fresh()
    trainer = Trainer(_trainer_config(tmp_path, METHOD_CASES[name][1]), model=user_model, datasets=data)
    trainer.fit()
    assert type(trainer.method) is type(sp)
    for k, v in model.state_dict().items():
        assert torch.equal(v, trainer.model.state_dict()[k]), k
    if sp.maskset is not None:
        for n, m in sp.maskset.masks.items():
            assert torch.equal(m, trainer.method.maskset.masks[n]), n


def test_the_trainer_runs_tost_and_a_lottery_round_as_a_plain_loop_does(data, tmp_path):
    # ToST on a static mask: label smoothing through the recipe's loss, ghost activations in the step hooks
    model, opt = _fresh()
    loader = _loader(data)
    length = {"steps_per_epoch": len(loader), "epochs": EPOCHS}
    sp = st.static(model, opt, sparsity=0.9, seed=method_seed(0), **length)
    recipe = st.tost(model, opt, sparsifier=sp, soft_blend_end=0.5, **length)
    _train(model, opt, loader, sp, loss_fn=recipe.loss)
    user_model, _ = _fresh()
    cfg = _trainer_config(
        tmp_path / "tost",
        ["sparsity.method=static", "sparsity.sparsity=0.9", "recipe.name=tost", "recipe.soft_blend_end=0.5"],
    )
    trainer = Trainer(cfg, model=user_model, datasets=data)
    trainer.fit()
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, nn.SiLU) for m in model.modules())  # the ghosts are gone by the end

    # one lottery round from the weights trained above, rewound to a fresh initialisation
    trained, rewind = copy.deepcopy(model.state_dict()), _fresh(1)[0].state_dict()
    make = functools.partial(st.lottery, sparsity=0.95, trained=trained, rewind=rewind)
    model, opt = _fresh()
    sp = make(model, opt, **length)
    _train(model, opt, _loader(data), sp)
    assert sp.sparsity() == pytest.approx(0.95, abs=1e-3)
    user_model, _ = _fresh()
    trainer = Trainer(_trainer_config(tmp_path / "lottery", []), model=user_model, datasets=data, method=make)
    trainer.fit()
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name, stop_at", [("rigl", 7), ("mest", 11), ("swat", 10)])
def test_a_killed_plain_loop_resumes_bit_identical(name, stop_at, data):
    """Save {model, optimizer, sparsifier, data position}, throw everything away, rebuild, load, finish."""
    make = METHOD_CASES[name][0]
    extra = {} if name == "swat" else {"seed": 3}
    model, opt = _fresh()
    loader = _loader(data)
    sp = make(model, opt, steps_per_epoch=len(loader), epochs=3, **extra)
    _train(model, opt, loader, sp, epochs=3)

    model2, opt2 = _fresh()
    loader2 = _loader(data)
    sp2 = make(model2, opt2, steps_per_epoch=len(loader2), epochs=3, **extra)
    _train(model2, opt2, loader2, sp2, epochs=3, stop_at=stop_at)
    buf = io.BytesIO()
    torch.save(
        {
            "model": model2.state_dict(),
            "opt": opt2.state_dict(),
            "sparsity": sp2.state_dict(),
            "loader": loader2.state_dict(),
        },
        buf,
    )
    del model2, opt2, sp2, loader2
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    model3, opt3 = _fresh(seed=5)  # another initialisation: everything must come from the checkpoint
    loader3 = _loader(data)
    sp3 = make(model3, opt3, steps_per_epoch=len(loader3), epochs=3, **extra)
    sp3.load_state_dict(state["sparsity"])  # first: masks (and layouts) before the weights
    model3.load_state_dict(state["model"])
    opt3.load_state_dict(state["opt"])
    loader3.load_state_dict(state["loader"])
    _train(model3, opt3, loader3, sp3, epochs=3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, model3.state_dict()[k]), k
    assert sp3.clock.step == sp.clock.step == 24
    if name != "swat":
        assert all(torch.equal(m, sp3.maskset.masks[n]) for n, m in sp.maskset.masks.items())
        assert sp.updates == sp3.updates > 0


def test_remove_leaves_a_plain_module_with_the_masks_applied(data):
    for make in (
        functools.partial(st.rigl, sparsity=0.9, update_every_steps=2),
        functools.partial(st.swat, sparsity=0.9),
    ):
        model, opt = _fresh()
        loader = _loader(data)
        sp = make(model, opt, steps_per_epoch=len(loader), epochs=1)
        _train(model, opt, loader, sp, epochs=1)
        kept, names = sp.sparsity(), [ls.name for ls in sp.report()]
        plain = sp.remove()
        assert plain is model and {type(m) for m in plain.modules()} <= {
            UserNet,
            nn.Conv2d,
            nn.BatchNorm2d,
            nn.ReLU,
            nn.AvgPool2d,
            nn.Linear,
        }
        weights = [dict(plain.named_parameters())[n] for n in names]
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        assert zeros >= kept - 0.01
        before = copy.deepcopy(plain.state_dict())
        loader.start_epoch(1)
        x, y = next(iter(loader))[:2]
        opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        opt.step()  # no hooks any more: masked weights may move now
        assert opt._optimizer_step_pre_hooks == {} and opt._optimizer_step_post_hooks == {}
        assert any(not torch.equal(v, plain.state_dict()[k]) for k, v in before.items())


def test_refused_inputs_say_what_and_what_is_allowed():
    model, opt = _fresh()
    cases = [
        (lambda: st.rigl(model, opt, sparsity=0.9), "total_steps"),
        (lambda: st.rigl(model, opt, sparsity=1.2, total_steps=10), r"sparsity must be in \[0, 1\), got 1.2"),
        (lambda: st.static(model, opt, sparsity=0.9, distribution="erx"), "unknown distribution 'erx'; allowed"),
        (lambda: st.static(model, opt, sparsity=0.9, init="snip"), "pass batches"),
        (lambda: st.static(model, opt, sparsity=0.9, init="synflow"), "needs input_shape"),
        (
            lambda: st.mest(model, opt, sparsity=0.9, steps_per_epoch=4, epochs=2, every_epochs=0),
            "every_epochs must be",
        ),
        (
            lambda: st.mest(model, opt, sparsity=0.9, steps_per_epoch=4, epochs=2, mutation_ratio=[[0.5, 0.1]]),
            "start at 0",
        ),
        (lambda: st.set(model, opt, sparsity=0.9, total_steps=10, scheme="nm_2:4"), "N:M"),
        (
            lambda: st.set(model, opt, sparsity=0.9, total_steps=10, update_decay="linear"),
            "unknown update_decay 'linear'",
        ),
        (lambda: st.swat(model, opt, sparsity=0.9, variant="x"), "unknown swat variant 'x'"),
        (lambda: st.swat(model, opt, sparsity=0.9, variant="m"), "steps_per_epoch and epochs"),
        (lambda: st.rigl(model, opt, sparsity=0.9, steps_per_epoch=4), "together"),
        (lambda: st.rigl(model, opt, sparsity=0.9, total_steps=9, steps_per_epoch=4, epochs=2), "exceeds"),
        (lambda: st.rigl(model, "sgd", sparsity=0.9, total_steps=9), "torch.optim.Optimizer, got str"),
        (lambda: st.tost(model, opt, soft_activation="tanh", total_steps=9), "unknown soft_activation 'tanh'"),
        (lambda: st.tost(model, opt, rescale_init="gradinit", total_steps=9), "pass batches"),
    ]
    for call, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            call()
    sp = st.static(*_fresh(), sparsity=0.5)
    with pytest.raises(ValueError, match="this state is from method 'rigl'; this sparsifier is 'static'"):
        sp.load_state_dict({"method": "rigl"})


def test_rigl_says_when_the_gradient_is_missing_at_an_update():
    model, opt = _fresh()
    st.rigl(model, opt, sparsity=0.9, total_steps=10, update_every_steps=1, update_end=1.0)
    with pytest.raises(RuntimeError, match="grows by the dense gradient, but .* has none"):
        opt.step()  # no backward before the step


@pytest.mark.parametrize(
    "overrides, keys",
    [
        (["sparsity.method=swat", "sparsity.sparsity=0.9", "sparsity.distribution=erk"], "sparsity.distribution"),
        (["sparsity.method=swat", "sparsity.sparsity=0.9", "sparsity.init=snip"], "sparsity.init"),
        (["sparsity.method=swat", "sparsity.sparsity=0.9", "sparsity.scheme=kernel"], "sparsity.scheme"),
        (["sparsity.method=set", "sparsity.sparsity=0.9", "sparsity.init=magnitude"], "sparsity.init"),
        (["sparsity.method=rigl", "sparsity.sparsity=0.9", "sparsity.init=synflow"], "sparsity.init"),
        (["sparsity.method=set", "sparsity.sparsity=0.9", "sparsity.neuron_ablation=0.3"], "sparsity.neuron_ablation"),
        (["sparsity.method=mest", "sparsity.sparsity=0.9", "sparsity.init=snip"], "sparsity.init"),
        (["sparsity.method=dense", "sparsity.sparsity=0.5"], "sparsity.sparsity"),
        (["sparsity.method=dense", "sparsity.distribution=erk"], "sparsity.distribution"),
        (
            ["sparsity.method=static", "sparsity.sparsity=0.9", "sparsity.update_every_steps=10"],
            "sparsity.update_every_steps",
        ),
        (["sparsity.method=static", "sparsity.sparsity=0.9", "sparsity.mest.soft_bound=true"], "sparsity.mest"),
        (["sparsity.method=rigl", "sparsity.sparsity=0.9", "sparsity.swat.variant=erk"], "sparsity.swat"),
        (["sparsity.method=mest", "sparsity.sparsity=0.9", "sparsity.update_fraction=0.1"], "sparsity.update_fraction"),
        (["sparsity.method=static", "sparsity.sparsity=0.9", "sparsity.init_batches=4"], "sparsity.init_batches"),
        (["sparsity.method=rigl", "sparsity.sparsity=0.9", "sparsity.lottery.rounds=2"], "sparsity.lottery"),
        (["optim.name=adamw", "optim.momentum=0.5"], "optim.momentum"),
    ],
)
def test_the_config_refuses_keys_the_method_does_not_use(overrides, keys):
    with pytest.raises(ConfigError, match=keys.replace(".", r"\.")):
        load_config(overrides=overrides)


def test_the_plain_trainer_refuses_lottery_and_points_to_the_search(tmp_path, data):
    cfg = _trainer_config(tmp_path, ["sparsity.method=lottery", "sparsity.sparsity=0.9"])
    with pytest.raises(ConfigError, match="lottery_ticket"):
        Trainer(cfg, model=UserNet(), datasets=data)


def test_config_builds_exactly_the_factory_with_those_keys():
    cfg = load_config(
        overrides=[
            "sparsity.method=mest",
            "sparsity.sparsity=0.9",
            "sparsity.mest.prune_lambda=0.5",
            "sparsity.distribution=erk",
        ]
    )
    kw = cfg.sparsity.method_kwargs()
    assert st.METHODS["mest"] is st.mest and kw["prune_lambda"] == 0.5 and kw["distribution"] == "erk"
    model, opt = _fresh()
    sp = st.METHODS[cfg.sparsity.method](model, opt, steps_per_epoch=4, epochs=2, **kw)
    assert isinstance(sp, st.methods.MEST) and sp.prune_lambda == 0.5


def test_data_efficiency_skips_removed_examples_in_any_data_loader(data):
    from torch.utils.data import DataLoader, TensorDataset

    x = data["train"].images.float() / 255
    ds = st.WithIndices(TensorDataset(x, data["train"].labels))
    model, opt = _fresh()
    sp = st.mest(model, opt, sparsity=0.8, steps_per_epoch=8, epochs=3, every_epochs=1)
    de = st.DataEfficiency(len(ds), remove_epoch=1, remove_fraction=0.25, sparsifier=sp, batch_size=BATCH)
    loader = DataLoader(ds, batch_size=BATCH, sampler=de.sampler)
    seen = []
    for epoch in range(3):
        for xb, yb, idx in loader:
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            de.record(idx, out.argmax(1) == yb)
            seen.append(idx)
        de.end_epoch()
    assert len(de.removed) == 64 and sp.steps_per_epoch == 6
    later = torch.cat(seen[8:])
    assert len(later) == 2 * 192 and not set(later.tolist()) & set(de.removed.tolist())
    assert sp.clock.step == 8 + 6 + 6 and sp.clock.epoch == 3  # MEST stayed on epochs: one mutation per epoch
    assert sp.updates == 2


def test_the_trainer_takes_any_dataset_and_loss_and_resumes_exactly(tmp_path):
    from conftest import full_and_resumed
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(160, 1, 28, 28, generator=g), torch.randint(0, 10, (160,), generator=g)
    x[torch.arange(160), 0, y, y] += 5
    datasets = {"train": TensorDataset(x[:128], y[:128]), "test": TensorDataset(x[128:], y[128:])}
    calls = []

    def loss_fn(out, target):
        calls.append(1)
        return F.cross_entropy(out, target, label_smoothing=0.05)

    def make(out):
        torch.manual_seed(0)
        cfg = _trainer_config(
            out,
            [
                "sparsity.method=rigl",
                "sparsity.sparsity=0.8",
                "sparsity.update_every_steps=3",
                "run.checkpoint_every_steps=3",
                "data.val_fraction=0.25",
            ],
        )
        return Trainer(cfg, model=UserNet(), datasets=datasets, loss_fn=loss_fn)

    full, resumed = full_and_resumed(make, tmp_path, 5)
    assert calls and full.method.updates > 0
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    summary = json.loads((tmp_path / "full" / "final.json").read_text())
    assert summary["sparsity"] == pytest.approx(0.8, abs=1e-3) and "val_acc" in summary


def test_training_past_the_declared_length_warns_once_naming_the_step():
    import warnings

    import sparsetrain as st

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    st.rigl(model, opt, sparsity=0.5, total_steps=3, dense_layers=[])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(5):
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
    past = [str(w.message) for w in seen if "declared length" in str(w.message)]
    assert past == [
        "training went past its declared length: step 4 of total_steps=3; schedules over training (mask updates, "
        "budgets) ended at the declared length: give the real length"
    ]
