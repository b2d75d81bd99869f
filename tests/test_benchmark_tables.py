"""The seed handling of the benchmark tables: means over seeds, gaps only over seeds both runs have."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from common import acc_cell, by_run, mean_acc, paired_gap  # noqa: E402


def _rec(run, seed, acc, method="m"):
    return {"run": run, "method": method, "seed": seed, "test_acc": acc}


def test_runs_group_by_name_and_fall_back_to_the_method():
    runs = by_run([_rec(None, 0, 80.0, "dense"), _rec("a", 0, 70.0), _rec("a", 1, 72.0), _rec(None, 1, 82.0, "dense")])
    assert sorted(runs) == ["a", "dense"]
    assert mean_acc(runs["a"]) == 71.0 and mean_acc(runs["dense"]) == 81.0


def test_the_gap_pairs_seeds_and_ignores_unpaired_ones():
    dense = [_rec("dense", 0, 85.0), _rec("dense", 1, 84.0)]
    one_seed = [_rec("a", 0, 83.0)]
    assert paired_gap(one_seed, dense) == (-2.0, 1)  # not against the two-seed mean 84.5
    two_seeds = [_rec("a", 1, 83.5), _rec("a", 0, 83.0)]
    assert paired_gap(two_seeds, dense) == (-1.25, 2)
    assert paired_gap([_rec("a", 5, 83.0)], dense) is None


def test_a_cell_lists_every_seed_when_there_are_several():
    assert acc_cell([_rec("a", 0, 83.0)]) == "83.00"
    assert acc_cell([_rec("a", 1, 84.0), _rec("a", 0, 83.0)]) == "83.50 (s0 83.00, s1 84.00)"


def test_recipe_label_names_tost_only_for_its_default_components():
    from protocol_a import RUNS, _recipe_label

    assert _recipe_label(None) is None
    assert _recipe_label("ghost-soft+label-smoothing") == "tost"
    assert _recipe_label("ghost-soft+rescale-init+label-smoothing") == "tost+rescale-init"
    assert _recipe_label("ghost-soft+ghost-skip+rescale-init+label-smoothing") == "tost+ghost-skip+rescale-init"
    assert _recipe_label("ghost-skip") == "ghost-skip"
    # the renamed runs reproduce what ran before the default changed: ghost skips switched on explicitly
    assert "recipe.ghost_skip=true" in RUNS["snip98-tost-skips"][1]


def test_a_longer_budget_writes_its_own_curve_beside_the_protocols():
    from protocol_a import curve_name

    at15 = curve_name("rigl", "resnet20", 0, 15)
    assert at15 == "protocol_a-rigl-resnet20-s0.png"  # the name the 15-epoch curves were committed under
    assert curve_name("rigl", "resnet20", 0, 60) == "protocol_a-rigl-resnet20-e60-s0.png" != at15
    assert curve_name("rigl", "resnet20", 1, 60, "-val10") == "protocol_a-rigl-resnet20-e60-s1-val10.png"


def test_a_validation_fraction_outside_0_1_is_refused(capsys):
    from protocol_a import main

    with pytest.raises(SystemExit):
        main(["--data", "x", "--val-fraction", "1.5", "--runs", "dense"])
    assert "--val-fraction must be in [0, 1), got 1.5" in capsys.readouterr().err


def test_a_validation_run_counts_as_done_only_at_its_own_fraction(monkeypatch):
    import protocol_a

    recorded = [{"run": "dense", "seed": 0, "epochs": 15, "model": "resnet20", "val_fraction": 0.2}]
    monkeypatch.setattr(protocol_a, "read_records", lambda path: recorded)
    started = []

    class NoTraining:
        def __init__(self, cfg):
            started.append(cfg.data.val_fraction)
            raise RuntimeError("stop before training")

    monkeypatch.setattr(protocol_a, "Trainer", NoTraining)
    protocol_a.main(["--data", "x", "--val-fraction", "0.2", "--runs", "dense"])
    assert started == []
    with pytest.raises(RuntimeError, match="stop before training"):
        protocol_a.main(["--data", "x", "--val-fraction", "0.1", "--runs", "dense"])
    assert started == [0.1]


def test_the_budget_sweep_starts_only_unrecorded_runs_at_one_thread_each(monkeypatch, tmp_path):
    import budget_sweep
    from protocol_a import RUNS

    assert set(budget_sweep.RUNS) <= set(RUNS) and set(budget_sweep.RUNS.values()) <= set(RUNS)
    recorded = [{"run": "dense", "seed": 0, "epochs": 60}, {"run": "rigl", "seed": 0, "epochs": 15}]
    monkeypatch.setattr(budget_sweep, "read_records", lambda path: recorded)
    monkeypatch.setattr(budget_sweep, "ROOT", tmp_path)
    (tmp_path / "benchmarks" / "runs").mkdir(parents=True)
    started = []

    class Done:
        def __init__(self, cmd, **kw):
            started.append(cmd)

        def wait(self):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(budget_sweep.subprocess, "Popen", Done)
    budget_sweep.sweep(type("Args", (), {"data": "d", "epochs": 60, "parallel": 2, "device": "cpu"})())
    names = [cmd[cmd.index("--runs") + 1] for cmd in started]
    assert names == [n for n in budget_sweep.RUNS if n != "dense"]  # dense is recorded at 60 epochs; rigl only at 15
    assert all(
        cmd[cmd.index("--threads") + 1] == "1" and cmd[cmd.index("--results") + 1] == budget_sweep.BUDGET_FILE
        for cmd in started
    )


def test_the_budget_table_pairs_each_budget_with_dense_and_leaves_missing_runs_blank(monkeypatch, tmp_path):
    import budget_sweep

    files = {
        "protocol_a.jsonl": [
            _rec(None, 0, 85.0, "dense"),
            _rec("rigl", 0, 80.0),
            _rec("rigl", 1, 99.0),
            _rec("swat-u80", 0, 83.0),
        ],
        budget_sweep.BUDGET_FILE: [_rec("dense", 0, 88.0), _rec("rigl", 0, 84.5)],
    }
    for recs in files.values():
        for r in recs:
            r.setdefault("epochs", 60 if recs is files[budget_sweep.BUDGET_FILE] else 15)
    monkeypatch.setattr(budget_sweep, "read_records", lambda path: files[path])
    monkeypatch.setattr(budget_sweep, "RESULTS", tmp_path)
    accs = budget_sweep.accuracies()
    assert accs == {
        ("dense", 15): 85.0,
        ("rigl", 15): 80.0,
        ("swat-u80", 15): 83.0,
        ("dense", 60): 88.0,
        ("rigl", 60): 84.5,
    }  # seed 0 only; the oldest dense record names its method only
    rows = {line.split(" | ")[0].strip("| "): line for line in budget_sweep.table(accs).read_text().splitlines()}
    assert rows["rigl"] == "| rigl | 80.00 | -5.00 | 84.50 | -3.50 |"
    assert rows["swat-u80"] == "| swat-u80 | 83.00 | -2.00 |  |  |"


def test_protocol_d_variants_need_a_label(capsys):
    from protocol_d import main

    with pytest.raises(SystemExit):
        main(["--data", "x", "--runs", "rigl", "--extra", "sparsity.update_fraction=0.5"])
    assert "--extra needs --label" in capsys.readouterr().err


def test_the_readme_figures_are_the_generated_table():
    import figures

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert figures.readme_block() in readme, "run: python benchmarks/figures.py --readme"


def test_the_figures_table_takes_the_latest_valid_record_per_cpu_class():
    import figures
    from real_speed_sweep import ROWS, command_of

    cmd = command_of(ROWS[0])
    base = {"command": cmd, "mem_ratio": 0.9, "commit": "c1"}
    records = [
        {**base, "cpu": "AMD EPYC", "step_ratio": 0.5, "step_ratio_mean": 0.5},
        {**base, "cpu": "AMD EPYC", "step_ratio": 0.4, "step_ratio_mean": 0.6, "commit": "disturbed"},
        {**base, "cpu": "Intel(R) Xeon(R) Processor", "step_ratio": 0.7, "step_ratio_mean": 0.71, "commit": "c2"},
    ]
    row = figures.table(records).splitlines()[2]
    assert row.startswith(f"| {figures.label(ROWS[0])} | 0.50 (`c1`) | 0.90 | 0.70 (`c2`) | 0.90 |")
