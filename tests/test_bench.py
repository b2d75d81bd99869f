"""`sparsetrain bench`: A/B timing against dense, peak memory per configuration, JSON and plot."""

import json

import pytest
import torch

from sparsetrain.app.bench import build, make_step, model_input_shape, peak_memory, run_bench
from sparsetrain.app.cli import main
from sparsetrain.execution import native


def test_bench_reports_every_configuration_and_sparsity(tmp_path):
    configs = ["masked", "direct"] if native.available() else ["masked"]
    results = run_bench("small_cnn", configs, [0.5, 0.9], batch=4, pairs=2, warmup=1, memory=False, progress=False)
    assert [(r.config, r.sparsity) for r in results] == [(c, s) for c in configs for s in (0.5, 0.9)]
    for r in results:
        assert r.step_ratio > 0 and r.step_s_dense > 0 and r.pairs == 2 and r.mem_ratio is None
    if native.available():
        assert set(results[-1].backends.values()) == {"direct"}


def test_peak_memory_runs_in_a_fresh_process_and_grows_with_the_batch():
    small = peak_memory("small_cnn", "dense", 0.0, 2, steps=1)
    large = peak_memory("small_cnn", "dense", 0.0, 2048, steps=1)
    assert 0 < small["base"] < small["peak"] < large["peak"]


def test_cli_bench_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert (
        main(
            [
                "bench",
                "--model",
                "small_cnn",
                "--configs",
                "masked",
                "--sparsity",
                "0.8",
                "--batch",
                "4",
                "--pairs",
                "2",
                "--warmup",
                "1",
                "--json",
                str(out),
                "--png",
                str(png),
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())
    assert rows[0]["config"] == "masked" and rows[0]["sparsity"] == 0.8
    assert 0 < rows[0]["mem_ratio"] < 2 and set(rows[0]["peak_bytes"]) == {"dense", "masked"}
    assert png.stat().st_size > 0
    assert "masked" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--configs", "sparse"], "unknown configuration 'sparse'"),
        (["--sparsity", "1.5"], "sparsity must be in (0, 1), got 1.5"),
    ],
)
def test_cli_bench_refuses_bad_input(args, message, capsys):
    assert main(["bench", "--model", "small_cnn", "--no-memory", *args]) == 2
    assert message in capsys.readouterr().err


def test_build_refuses_unknown_configuration():
    with pytest.raises(ValueError, match="choose dense or one of"):
        build("small_cnn", "fast")


@pytest.mark.parametrize("bf16", [False, True])
def test_auto_is_planned_under_the_autocast_the_steps_run_in(bf16, monkeypatch):
    """``auto`` times its choices under the steps' own autocast (on CPUs with AMX tiles a dense bfloat16 product can
    beat a kernel that wins in float32), as a training loop's first forward under autocast would."""
    model, opt, method = build("small_cnn", "auto", 0.9)
    seen = []
    choose = method.choose_execution

    def recording(*inputs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return choose(*inputs)

    monkeypatch.setattr(method, "choose_execution", recording)
    step = make_step(model, opt, method, 4, "auto", model_input_shape("small_cnn"), bf16=bf16)
    step()
    assert seen == [bf16] and method.plan is not None
