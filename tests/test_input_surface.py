"""The input surface, property-based (Hypothesis): any arguments to the factories either build a sparsifier that
trains with exact masks at the sparsity asked for, or end with one line naming the bad value; never another
exception, never a sparsifier off its target. And the parsers and commands that read files and flags refuse bad
input in one line."""

import gzip
import json
import math
import os
import struct

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as s

import sparsetrain as st
from sparsetrain.app.config import ConfigError, load_config
from sparsetrain.data.images import DatasetError, read_idx
from sparsetrain.data.text import CharVocab
from sparsetrain.models import build_model

# bounded for the suite; the long run (README, failure behaviour): SPARSETRAIN_PROPERTY_EXAMPLES=2000 pytest tests/test_input_surface.py
EXAMPLES = int(os.environ.get("SPARSETRAIN_PROPERTY_EXAMPLES", "40"))

numbers = s.one_of(
    s.floats(allow_nan=True, allow_infinity=True, width=32),
    s.integers(-3, 3),
    s.sampled_from(["0.9", None, True, [0.5]]),
)
distributions = s.sampled_from(["uniform", "er", "erk", "custom", "zipf", "", 3])
schemes = s.sampled_from(["unstructured", "channel_out", "kernel", "block_2x2", "nm_2:4", "fan_in", "blocky", None])
executions = s.sampled_from(["masked", "csr", "direct", "condensed", "channel", "auto", "fast", None])
dense = s.sampled_from([("first", "last"), ("first",), (), ("*",), ("0.weight", "nope"), "first"])


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.timing
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=s.sampled_from(["static", "set", "rigl", "mest"]),
    sparsity=numbers,
    distribution=distributions,
    scheme=schemes,
    execution=executions,
    dense_layers=dense,
)
def test_a_factory_trains_exactly_or_refuses_in_one_line(
    method, sparsity, distribution, scheme, execution, dense_layers
):
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    kw = dict(
        sparsity=sparsity, distribution=distribution, scheme=scheme, execution=execution, dense_layers=dense_layers
    )
    if method == "mest":
        kw.update(steps_per_epoch=2, epochs=2, every_epochs=1)
    elif method != "static":
        kw.update(total_steps=4, update_every_steps=2)
    try:
        sp = st.METHODS[method](model, opt, **kw)
    except (ValueError, TypeError) as e:
        msg = str(e)
        assert msg and "\n" not in msg, msg
        return
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        x, y = torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert math.isfinite(loss.item())
    params = dict(model.named_parameters())
    for n, m in sp.maskset.masks.items():
        assert torch.count_nonzero(params[n].detach()[~m]) == 0 if n in params else True
    if distribution != "custom" and not (isinstance(scheme, str) and scheme.startswith("nm_")):
        assert abs(sp.sparsity() - float(sparsity)) < 0.1, (sp.sparsity(), sparsity)


