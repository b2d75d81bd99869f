"""Runs that stop and resume: non-finite losses keep the last good checkpoint, changed configs on resume,
cut metrics, kills at random points, ranks that agree, time-based checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from test_reliability import _trainer  # the tiny run both files train

from sparsetrain.app import Trainer, TrainingError, load_checkpoint
from sparsetrain.app.cli import main
from sparsetrain.app.config import load_config

TINY = [
    "model.name=small_cnn",
    "data.dataset=mnist",
    "optim.batch_size=32",
    "optim.epochs=2",
    "run.progress=false",
    "run.threads=1",
    "model.channels_last=false",
]


def test_a_nonfinite_loss_keeps_the_last_good_checkpoint_and_writes_strict_json(tmp_path):
    good = _trainer(tmp_path, ["optim.epochs=1"])
    good.fit()
    before = load_checkpoint(tmp_path / "checkpoint.pt")
    bad = _trainer(tmp_path, ["optim.epochs=2", "optim.lr=1e30", "run.resume_with_changes=true"])
    with pytest.raises(TrainingError):
        bad.fit()
    after = load_checkpoint(tmp_path / "checkpoint.pt")
    assert after["progress"]["step"] == before["progress"]["step"]
    assert all(torch.equal(v, after["model"][k]) for k, v in before["model"].items())
    json.loads((tmp_path / "final.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in final.json"))
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))


def test_resume_with_changes_allows_the_schedule_and_records_it(tmp_path):
    _trainer(tmp_path, ["optim.epochs=1"]).fit()
    summary = _trainer(tmp_path, ["optim.epochs=2", "run.resume_with_changes=true"]).fit()
    assert summary["steps"] == 16 and "optim.epochs: 1 -> 2" in summary["resumed_with_changes"][0]["changes"]
    assert load_config(tmp_path / "config.yaml").optim.epochs == 2


def test_running_a_finished_run_again_says_so_and_changes_nothing(tmp_path, capsys):
    """The same command again on a finished run: one line naming the run, that nothing trained and how to train on
    or start over, then the same summary; no weight changes."""
    first = _trainer(tmp_path, ["optim.epochs=1"]).fit()
    weights = load_checkpoint(tmp_path / "checkpoint.pt")["model"]
    capsys.readouterr()
    again = _trainer(tmp_path, ["optim.epochs=1"]).fit()
    assert capsys.readouterr().err.splitlines() == [
        f"{tmp_path}: this run already finished (1 of 1 epochs); nothing trained, its summary again. To train on: "
        "--resume-with-changes optim.epochs=N; to start over: another run.out_dir"
    ]
    assert again["steps"] == first["steps"] and again["test_acc"] == first["test_acc"]
    after = load_checkpoint(tmp_path / "checkpoint.pt")["model"]
    assert all(torch.equal(v, after[k]) for k, v in weights.items())


def test_a_cut_last_metrics_line_neither_blocks_resume_nor_report(tmp_path, capsys):
    t = _trainer(tmp_path, ["optim.epochs=1"])
    t.fit()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_lo')  # a kill in the middle of a write
    summary = _trainer(tmp_path, ["optim.epochs=2", "run.resume_with_changes=true"]).fit()
    assert summary["steps"] == 16
    assert [json.loads(ln)["epoch"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert main(["report", str(tmp_path)]) == 0


# --------------------------------------------------------------------------- kills and ranks
def _cli(args, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "sparsetrain.app.cli", "train", *args],
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.ranks
@pytest.mark.slow
def test_killed_at_random_points_then_finished_equals_an_uninterrupted_run(tmp_path, tiny_mnist_tar):
    args = [
        "--data-dir",
        str(tiny_mnist_tar),
        "model.name=small_cnn",
        "data.dataset=mnist",
        "optim.epochs=4",
        "optim.batch_size=32",
        "run.progress=false",
        "run.threads=1",
        "model.channels_last=false",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    start = time.perf_counter()
    assert _cli([*args, f"run.out_dir={tmp_path / 'whole'}"]).wait(timeout=300) == 0
    span = time.perf_counter() - start  # kill points spread over a run's whole length, start-up included
    rng = np.random.default_rng(0)
    cut = tmp_path / "cut"
    kills = 0
    # the first kill waits for the first checkpoint, so at least one lands mid-run whatever the machine's speed;
    # the others fall at random points of a run's length (a run that ended first is simply not killed)
    proc = _cli([*args, f"run.out_dir={cut}"])
    while not (cut / "checkpoint.pt").exists() and proc.poll() is None:
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        kills += 1
    proc.wait(timeout=60)
    for _ in range(4):  # default settings: checkpoints at epoch ends (and every 300 s)
        proc = _cli([*args, f"run.out_dir={cut}"])
        time.sleep(float(rng.uniform(0.3, 0.95)) * span)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
    assert kills >= 1, "no run was killed: the comparison below would not test a resume"
    assert _cli([*args, f"run.out_dir={cut}"]).wait(timeout=300) == 0
    whole, resumed = (load_checkpoint(tmp_path / d / "model.pt")["model"] for d in ("whole", "cut"))
    assert all(torch.equal(v, resumed[k]) for k, v in whole.items())

    def records(d):  # wall time differs between the runs; everything else must not
        return [
            {k: v for k, v in json.loads(ln).items() if k != "wall_s"}
            for ln in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
        ]

    assert records("whole") == records("cut")


DRIVER = """
import json, sys, torch.distributed as dist
from sparsetrain.app.config import load_config
from sparsetrain.app import Trainer
cfg = load_config(overrides=sys.argv[1:])
trainer = Trainer(cfg)
trainer.fit()
json.dump({n: m.backend for n, m in trainer.method.execution_layers.items()}, open(f"{cfg.run.out_dir}/choice{dist.get_rank()}.json", "w"))
"""


@pytest.mark.ranks
@pytest.mark.slow
def test_two_ranks_agree_on_the_auto_backend_and_a_resume_keeps_it(tmp_path, tiny_mnist_tar, monkeypatch):
    from test_train import _free_port

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "run"

    def launch(extra, env=None):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node=2",
                f"--master_port={_free_port()}",
                str(driver),
                f"data.data_dir={tiny_mnist_tar}",
                "model.name=small_cnn",
                "data.dataset=mnist",
                "optim.batch_size=32",
                "run.progress=false",
                "model.channels_last=false",
                "sparsity.method=static",
                "sparsity.sparsity=0.9",
                "sparsity.backend=auto",
                "sparsity.dense_layers=[]",
                f"run.out_dir={out}",
                f"data.cache_dir={tmp_path / 'c'}",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads((out / f"choice{r}.json").read_text()) for r in (0, 1)]

    first = launch(["optim.epochs=1"])
    assert (
        first[0] == first[1]
        and set(first[0].values()) <= {"masked", "direct", "csr", "condensed"}
        and "auto" not in first[0].values()
    )
    again = launch(["optim.epochs=2", "run.resume_with_changes=true"])
    assert again[0] == again[1] == first[0]


def test_time_based_checkpoints_resume_mid_epoch_with_exact_epoch_metrics(tmp_path):
    from conftest import full_and_resumed

    def make(out):
        return _trainer(out, ["optim.epochs=2", "run.checkpoint_every_seconds=1e-9"])  # a save after every step

    full, resumed = full_and_resumed(make, tmp_path, 11)  # killed mid-epoch 2 (8 steps an epoch)
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in full.model.state_dict().items())

    def records(d):
        return [
            {k: v for k, v in json.loads(ln).items() if k != "wall_s"}
            for ln in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
        ]

    assert records("full") == records("cut")  # the epoch's loss and accuracy span the resume


def test_evaluating_an_unfinished_swat_run_says_so(tmp_path, tiny_mnist_tar, capsys):
    cfg = load_config(
        overrides=[
            *TINY,
            "optim.epochs=2",
            f"run.out_dir={tmp_path}",
            f"data.data_dir={tiny_mnist_tar}",
            "sparsity.method=swat",
            "sparsity.sparsity=0.8",
            f"data.cache_dir={tmp_path / 'c'}",
        ]
    )
    trainer = Trainer(cfg)
    trainer.out.prepare()
    trainer.out.start(cfg)
    trainer.end_epoch(trainer.train_epoch())  # one epoch of two: a checkpoint, no model.pt yet
    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt: the run is unfinished" in err and "Traceback" not in err


def test_a_key_added_by_a_later_version_at_its_default_is_no_change_on_resume():
    from sparsetrain.app.config import Config
    from sparsetrain.app.resume import config_changes

    now = Config().model_dump(mode="json")
    saved = Config().model_dump(mode="json")
    del saved["run"]["parallel"], saved["sparsity"]["channel_both_sides"]  # a checkpoint from before these keys
    assert config_changes(saved, now) == {}
    now["run"]["parallel"] = "fsdp"  # set to something else now: a change, which the resume check refuses
    assert config_changes(saved, now) == {"run.parallel": (None, "fsdp")}
