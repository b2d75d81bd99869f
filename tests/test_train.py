"""The engine end to end: training, exact resume after SIGKILL, data parallelism, CLI."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_datasets

from sparsetrain.app import Trainer, load_checkpoint
from sparsetrain.app.config import load_config

REPO = Path(__file__).resolve().parent.parent
BASE = [
    "model.name=mlp",
    "data.dataset=mnist",
    "optim.batch_size=32",
    "optim.lr=0.05",
    "run.threads=1",
    "run.progress=false",
    "model.channels_last=false",
]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_training_learns_keeps_masks_and_logs(tmp_path):
    cfg = load_config(
        overrides=[
            *BASE,
            "optim.epochs=6",
            "optim.lr=0.1",
            f"run.out_dir={tmp_path}",
            "sparsity.method=static",
            "sparsity.sparsity=0.7",
            "optim.label_smoothing=0.1",
            "data.val_fraction=0.25",
            "sparsity.dense_layers=[]",
        ]
    )
    trainer = Trainer(cfg, datasets=tiny_datasets())
    summary = trainer.fit()
    assert summary["test_acc"] > 50  # a bright square names the class: learnable in 6 epochs
    assert summary["sparsity"] == pytest.approx(0.7, abs=2e-3)
    for name, mask in trainer.method.maskset.masks.items():
        assert torch.count_nonzero(trainer.method.maskset.params[name][~mask]) == 0
    assert summary["train_flops_rel"] == pytest.approx(0.3, abs=0.01) and summary["infer_flops_rel"] == pytest.approx(
        0.3, abs=0.01
    )
    records = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5, 6] and "val_acc" in records[0]
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "model.pt").exists()
    assert load_config(tmp_path / "config.yaml") == cfg


KILLING_DRIVER = textwrap.dedent("""
    # Runs `sparsetrain train`, and SIGKILLs itself halfway through writing checkpoint number KILL_AT.
    import os, signal, sys
    from sparsetrain.app import persistence as trainer  # the module that writes checkpoints
    from sparsetrain.app.cli import main
    kill_at, count, real_save = int(os.environ["KILL_AT"]), [0], trainer.save_checkpoint
    def save(state, path):
        count[0] += 1
        if count[0] == kill_at:
            with open(str(path) + ".partial.tmp", "wb") as f:
                f.write(b"PK half a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(state, path)
    trainer.save_checkpoint = save
    sys.exit(main(sys.argv[1:]))
""")


def _train_cli(args, env_extra=None, driver=None):
    env = {**os.environ, **(env_extra or {})}
    cmd = [sys.executable, str(driver)] if driver else [sys.executable, "-m", "sparsetrain.app.cli"]
    return subprocess.run(cmd + ["train", *args], env=env, capture_output=True, text=True, timeout=300)


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_mnist_tar):
    args = [
        *BASE,
        f"data.data_dir={tiny_mnist_tar}",
        "optim.epochs=3",
        "run.checkpoint_every_steps=5",
        "sparsity.method=static",
        "sparsity.sparsity=0.8",
    ]
    full = _train_cli([*args, f"run.out_dir={tmp_path / 'full'}"])
    assert full.returncode == 0, full.stderr
    driver = tmp_path / "driver.py"
    driver.write_text(KILLING_DRIVER)
    run = tmp_path / "killed"
    # 16 steps per epoch: saves at steps 5, 10, 15, end of epoch 1, 21, 26 -> the 6th save is mid-epoch 2
    killed = _train_cli([*args, f"run.out_dir={run}"], {"KILL_AT": "6"}, driver)
    assert killed.returncode == -9
    assert not (run / "final.json").exists()
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["progress"]["epoch"] == 1 and 0 < state["loader"]["position"] < 16
    resumed = _train_cli([*args, f"run.out_dir={run}"])
    assert resumed.returncode == 0, resumed.stderr
    a, b = _weights(tmp_path / "full" / "model.pt"), _weights(run / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fa = json.loads((tmp_path / "full" / "final.json").read_text())
    fb = json.loads((run / "final.json").read_text())
    assert fa["test_acc"] == fb["test_acc"] and fa["train_flops_rel"] == pytest.approx(fb["train_flops_rel"])
    epochs = [json.loads(ln)["epoch"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


DDP_DRIVER = textwrap.dedent("""
    # Trains under torchrun and saves each rank's final weights and masks as rank<R>.pt.
    import sys, torch, torch.distributed as dist
    from sparsetrain.app.config import load_config
    from sparsetrain.app import Trainer
    cfg = load_config(overrides=sys.argv[1:])
    trainer = Trainer(cfg)
    trainer.fit()
    torch.save({"model": trainer.model.state_dict(), "masks": trainer.method.maskset.state_dict()["masks"]},
               f"{cfg.run.out_dir}/rank{dist.get_rank()}.pt")
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path, driver_text: str, args: list[str], out: Path) -> list[dict]:
    """Run ``driver_text`` on 2 CPU processes under torchrun; return what each rank saved as rank<R>.pt."""
    driver = tmp_path / "driver_ddp.py"
    driver.write_text(driver_text)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={_free_port()}",
            str(driver),
            *args,
            f"run.out_dir={out}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.ranks
