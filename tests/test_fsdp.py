"""Sharded training (FSDP2, two gloo processes) against one unsharded process: masks bit for bit, weights close.

The driver (tests/fsdp_driver.py) feeds every rank the same batches, so the averaged gradient is the one
process's gradient exactly and any difference comes from how masks are chosen and enforced on shards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DRIVER = Path(__file__).resolve().parent / "fsdp_driver.py"
STEPS = 200
METHODS = ("static", "set", "rigl", "mest", "swat")


def run_driver(out: Path, *args: str, ranks: int = 1, timeout: int = 600) -> dict:
    """Run the driver alone (``ranks=1``) or under torchrun on ``ranks`` CPU processes; return what rank 0 saved."""
    launch = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={ranks}"]
    proc = subprocess.run([*launch, str(DRIVER), str(out), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module", params=["cnn", "gpt"])
def runs(request, tmp_path_factory):
    """(one process, two FSDP2 ranks) results of every method on one model."""
    tmp = tmp_path_factory.mktemp(f"fsdp-{request.param}")
    args = ["--model", request.param, "--steps", str(STEPS)]
    return request.param, run_driver(tmp / "one.pt", *args), run_driver(tmp / "two.pt", *args, ranks=2)


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
            run_driver(tmp / f"{method}-save{ranks}.pt", *args, "--save", str(tmp / f"ck{ranks}"), "--save-at", "30", ranks=ranks)
            out[method][f"ck{ranks}"] = tmp / f"ck{ranks}"
    out["tmp"] = tmp
    return out


@pytest.mark.parametrize("method", ["rigl", "mest"])
@pytest.mark.parametrize("saved,resumed", [(2, 2), (2, 1), (1, 2)])
def test_sharded_checkpoint_resumes_equal_to_an_uninterrupted_run(checkpoints, method, saved, resumed):
    ref = checkpoints[method]
    got = run_driver(checkpoints["tmp"] / f"{method}-{saved}to{resumed}.pt", *ref["args"], "--resume", str(ref[f"ck{saved}"]),
                     ranks=resumed)[method]
    full = ref["full"]
    assert got["history"], "the resumed run must change its masks again"
    tail = [h for h in full["history"] if h[0] >= 30]
    assert [s for s, _, _ in got["history"]] == [s for s, _, _ in tail]
    for (_, mg, _), (_, mf, _) in zip(got["history"], tail):
        assert all(torch.equal(mg[k], mf[k]) for k in mf)
    for name, w in full["weights"].items():
        torch.testing.assert_close(got["weights"][name], w, rtol=1e-5, atol=1e-6)
