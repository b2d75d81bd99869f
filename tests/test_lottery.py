import json

import pytest
import torch
from conftest import tiny_datasets

from sparsetrain.app import load_checkpoint
from sparsetrain.app.config import load_config
from sparsetrain.app.lottery import lottery_ticket, round_sparsities
from sparsetrain.models import build_model

BASE = [
    "model.name=mlp",
    "data.dataset=mnist",
    "optim.batch_size=32",
    "optim.lr=0.1",
    "run.threads=1",
    "run.progress=false",
    "model.channels_last=false",
    "sparsity.dense_layers=[]",
    "optim.epochs=2",
]


def test_round_sparsities_are_geometric():
    assert round_sparsities(0.75, 2) == pytest.approx([0.0, 0.5, 0.75])


@pytest.mark.parametrize("rewind_step", [0, 3])
def test_ticket_rounds_nest_rewind_and_resume(tmp_path, rewind_step):
    cfg = load_config(
        overrides=[
            *BASE,
            f"run.out_dir={tmp_path}",
            "sparsity.method=lottery",
            "sparsity.sparsity=0.75",
            "sparsity.lottery.rounds=2",
            f"sparsity.lottery.rewind_step={rewind_step}",
        ]
    )
    final = lottery_ticket(cfg, datasets=tiny_datasets())
    assert final["sparsity"] == pytest.approx(0.75, abs=1e-3) and final["round_sparsities"] == pytest.approx(
        [0, 0.5, 0.75]
    )
    rewind = load_checkpoint(tmp_path / "rewind.pt")["model"]
    m1 = {
        k: v != 0 for k, v in load_checkpoint(tmp_path / "round1" / "model.pt")["model"].items() if k.endswith("weight")
    }
    m2 = {
        k: v != 0 for k, v in load_checkpoint(tmp_path / "round2" / "model.pt")["model"].items() if k.endswith("weight")
    }
    for k in m2:
        assert not (m2[k] & ~m1[k]).any()  # each round prunes within the last one's survivors
    # the rewind point: initialisation, or the weights after `rewind_step` steps of round 0
    trained = load_checkpoint(tmp_path / "round0" / "checkpoint.pt")["model"]  # round 0's last state
    assert not torch.equal(rewind["1.weight"], trained["1.weight"])
    torch.manual_seed(0)
    fresh = build_model("mlp", 10).state_dict()  # the engine seeds, then builds: this is the initialisation
    assert torch.equal(rewind["1.weight"], fresh["1.weight"]) == (rewind_step == 0)
    assert final["train_flops_rel"] > 1.0  # the search costs more than one dense run
    # a second call finds every round finished and returns the same result
    mtime = (tmp_path / "round2" / "final.json").stat().st_mtime
    again = lottery_ticket(cfg, datasets=tiny_datasets())
    assert again["test_acc"] == final["test_acc"] and (tmp_path / "round2" / "final.json").stat().st_mtime == mtime
    assert json.loads((tmp_path / "final.json").read_text())["method"] == "lottery"