def test_two_process_ddp_matches_single_process(tmp_path, tiny_mnist_tar):
    args = [
        *BASE,
        f"data.data_dir={tiny_mnist_tar}",
        "optim.epochs=2",
        "sparsity.method=static",
        "sparsity.sparsity=0.5",
    ]
    r0, r1 = _torchrun(tmp_path, DDP_DRIVER, args, tmp_path / "ddp")
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
    for k in r0["masks"]:
        assert torch.equal(r0["masks"][k], r1["masks"][k]), k
    single = _train_cli([*args, f"run.out_dir={tmp_path / 'single'}"])
    assert single.returncode == 0, single.stderr
    ref = _weights(tmp_path / "single" / "model.pt")
    for k in ref:
        torch.testing.assert_close(r0["model"][k], ref[k], rtol=1e-4, atol=1e-5)


def test_cli_help_eval_report_and_flops(tmp_path, tiny_mnist_tar):
    for sub in ("train", "eval", "report", "flops"):
        out = subprocess.run(
            [sys.executable, "-m", "sparsetrain.app.cli", sub, "--help"], capture_output=True, text=True
        )
        assert out.returncode == 0 and "usage: sparsetrain " + sub in out.stdout
    run = tmp_path / "run"
    assert (
        _train_cli([*BASE, f"data.data_dir={tiny_mnist_tar}", "optim.epochs=1", f"run.out_dir={run}"]).returncode == 0
    )
    ev = subprocess.run([sys.executable, "-m", "sparsetrain.app.cli", "eval", str(run)], capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr
    final = json.loads((run / "final.json").read_text())
    assert json.loads(ev.stdout)["test_acc"] == pytest.approx(final["test_acc"])
    rep = subprocess.run(
        [sys.executable, "-m", "sparsetrain.app.cli", "report", str(run), "--layers", "--png", str(tmp_path / "c.png")],
        capture_output=True,
        text=True,
    )
    assert rep.returncode == 0 and "run" in rep.stdout and (tmp_path / "c.png").stat().st_size > 1000
    fl = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparsetrain.app.cli",
            "flops",
            "--model",
            "resnet20",
            "--dataset",
            "cifar10",
            "--method",
            "static",
            "--sparsity",
            "0.9",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    data = json.loads(fl.stdout)
    assert data["forward_macs_dense"] == pytest.approx(40.8e6, rel=0.01)
    assert 0.1 < data["forward_flops"] / data["forward_flops_dense"] < 0.12
    bad = subprocess.run(
        [sys.executable, "-m", "sparsetrain.app.cli", "train", "optim.epochs=0"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "optim.epochs" in bad.stderr and "(got 0)" in bad.stderr


DDP_DYNAMIC_DRIVER = textwrap.dedent("""
    # MEST with soft bound and data efficiency under torchrun; saves each rank's masks and removed examples.
    import sys, torch, torch.distributed as dist
    from sparsetrain.app.config import load_config
    from sparsetrain.app import Trainer
    cfg = load_config(overrides=sys.argv[1:])
    trainer = Trainer(cfg)
    trainer.fit()
    torch.save({"model": trainer.model.state_dict(), "masks": trainer.method.maskset.state_dict()["masks"],
                "removed": trainer.forgetting.removed, "forgets": trainer.forgetting.forgets},
               f"{cfg.run.out_dir}/rank{dist.get_rank()}.pt")
""")


@pytest.mark.ranks
def test_ddp_ranks_agree_on_dynamic_masks_and_forgetting_statistics(tmp_path, tiny_mnist_tar):
    args = [
        *BASE,
        f"data.data_dir={tiny_mnist_tar}",
        "optim.epochs=3",
        "sparsity.method=mest",
        "sparsity.sparsity=0.8",
        "sparsity.mest.every_epochs=1",
        "sparsity.mest.soft_bound=true",
        "sparsity.data_efficiency.enabled=true",
        "sparsity.data_efficiency.remove_epoch=2",
        "sparsity.dense_layers=[]",
    ]
    r0, r1 = _torchrun(tmp_path, DDP_DYNAMIC_DRIVER, args, tmp_path / "ddp")
    assert r0["removed"].numel() == round(0.2 * 512) and torch.equal(r0["removed"], r1["removed"])
    assert torch.equal(r0["forgets"], r1["forgets"])
    for k in r0["masks"]:
        assert torch.equal(r0["masks"][k], r1["masks"][k]), k
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k


@pytest.mark.ranks
def test_ddp_ranks_agree_under_rigl_with_compact_state(tmp_path, tiny_mnist_tar):
    # each rank captures the full gradient of its own batch on RigL's update steps: they are averaged like .grad
    args = [
        *BASE,
        f"data.data_dir={tiny_mnist_tar}",
        "optim.epochs=1",
        "sparsity.method=rigl",
        "sparsity.sparsity=0.8",
        "sparsity.update_every_steps=2",
        "sparsity.update_end=1.0",
        "sparsity.dense_layers=[]",
        "sparsity.backend=direct",
        "sparsity.compact_state=true",
        "model.channels_last=false",
    ]
    r0, r1 = _torchrun(tmp_path, DDP_DRIVER, args, tmp_path / "ddp")
    for k in r0["masks"]:
        assert torch.equal(r0["masks"][k], r1["masks"][k]), k
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
