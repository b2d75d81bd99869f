"""The README's guide holds: its quickstart config runs as written (at a tiny size), help answers without importing
torch, and the documentation site's configuration reference is generated from the code."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("sub", [[], ["train"], ["eval"], ["report"], ["flops"], ["sample"], ["bench"]])
def test_help_imports_no_torch(sub):
    code = (
        "import sys\nfrom sparsetrain.app.cli import main\ntry:\n    main([*sys.argv[1:], '--help'])\n"
        "except SystemExit:\n    pass\nprint('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code, *sub], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: sparsetrain" in out.stdout and out.stdout.strip().splitlines()[-1] == "False"


def test_the_quickstart_config_runs_and_reports(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40)
    run = tmp_path / "quick"
    cmd = [sys.executable, "-m", "sparsetrain.app.cli"]
    tiny = [
        "model.width=0.25",
        "model.depth=1",
        "model.heads=2",
        "data.context=16",
        "data.stride=15",
        "optim.batch_size=8",
        "sparsity.update_every_steps=5",
        "run.threads=1",
        "run.progress=false",
    ]
    train = subprocess.run(
        [
            *cmd,
            "train",
            "--config",
            str(REPO / "configs" / "quick.yaml"),
            "--data-dir",
            str(text),
            "--out",
            str(run),
            *tiny,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert train.returncode == 0, train.stderr
    summary = json.loads(train.stdout)
    assert summary["method"] == "rigl" and summary["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert summary["mask_updates"] > 0 and set(summary["backends"].values()) <= {"masked", "csr", "condensed"}
    report = subprocess.run([*cmd, "report", str(run), "--layers"], capture_output=True, text=True, timeout=120)
    assert report.returncode == 0 and "blocks.0.qkv.weight" in report.stdout and "dense" in report.stdout


def test_the_configuration_reference_is_generated_from_the_model():
    pytest.importorskip("mkdocs")
    sys.path.insert(0, str(REPO / "docs"))
    try:
        import hooks
    finally:
        sys.path.remove(str(REPO / "docs"))
    from sparsetrain.app.config import Config

    reference = hooks._config_reference()
    for section, model in Config.model_fields.items():
        for key in model.annotation.model_fields:
            assert f"`{section}.{key}`" in reference or f"`{section}.{key}." in reference, f"{section}.{key}"


def test_the_readme_cifar_command_runs_as_written_at_a_tiny_size(tmp_path):
    from conftest import make_image_tar

    data = make_image_tar(tmp_path / "cifar.tar", 64, 32, size=32, channels=3)
    run = tmp_path / "r20-static90"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparsetrain.app.cli",
            "train",
            "--config",
            str(REPO / "configs" / "resnet20_cifar10.yaml"),
            "--data-dir",
            str(data),
            "sparsity.method=static",
            "sparsity.sparsity=0.9",
            "sparsity.backend=auto",
            f"run.out_dir={run}",
            "optim.epochs=1",
            "optim.batch_size=32",
            "run.threads=1",
            "run.progress=false",
            f"data.cache_dir={tmp_path / 'c'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["method"] == "static" and summary["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert summary["backends"] and set(summary["backends"].values()) <= {"masked", "direct", "csr"}


def test_ci_installs_and_tests_exactly_as_the_readme_and_the_getting_started_page_say():
    """The install lines (the CPU index named, on every platform) are the same text in the README, the
    getting-started page and ``.ci/run``, and the three test steps in the README and ``.ci/run``, so a fix to one
    cannot leave the others behind."""
    readme = (REPO / "README.md").read_text()
    start = (REPO / "docs" / "getting-started.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    torch_line = "python3 -m pip install torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu"
    project_line = 'python3 -m pip install -e ".[test,docs]"'
    for text in (readme, start):
        assert torch_line in text and project_line in text
    assert torch_line.replace("install", "install -q", 1) in ci and project_line.replace("install", "install -q") in ci
    steps = ('python3 -m pytest -q -m "not ranks"', "SPARSETRAIN_TEST_TIMINGS=reversed python3 -m pytest -q -m timing")
    for step in (*steps, "python3 -m pytest -q -m ranks"):
        assert step.strip() in readme and step.strip() in ci


def test_the_cli_sleeps_its_openmp_threads_only_when_others_keep_the_cpu_busy(monkeypatch):
    """Busy (half a core or more taken by others): OMP_WAIT_POLICY=PASSIVE; idle: nothing set (spinning is the
    faster there); a policy the user set is kept. (In a fresh process: torch is not loaded yet.)"""
    from sparsetrain.app import cli

    monkeypatch.delitem(sys.modules, "torch", raising=False)  # as in a fresh process (restored after the test)
    for busy, user, expected in [(1.0, {}, "PASSIVE"), (0.1, {}, None), (1.0, {"OMP_WAIT_POLICY": "ACTIVE"}, None)]:
        monkeypatch.setattr(cli, "others_busy_cores", lambda busy=busy: busy)
        env = dict(user)
        assert cli.choose_openmp_wait_policy(env) == expected
        assert env.get("OMP_WAIT_POLICY") == (expected or user.get("OMP_WAIT_POLICY"))
    assert 0 <= cli.others_busy_cores(0.05) <= 64  # /proc/stat read: a core count
    # where the others take half the cores or more, torch starts with the cores left; a count the user set is kept
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
    for busy, user, threads in [(1.0, {}, "1"), (0.6, {}, "1"), (1.0, {"OMP_NUM_THREADS": "2"}, "2"), (0.4, {}, None)]:
        monkeypatch.setattr(cli, "others_busy_cores", lambda busy=busy: busy)
        env = dict(user)
        cli.choose_openmp_wait_policy(env)
        assert env.get("OMP_NUM_THREADS") == threads
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(cli, "others_busy_cores", lambda: 1.0)
    env = {}
    cli.choose_openmp_wait_policy(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}  # 15 cores left of 16: torch's own default stands
