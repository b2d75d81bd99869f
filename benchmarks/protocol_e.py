"""Protocol E: what one rank holds under sharded training (FSDP2), against one dense unsharded process.

    python benchmarks/protocol_e.py            # every configuration below; records in results/protocol_e.jsonl
    python benchmarks/protocol_e.py --plot     # the bar chart only (results/protocol_e.png)

The model is protocol D's GPT at width 512 and 8 layers (context 128; 25 M parameters), AdamW, batch 8, on
random tokens. Each configuration is its own ``torchrun --standalone`` job (or one plain process for 1 rank
without sharding); after three training steps, with the last step's gradients still in place, every rank counts
what it holds:

* ``state``: parameters, gradients and optimizer state (its shards under FSDP; of compact layers the kept
  values alone), the three the protocol compares;
* ``index``: what says where the kept weights are (masks, at one bit a weight in compact layers, and the compact
  layers' structures), reported beside it and added in ``state_index_ratio``;
* peak resident memory of the process (``mem_ratio``: against the dense process's, which includes the
  Python interpreter and PyTorch itself, about 0.3 GB).

The largest rank is recorded. Sparse configurations are 90% ERK (first and last Linear dense), ``static``
random masks or ``rigl`` (its update steps need no extra state between steps).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, append_record, command_line, commit, environment, read_records  # noqa: E402

RESULTS_FILE = "protocol_e.jsonl"
MODEL = {"width": 4.0, "depth": 8, "context": 128, "heads": 8}
# name -> (ranks, parallel, method, compact)
CONFIGS = {
    "dense-1": (1, "none", "dense", False),
    "dense-fsdp1": (1, "fsdp", "dense", False),
    "dense-fsdp2": (2, "fsdp", "dense", False),
    "static90-1": (1, "none", "static", False),
    "static90-fsdp2": (2, "fsdp", "static", False),
    "static90-compact-1": (1, "none", "static", True),
    "static90-compact-fsdp1": (1, "fsdp", "static", True),
    "static90-compact-fsdp2": (2, "fsdp", "static", True),
    "rigl90-compact-fsdp2": (2, "fsdp", "rigl", True),
}


def worker(method: str, compact: bool, parallel: str, out: str) -> None:
    """Train three steps and write what this rank holds (rank 0 writes every rank's counts to ``out``)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import sparsetrain
    from sparsetrain.app.distributed import shard_model
    from sparsetrain.core.sharding import local
    from sparsetrain.models import build_model

    sharded = parallel == "fsdp"
    if sharded:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = build_model("gpt", 65, MODEL["width"], context=MODEL["context"], depth=MODEL["depth"], heads=MODEL["heads"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # compact layers exist before sharding, which then shards their kept values
    execution = dict(execution="condensed", compact_state=True) if compact else {}
    if method == "dense":
        sp = sparsetrain.dense(model, opt)
    elif method == "static":
        sp = sparsetrain.static(model, opt, sparsity=0.9, distribution="erk", **execution)
    else:
        sp = sparsetrain.rigl(
            model, opt, sparsity=0.9, distribution="erk", total_steps=1000, update_every_steps=2, **execution
        )
    if sharded:
        shard_model(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sp.rebind(opt)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        tokens = torch.randint(0, 65, (8, MODEL["context"] + 1), generator=g)
        out_ = model(tokens[:, :-1])
        loss = F.cross_entropy(out_.reshape(-1, 65), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    def nbytes(t) -> int:
        return local(t).numel() * local(t).element_size() if t is not None else 0

    params = sum(nbytes(p) for p in model.parameters())
    grads = sum(nbytes(p.grad) for p in model.parameters())
    optim = sum(nbytes(v) for s in opt.state.values() for v in s.values() if hasattr(v, "numel") and v.dim() > 0)
    index = 0
    if sp.maskset is not None:
        index += sum(nbytes(dict.__getitem__(sp.maskset.masks, n)) for n in sp.maskset.masks)  # as held (packed or not)
        for owner in sp.maskset.owners.values():
            st = owner.compact
            index += sum(nbytes(getattr(st, k)) for k in ("row_ptr", "col") if getattr(st, k, None) is not None)
    mine = {
        "params": params,
        "grads": grads,
        "optim": optim,
        "index": index,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "sparsity": sp.sparsity(),
    }
    everyone = [mine]
    if sharded:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    if not sharded or dist.get_rank() == 0:
        Path(out).write_text(json.dumps(everyone))
    if sharded:
        from sparsetrain.app.distributed import leave, shutdown

        shutdown()
        leave()


def run_config(name: str) -> list[dict]:
    ranks, parallel, method, compact = CONFIGS[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        args = [str(Path(__file__).resolve()), "--worker", method, "--parallel", parallel, "--out", str(out)]
        if compact:
            args.append("--compact")
        launch = (
            [sys.executable]
            if parallel == "none"
            else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([*launch, *args], check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--parallel", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--compact", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--plot", action="store_true", help="only redraw results/protocol_e.png")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.compact, args.parallel, args.out)
        return
    if not args.plot:
        measured = {name: run_config(name) for name in dict.fromkeys(["dense-1", *args.configs])}
        ref = measured["dense-1"][0]
        ref_state = ref["params"] + ref["grads"] + ref["optim"]
        for name in args.configs:
            ranks, parallel, method, compact = CONFIGS[name]
            top = max(measured[name], key=lambda r: r["params"] + r["grads"] + r["optim"] + r["index"])
            state = top["params"] + top["grads"] + top["optim"]
            append_record(
                RESULTS_FILE,
                {
                    "protocol": "E",
                    "model": "gpt",
                    "model_args": MODEL,
                    "method": method,
                    "sparsity": round(top["sparsity"], 4),
                    "parallel": parallel if parallel != "none" else "single",
                    "ranks": ranks,
                    "compact_state": compact,
                    "config": name,
                    "state_ratio": round(state / ref_state, 4),
                    "state_index_ratio": round((state + top["index"]) / ref_state, 4),
                    "mem_ratio": round(top["peak_rss"] / ref["peak_rss"], 4),
                    "bytes": {k: top[k] for k in ("params", "grads", "optim", "index", "peak_rss")},
                    "dense_state_bytes": ref_state,
                    "command": command_line(),
                    "commit": commit(),
                    **environment(),
                },
            )
            print(
                f"{name:24s} state {state / ref_state:.3f}  +index {(state + top['index']) / ref_state:.3f}  "
                f"peak rss {top['peak_rss'] / ref['peak_rss']:.3f}",
                flush=True,
            )
    plot()


def plot() -> Path:
    """One bar per configuration: the largest rank's state against one dense process (latest records)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latest = {r["config"]: r for r in read_records(RESULTS_FILE)}
    names = [n for n in CONFIGS if n in latest]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    state = [latest[n]["state_ratio"] for n in names]
    index = [latest[n]["state_index_ratio"] - latest[n]["state_ratio"] for n in names]
    ax.bar(names, state, label="parameters + gradients + optimizer state")
    ax.bar(names, index, bottom=state, label="masks and compact structures")
    ax.axhline(0.30, color="k", ls="--", lw=0.8, label="target for 2 ranks at 90% compact (0.30)")
    ax.set_ylabel("one rank / one dense process")
    ax.set_title("GPT (width 512, 8 layers): what one rank holds")
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = RESULTS / "protocol_e.png"
    fig.savefig(path, dpi=120)
    return path


if __name__ == "__main__":
    main()
