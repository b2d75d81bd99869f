"""Protocol D of the benchmark protocols: a character GPT on tiny Shakespeare, one run per method.

    python benchmarks/protocol_d.py --data ../shared/data/tinyshakespeare.txt --runs dense static-random

4 blocks, 4 heads, width 128, context 64; batch 32 windows; AdamW (0.9, 0.95), weight decay 0.1 on matrices;
lr 1e-3, 100 warm-up steps, cosine to 1e-4; 6 epochs of windows every 63 characters (each epoch shifted by a
seeded offset): 2,988 steps, about the protocol's 3,000. Sparse runs: 90% of the attention projections and MLP
matrices, the output head dense. Validation loss (nats per character) over every non-overlapping 64-character
window of the last 10% of the text. Resumable like protocol_a.py: a recorded run is skipped, an unfinished one
continues from its checkpoint in benchmarks/runs/. One thread per run by default (two runs can share the machine).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, append_record, command_line, commit, environment, read_records  # noqa: E402

from sparsetrain.config import load_config
from sparsetrain.report import plot_curves
from sparsetrain.train import Trainer

RESULTS_FILE = "protocol_d.jsonl"
BASE: list[str] = []  # the config file holds the protocol (stride 63, 6 epochs, warm-up 100 steps, cosine to 1e-4)
S90 = ["sparsity.sparsity=0.9", "sparsity.dense_layers=[last]"]
RUNS: dict[str, tuple[str, list[str]]] = {
    "dense": ("dense", []),
    "static-random-uniform": ("static-random", ["sparsity.method=static", *S90]),  # the reference loop's mask
    "static-random": ("static-random", ["sparsity.method=static", *S90, "sparsity.distribution=erk"]),
    "rigl": ("rigl", ["sparsity.method=rigl", *S90, "sparsity.distribution=erk"]),
    "rigl-fanin": ("rigl-fanin", ["sparsity.method=rigl", *S90, "sparsity.distribution=erk", "sparsity.scheme=fan_in"]),
    "set": ("set", ["sparsity.method=set", *S90, "sparsity.distribution=erk"]),
    "mest-ems": ("mest-ems", ["sparsity.method=mest", *S90, "sparsity.distribution=erk", "sparsity.mest.every_epochs=1",
                              "sparsity.mest.soft_bound=true"]),
    "swat-u": ("swat-u", ["sparsity.method=swat", "sparsity.sparsity=0.9", "sparsity.dense_layers=[last]"]),
    "static-random-tost": ("static-random", ["sparsity.method=static", *S90, "sparsity.distribution=erk", "recipe.name=tost"]),
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="the text (../shared/data/tinyshakespeare.txt)")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=sorted(RUNS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    started_at = commit()
    done = {(r["run"], r["seed"]) for r in read_records(RESULTS_FILE)}
    for name in args.runs:
        method, overrides = RUNS[name]
        if (name, args.seed) in done:
            print(f"{name}: already recorded, skipped")
            continue
        out = ROOT / "benchmarks" / "runs" / f"d-{name}-s{args.seed}"
        cfg = load_config(ROOT / "configs" / "gpt_shakespeare.yaml", [
            f"data.data_dir={args.data}", f"run.seed={args.seed}", f"run.out_dir={out}", f"run.threads={args.threads}",
            "run.checkpoint_every_steps=200", *BASE, *overrides])
        summary = Trainer(cfg).fit()
        record = {
            "protocol": "D", "run": name, "model": "gpt", "dataset": "tinyshakespeare", "method": method,
            "recipe": summary.get("recipe"), "sparsity": round(summary["sparsity"], 4), "steps": summary["steps"],
            "seed": args.seed, "val_loss": round(summary["val_loss"], 4), "val_ppl": round(summary["val_ppl"], 3),
            "train_flops_rel": round(summary["train_flops_rel"], 4), "wall_s": summary["wall_s"],
            "command": command_line(), "commit": started_at, **environment(),
            **{k: summary[k] for k in ("mask_updates", "peak_density", "activation_sparsity") if k in summary},
        }
        append_record(RESULTS_FILE, record)
        plot_curves([out], ROOT / "benchmarks" / "results" / f"protocol_d-{name}-s{args.seed}.png")
        print(json.dumps(record))


if __name__ == "__main__":
    main()