def test_idx_files_cut_short_or_damaged_are_refused_in_one_line(tmp_path):
    good = struct.pack(">HBB", 0, 8, 3) + struct.pack(">3I", 2, 2, 2) + bytes(8)
    cases = {
        "short.idx": (good[:3], "shorter than its header"),
        "header.idx": (good[:8], "the file ends before them"),
        "values.idx": (good[:-2], "truncated IDX file (6 of 8 values)"),
        "cut.gz": (gzip.compress(good)[:-6], "damaged gzip file"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")):
            read_idx(tmp_path / name)


def test_a_vocabulary_file_of_another_shape_is_refused(tmp_path):
    for text in ("[1, 2]", '{"chars": ["ab", "c"]}', "not json", '{"chars": ["a", "a"]}'):
        (tmp_path / "vocab.json").write_text(text)
        with pytest.raises(DatasetError, match="is not a vocabulary file"):
            CharVocab.load(tmp_path / "vocab.json")


def test_duplicate_yaml_keys_are_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match="the key 'lr' is given twice"):
        load_config(tmp_path / "c.yaml")


def test_transformer_widths_that_the_heads_do_not_divide_are_refused_with_the_fix():
    with pytest.raises(
        ValueError,
        match=r"model width 0.3 gives 38.4 channels, which 4 heads do not divide; use width "
        r"0.28125 or 0.3125",
    ):
        build_model("gpt", width=0.3)
    with pytest.raises(ValueError, match="which 3 heads do not divide"):
        build_model("vit", width=1.0, heads=3)


def test_a_missing_data_folder_is_not_created(tmp_path):
    from sparsetrain.data.images import load_dataset

    missing = tmp_path / "mnsit"
    with pytest.raises(
        DatasetError, match=r"does not exist; pass an existing file or folder with --data-dir \(or allow"
    ):
        load_dataset("mnist", missing, download=False)
    assert not missing.exists()


def test_sample_refuses_bad_flags_in_one_line(tmp_path, capsys):
    from sparsetrain.app.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(load_config(overrides=["model.name=gpt", "data.dataset=text"]).to_yaml())
    (run / "model.pt").write_bytes(b"")
    (run / "vocab.json").write_text(json.dumps({"chars": ["a", "b"]}))
    for flags, message in (
        (["--temperature", "-1"], "--temperature must be a finite number > 0"),
        (["--temperature", "nan"], "--temperature must be a finite number > 0"),
        (["--chars", "-5"], "--chars must be between 1 and 100000, got -5"),
        (["--chars", "100000000"], "--chars must be between 1 and 100000"),
        (["--prompt", ""], "--prompt must hold at least one character"),
    ):
        assert main(["sample", str(run), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err


def test_flops_with_an_input_the_model_does_not_take_is_one_line(capsys):
    from sparsetrain.app.cli import main

    assert main(["flops", "--model", "resnet20", "--input-size", "1", "8", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not take inputs of shape (1, 8, 8)" in err and "--input-size" in err


def test_a_schedule_that_cannot_fire_warns_with_the_numbers_and_the_fix():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(
        UserWarning,
        match=r"rigl updates its mask every 100 steps until step 37 of 50 \(update_end=0.75\): "
        r"no update will happen and the mask stays static; set update_every_steps below 37",
    ):
        st.rigl(model, opt, sparsity=0.5, total_steps=50)
    model = _net()
    with pytest.warns(
        UserWarning, match=r"mest mutates every 5 epoch\(s\), but training lasts 3: no mutation will happen"
    ):
        st.mest(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.5, steps_per_epoch=4, epochs=3)


def test_a_star_import_shadows_no_builtin():
    import builtins

    namespace: dict = {}
    exec("from sparsetrain import *", namespace)
    assert not set(namespace) & set(dir(builtins)) - {"__builtins__"}


def test_sparsity_counts_the_masks_and_zero_fraction_the_zeros():
    model = _net()
    sp = st.static(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.5)
    with torch.no_grad():
        w = model[2].weight
        kept = sp.maskset.masks["2.weight"]
        w[kept.nonzero()[0].tolist()[0], kept.nonzero()[0].tolist()[1]] = 0.0  # one kept weight happens to be zero
    assert sp.sparsity() == pytest.approx(0.5, abs=1 / 256)
    assert sp.zero_fraction() == pytest.approx(sp.sparsity() + 1 / 256)


# ----------------------------------------------------------------------------------- the newer surfaces
plan_values = s.one_of(s.none(), s.booleans(), s.integers(-2, 2), s.text(max_size=6), s.just("auto"), s.just("direct"))
plan_dicts = s.fixed_dictionaries(
    {},
    optional={
        "requested": s.one_of(plan_values, s.sampled_from(["masked", "condensed", "nope"])),
        "layout": s.one_of(plan_values, s.sampled_from(["nchw", "channels_last", "diagonal"])),
        "channel_both_sides": plan_values,
        "lossless_activations": plan_values,
        "layers": s.one_of(
            plan_values,
            s.dictionaries(
                s.sampled_from(["2.weight", "0.weight", "9.weight"]),
                s.one_of(
                    plan_values, s.fixed_dictionaries({"backend": plan_values}, optional={"compact": plan_values})
                ),
                max_size=3,
            ),
        ),
    },
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plan_dicts, method=s.sampled_from(["static", "rigl"]))
def test_any_plan_or_state_is_run_exactly_or_refused_in_one_line(plan, method, tmp_path_factory):
    """Truncated, foreign or other-model plans, in a file or inside a sparsifier's state: applied as saved, or
    refused with a ValueError or TypeError naming what is wrong, before anything changes."""
    from sparsetrain.execution.plan import ExecutionPlan

    path = tmp_path_factory.mktemp("plan") / "plan.json"
    path.write_text(json.dumps(plan))
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    factory = st.METHODS[method]
    sp = factory(model, opt, sparsity=0.5, total_steps=10, execution="masked")
    state = {**sp.state_dict(), "plan": plan}
    before = {k: v.clone() for k, v in sp.maskset.masks.items()}
    for attempt in (lambda: ExecutionPlan.load(path), lambda: sp.load_state_dict(state)):
        try:
            attempt()
        except (ValueError, TypeError) as e:
            assert str(e) and "\n" not in str(e).strip()
    assert all(torch.equal(before[k], v) for k, v in sp.maskset.masks.items())  # a refusal changed nothing


@pytest.mark.timing
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=s.sampled_from(["dense", "static", "set", "rigl", "swat"]),
    execution=s.sampled_from(["masked", "csr", "direct", "condensed", "auto"]),
    lossless=s.booleans(),
    cut=s.sets(s.sampled_from(["clock", "bumps", "sparsity", "masks", "generator", "updates", "densities"])),
)
def test_lossless_activations_and_cut_states_with_every_method_and_backend(method, execution, lossless, cut):
    """Every method under every backend, with or without lossless activations, trains a step or is refused at
    construction in one line; a state with any keys cut is refused naming them, never a bare KeyError."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kw = {} if method == "dense" else {"sparsity": 0.5, "dense_layers": ()}
    try:
        sp = st.METHODS[method](model, opt, total_steps=10, execution=execution, lossless_activations=lossless, **kw)
    except ValueError as e:
        assert "\n" not in str(e)
        return
    loss = model(torch.randn(2, 3, 8, 8)).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    state = sp.state_dict()
    for key in cut:
        state.pop(key, None)
    needed = sp._state_keys()
    if any(k in cut for k in needed):
        with pytest.raises(ValueError, match=f"this {method} state lacks .* a {method} sparsifier's state holds"):
            sp.load_state_dict(state)
    else:
        sp.load_state_dict(state)


def test_a_cut_state_names_what_is_missing_and_what_a_state_holds():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.rigl(model, opt, sparsity=0.5, total_steps=10)
    with pytest.raises(
        ValueError,
        match=r"^this rigl state lacks \['clock', 'bumps', 'sparsity', 'masks', 'generator', 'updates'\] \(cut short "
        r"or not from sp.state_dict\(\)\); a rigl sparsifier's state holds \['method', 'clock', 'bumps', 'sparsity', "
        r"'masks', 'generator', 'updates'\]$",
    ):
        sp.load_state_dict({"method": "rigl"})
