"""TensorBoard: a run with ``run.tensorboard=true`` writes its figures as scalars, and any loop can write the
sparsifier's own (``sp.log_to(writer)``); both read back with TensorBoard's own event reader."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsetrain as st

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402


def _scalars(folder):
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_a_cli_run_writes_its_figures_to_tensorboard(tmp_path, capsys):
    from conftest import make_image_tar

    from sparsetrain.app.cli import main

    data = make_image_tar(tmp_path / "mnist.tar", 128, 32)
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "model.name=small_cnn",
                "data.dataset=mnist",
                "optim.batch_size=32",
                "optim.epochs=2",
                "run.progress=false",
                "run.threads=1",
                "model.channels_last=false",
                "sparsity.method=rigl",
                "sparsity.sparsity=0.8",
                "sparsity.update_every_steps=2",
                f"data.data_dir={data}",
                f"data.cache_dir={tmp_path / 'c'}",
                f"run.out_dir={run}",
                "run.tensorboard=true",
            ]
        )
        == 0
    )
    summary = json.loads((run / "final.json").read_text())
    scalars = _scalars(run / "tensorboard")
    assert [s for s, _ in scalars["train/train_loss"]] == [4, 8]  # one point per epoch, at its last step
    assert {"train/test_acc", "train/lr", "train/train_flops_rel", "train/step_s", "sparsity/overall"} <= set(scalars)
    assert scalars["train/test_acc"][-1][1] == pytest.approx(summary["test_acc"])
    assert scalars["sparsity/overall"][-1][1] == pytest.approx(summary["sparsity"], abs=1e-6)
    assert any(tag.startswith("sparsity/") and tag.endswith(".weight") for tag in scalars)
    assert scalars["method/mask_updates"][-1][1] > 0


def test_any_loop_writes_the_sparsifiers_figures(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.rigl(model, opt, sparsity=0.75, total_steps=6, update_every_steps=2)
    writer = SummaryWriter(str(tmp_path))
    for _ in range(6):
        loss = F.cross_entropy(model(torch.randn(16, 8)), torch.randint(0, 4, (16,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.log_to(writer)
    writer.close()
    scalars = _scalars(tmp_path)
    assert [s for s, _ in scalars["sparsity/overall"]] == [1, 2, 3, 4, 5, 6]
    assert scalars["sparsity/2.weight"][-1][1] == pytest.approx(0.75, abs=1 / 1024)
    assert scalars["method/mask_updates"][-1][1] == sp.updates > 0


@pytest.mark.parametrize("block", ["file", "read-only"])
def test_a_tensorboard_folder_that_cannot_be_written_stops_the_run_before_it_trains(
    block, tmp_path, monkeypatch, capsys
):
    """One line naming the folder and both ways out, exit 2, and nothing trained or logged (the check runs
    before the first step; TensorBoard's own writer would fail only at the first epoch's end)."""
    import tempfile

    from conftest import make_image_tar

    from sparsetrain.app.cli import main

    data = make_image_tar(tmp_path / "mnist.tar", 64, 16)
    run = tmp_path / "run"
    run.mkdir()
    if block == "file":
        (run / "tensorboard").write_text("not a folder")
        why = "a file, not a folder"
    else:  # a read-only folder (tests run as root, whom permissions do not stop: the write test is made to fail)
        real = tempfile.NamedTemporaryFile

        def refused(*a, dir=None, **kw):
            if str(dir).endswith("tensorboard"):
                raise PermissionError(13, "Permission denied")
            return real(*a, dir=dir, **kw)

        monkeypatch.setattr(tempfile, "NamedTemporaryFile", refused)
        why = "Permission denied"
    code = main(
        ["train", "model.name=small_cnn", "data.dataset=mnist", "optim.epochs=1", "run.progress=false"]
        + [f"data.data_dir={data}", f"data.cache_dir={tmp_path / 'c'}", f"run.out_dir={run}", "run.tensorboard=true"]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: run.tensorboard=true: {run / 'tensorboard'} cannot be written ({why}); free that path, or set "
        "run.tensorboard=false"
    ]
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoint.pt").exists()
