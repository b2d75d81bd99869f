"""Sharded training (FSDP2, two gloo processes) against one unsharded process: masks bit for bit, weights close.

The driver (tests/fsdp_driver.py) feeds every rank the same batches, so the averaged gradient is the one
process's gradient exactly and any difference comes from how masks are chosen and enforced on shards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DRIVER = Path(__file__).resolve().parent / "fsdp_driver.py"
STEPS = 200
METHODS = ("static", "set", "rigl", "mest", "swat", "swat-m")


def run_driver(out: Path, *args: str, ranks: int = 1, timeout: int = 600) -> dict:
    """Run the driver alone (``ranks=1``) or under torchrun on ``ranks`` CPU processes; return what rank 0 saved."""
    launch = (
        [sys.executable]
        if ranks == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    )
    proc = subprocess.run(
        [*launch, str(DRIVER), str(out), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module", params=["cnn", "gpt"])
def runs(request, tmp_path_factory):
    """(one process, two FSDP2 ranks) results of every method on one model."""
    tmp = tmp_path_factory.mktemp(f"fsdp-{request.param}")
    args = ["--model", request.param, "--steps", str(STEPS)]
    return request.param, run_driver(tmp / "one.pt", *args), run_driver(tmp / "two.pt", *args, ranks=2)


@pytest.mark.ranks
@pytest.mark.parametrize("method", METHODS)
def test_fsdp_masks_equal_one_process_after_every_update(runs, method):
    model, one, two = runs
    a, b = one[method], two[method]
    assert b["sharded_masks"] == b["masks"] > 0, "the masks under FSDP must be sharded like their weights"
    assert [s for s, _, _ in a["history"]] == [s for s, _, _ in b["history"]]
    if method not in ("static",):
        assert len(a["history"]) > 5, "the run must change its masks several times"
    for (step, ma, sa), (_, mb, sb) in zip(a["history"], b["history"]):
        assert ma.keys() == mb.keys()
        for name in ma:
            assert torch.equal(ma[name], mb[name]), f"{model}/{method}: {name} differs after step {step}"
        assert sa == sb
    for name, w in a["weights"].items():
        torch.testing.assert_close(b["weights"][name], w, rtol=1e-5, atol=1e-6)


@pytest.mark.ranks
def test_sharded_top_k_breaks_ties_like_one_process(runs):
    _, one, two = runs
    assert len(one["ties"]) == len(two["ties"]) > 0
    for a, b in zip(one["ties"], two["ties"]):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """RigL on the CNN and MEST (soft bound) on the GPT, 60 steps: uninterrupted in one process, and saved at step 30
    (then stopped, as a killed run) by one process and by two FSDP2 ranks."""
    tmp = tmp_path_factory.mktemp("fsdp-ckpt")
    out = {}
    for model, method in (("cnn", "rigl"), ("gpt", "mest")):
        args = ["--model", model, "--methods", method, "--steps", "60"]
        out[method] = {"full": run_driver(tmp / f"{method}-full.pt", *args)[method], "args": args}
        for ranks in (1, 2):
            run_driver(
                tmp / f"{method}-save{ranks}.pt",
                *args,
                "--save",
                str(tmp / f"ck{ranks}"),
                "--save-at",
                "30",
                ranks=ranks,
            )
            out[method][f"ck{ranks}"] = tmp / f"ck{ranks}"
    out["tmp"] = tmp
    return out


@pytest.mark.ranks
@pytest.mark.parametrize("method", ["rigl", "mest"])
@pytest.mark.parametrize("saved,resumed", [(2, 2), (2, 1), (1, 2)])
def test_sharded_checkpoint_resumes_equal_to_an_uninterrupted_run(checkpoints, method, saved, resumed):
    ref = checkpoints[method]
    got = run_driver(
        checkpoints["tmp"] / f"{method}-{saved}to{resumed}.pt",
        *ref["args"],
        "--resume",
        str(ref[f"ck{saved}"]),
        ranks=resumed,
    )[method]
    full = ref["full"]
    assert got["history"], "the resumed run must change its masks again"
    tail = [h for h in full["history"] if h[0] >= 30]
    assert [s for s, _, _ in got["history"]] == [s for s, _, _ in tail]
    for (_, mg, _), (_, mf, _) in zip(got["history"], tail):
        assert all(torch.equal(mg[k], mf[k]) for k in mf)
    for name, w in full["weights"].items():
        torch.testing.assert_close(got["weights"][name], w, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the training engine under torchrun
CLI = [
    "model.name=small_cnn",
    "data.dataset=mnist",
    "optim.batch_size=32",
    "optim.epochs=2",
    "sparsity.method=rigl",
    "sparsity.sparsity=0.8",
    "sparsity.distribution=erk",
    "sparsity.update_every_steps=3",
    "run.progress=false",
]

ONE_EPOCH = """
import sys
from sparsetrain.app.config import load_config
from sparsetrain.app import Trainer
t = Trainer(load_config(overrides=sys.argv[1:]))
t.out.prepare()
t.end_epoch(t.train_epoch())  # checkpoints at the epoch's end; then the process ends, as a killed run
from sparsetrain.app.distributed import leave, shutdown
shutdown()
leave()
"""


def _torchrun(*args: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _final_weights(run: Path) -> dict:
    return torch.load(run / "model.pt", weights_only=True)["model"]


@pytest.mark.ranks
@pytest.mark.parametrize(
    "extra",
    [[], ["model.name=mlp", "sparsity.backend=condensed", "sparsity.compact_state=true"]],
    ids=["masked", "compact"],
)
def test_cli_fsdp_matches_ddp_and_resumes_exactly(tmp_path, tiny_mnist_tar, extra):
    base = [*CLI, f"data.data_dir={tiny_mnist_tar}", *extra]
    _torchrun("-m", "sparsetrain.app.cli", "train", *base, "run.parallel=fsdp", f"run.out_dir={tmp_path / 'fsdp'}")
    _torchrun(
        "-m",
        "sparsetrain.app.cli",
        "train",
        *base,
        "run.parallel=ddp",
        "model.channels_last=false",
        f"run.out_dir={tmp_path / 'ddp'}",
    )
    fsdp, ddp = _final_weights(tmp_path / "fsdp"), _final_weights(tmp_path / "ddp")
    assert fsdp.keys() == ddp.keys()
    for k in ddp:  # the same data on each rank, the same averaged gradients: the same run
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-5, atol=1e-6)
    assert (tmp_path / "fsdp" / "checkpoint.dcp" / ".metadata").exists()
    # stopped after its first epoch's checkpoint, then resumed by the CLI: equal to the run that never stopped
    driver = tmp_path / "one_epoch.py"
    driver.write_text(ONE_EPOCH)
    cut = [*base, "run.parallel=fsdp", f"run.out_dir={tmp_path / 'cut'}"]
    _torchrun(str(driver), *cut)
    assert not (tmp_path / "cut" / "model.pt").exists()
    _torchrun("-m", "sparsetrain.app.cli", "train", *cut)
    resumed = _final_weights(tmp_path / "cut")
    for k in fsdp:
        assert torch.equal(resumed[k], fsdp[k]), k
    final = json.loads((tmp_path / "cut" / "final.json").read_text())
    assert final["sparsity"] == pytest.approx(0.8, abs=1e-3) and final["mask_updates"] > 0


@pytest.mark.parametrize(
    "override,reason",
    [
        ("sparsity.backend=csr", "sparsity.backend='csr' reads whole masks in its layers"),
        ("sparsity.init=snip", "sparsity.init='snip' scores weights with gradients taken outside"),
        ("sparsity.scheme=channel_in", "scheme 'channel_in' groups weights across output rows"),
        ("recipe.ghost_skip=true", "the recipe's ghost-skip change the model after it is sharded"),
        ("sparsity.method=lottery", "method 'lottery' rewinds whole weights"),
        ("sparsity.global_ranking=true", "sparsity.global_ranking ranks all layers at once"),
        ("sparsity.scheme=channel_out sparsity.backend=channel", "backend 'channel' traces chains of whole layers"),
    ],
)
def test_fsdp_refuses_what_cannot_run_sharded_before_training(override, reason):
    from sparsetrain.app.config import ConfigError, load_config

    static = ["model.name=small_cnn", "data.dataset=mnist", "sparsity.method=static", "sparsity.sparsity=0.8"]
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[*static, "run.parallel=fsdp", *override.split()])
    assert "run.parallel=fsdp cannot run this configuration" in str(err.value) and reason in str(err.value)


def test_fsdp_without_torchrun_says_how_to_start_it(tmp_path, tiny_mnist_tar):
    from sparsetrain.app import Trainer
    from sparsetrain.app.config import ConfigError, load_config

    cfg = load_config(
        overrides=[*CLI, f"data.data_dir={tiny_mnist_tar}", "run.parallel=fsdp", f"run.out_dir={tmp_path}"]
    )
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node N"):
        Trainer(cfg)


@pytest.mark.ranks
def test_lightning_fsdp2_strategy_keeps_the_masks_of_one_process(tmp_path):
    pytest.importorskip("lightning")
    driver = Path(__file__).resolve().parent / "lightning_fsdp_driver.py"
    for ranks in (1, 2):
        proc = subprocess.run(
            [sys.executable, str(driver), str(tmp_path / f"r{ranks}.pt"), str(ranks)],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in (1, 2))
    assert two["sharded"] and not one["sharded"] and one["updates"] == two["updates"] > 0
    for n in one["masks"]:
        assert torch.equal(one["masks"][n], two["masks"][n]), n
    for n in one["weights"]:
        torch.testing.assert_close(two["weights"][n], one["weights"][n], rtol=1e-5, atol=1e-6)


def test_fsdp_compact_refuses_mest_soft_bound():
    from sparsetrain.app.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="MEST's soft bound changes how many weights a layer keeps"):
        load_config(
            overrides=[
                "model.name=mlp",
                "data.dataset=mnist",
                "sparsity.method=mest",
                "sparsity.sparsity=0.9",
                "sparsity.mest.soft_bound=true",
                "sparsity.backend=condensed",
                "sparsity.compact_state=true",
                "run.parallel=fsdp",
            ]
        )


def test_units_that_would_span_ranks_are_refused_with_the_reason():
    from sparsetrain.core.schemes import parse_scheme
    from sparsetrain.core.sharding import Part

    rows_3_to_5 = Part(start=3, rows=3, shape=(8, 16), mesh=None, placements=())
    with pytest.raises(ValueError, match="scheme channel_in groups weights across output rows"):
        rows_3_to_5.check_rows(parse_scheme("channel_in").rows_per_unit, "channel_in", "fc.weight")
    with pytest.raises(ValueError, match="rows 3..5, which cuts a block"):
        rows_3_to_5.check_rows(parse_scheme("block_4x1").rows_per_unit, "block_4x1", "fc.weight")
    Part(start=4, rows=4, shape=(8, 16), mesh=None, placements=()).check_rows(
        4, "block_4x1", "fc.weight"
    )  # aligned: fine
    for name in ("unstructured", "channel_out", "fan_in", "nm_2:4"):
        rows_3_to_5.check_rows(parse_scheme(name).rows_per_unit, name, "fc.weight")
