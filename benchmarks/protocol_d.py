"""Protocol D of the benchmark protocols: a character GPT on tiny Shakespeare, one run per method.

    python benchmarks/protocol_d.py --data ../shared/data/tinyshakespeare.txt --runs dense static-random

4 blocks, 4 heads, width 128, context 64; batch 32 windows; AdamW (0.9, 0.95), weight decay 0.1 on matrices;
lr 1e-3, 100 warm-up steps, cosine to 1e-4; 6 epochs of windows every 63 characters (each epoch shifted by a
seeded offset): 2,988 steps, about the protocol's 3,000. Sparse runs: 90% of the attention projections and MLP
matrices, the output head dense. Validation loss (nats per character) over every non-overlapping 64-character
window of the last 10% of the text. Resumable like protocol_a.py: a recorded run is skipped, an unfinished one
continues from its checkpoint in benchmarks/runs/. One thread per run by default (two runs can share the machine).

Choosing a method's knobs never looks at the protocol's validation text: ``--tune`` trains on the first 90%
of the protocol's training text and validates on the rest of it (the file's 81-90% span), recording to
protocol_d_tuning.jsonl; ``--extra`` adds overrides and ``--label`` names the variant:

    python benchmarks/protocol_d.py --data ../shared/data/tinyshakespeare.txt --tune --runs rigl \
        --extra sparsity.update_every_steps=200 --label every200
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, append_record, command_line, commit, environment, read_records  # noqa: E402

from sparsetrain.app import Trainer
from sparsetrain.app.config import load_config
from sparsetrain.app.report import plot_curves

RESULTS_FILE = "protocol_d.jsonl"
TUNING_FILE = "protocol_d_tuning.jsonl"
BASE: list[str] = []  # the config file holds the protocol (stride 63, 6 epochs, warm-up 100 steps, cosine to 1e-4)
S90 = ["sparsity.sparsity=0.9", "sparsity.dense_layers=[last]"]
RUNS: dict[str, tuple[str, list[str]]] = {
    "dense": ("dense", []),
    "static-random-uniform": ("static-random", ["sparsity.method=static", *S90]),  # the reference loop's mask
    "static-random": ("static-random", ["sparsity.method=static", *S90, "sparsity.distribution=erk"]),
    "rigl": ("rigl", ["sparsity.method=rigl", *S90, "sparsity.distribution=erk"]),
    "rigl-fanin": ("rigl-fanin", ["sparsity.method=rigl", *S90, "sparsity.distribution=erk", "sparsity.scheme=fan_in"]),
    "set": ("set", ["sparsity.method=set", *S90, "sparsity.distribution=erk"]),
    "mest-ems": (
        "mest-ems",
        [
            "sparsity.method=mest",
            *S90,
            "sparsity.distribution=erk",
            "sparsity.mest.every_epochs=1",
            "sparsity.mest.soft_bound=true",
        ],
    ),
    "swat-u": ("swat-u", ["sparsity.method=swat", "sparsity.sparsity=0.9", "sparsity.dense_layers=[last]"]),
    "static-random-tost": (
        "static-random",
        ["sparsity.method=static", *S90, "sparsity.distribution=erk", "recipe.name=tost"],
    ),
}


def _training_part(text: Path) -> Path:
    """The protocol's training text alone (the file's first 90%), as a file whose own last 10% then validates."""
    body = text.read_text(encoding="utf-8")
    part = ROOT / "benchmarks" / "runs" / f"{text.stem}-train90.txt"
    part.parent.mkdir(parents=True, exist_ok=True)
    head = body[: int(len(body) * 0.9)]
    if not part.exists() or part.read_text(encoding="utf-8") != head:
        part.write_text(head, encoding="utf-8")
    return part


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="the text (../shared/data/tinyshakespeare.txt)")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=sorted(RUNS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tune", action="store_true", help="train and validate inside the protocol's training text")
    ap.add_argument("--extra", nargs="*", default=[], help="config overrides added to each run")
    ap.add_argument("--label", default="", help="a name for the variant --extra makes (part of the run's name)")
    args = ap.parse_args(argv)
    if args.extra and not args.label:
        ap.error("--extra needs --label, so that the variant's record and run directory have their own name")
    started_at = commit()
    results = TUNING_FILE if args.tune else RESULTS_FILE
    data = _training_part(Path(args.data)) if args.tune else args.data
    done = {(r["run"], r["seed"]) for r in read_records(results)}
    for base_name in args.runs:
        method, overrides = RUNS[base_name]
        name = f"{base_name}-{args.label}" if args.label else base_name
        if (name, args.seed) in done:
            print(f"{name}: already recorded, skipped")
            continue
        out = ROOT / "benchmarks" / "runs" / f"d{'-tune' if args.tune else ''}-{name}-s{args.seed}"
        cfg = load_config(
            ROOT / "configs" / "gpt_shakespeare.yaml",
            [
                f"data.data_dir={data}",
                f"run.seed={args.seed}",
                f"run.out_dir={out}",
                f"run.threads={args.threads}",
                "run.checkpoint_every_steps=200",
                *BASE,
                *overrides,
                *args.extra,
            ],
        )
        summary = Trainer(cfg).fit()
        record = {
            "protocol": "D",
            "run": name,
            "model": "gpt",
            "dataset": "tinyshakespeare",
            "method": method,
            "recipe": summary.get("recipe"),
            "sparsity": round(summary["sparsity"], 4),
            "steps": summary["steps"],
            "seed": args.seed,
            "val_loss": round(summary["val_loss"], 4),
            "val_ppl": round(summary["val_ppl"], 3),
            "train_flops_rel": round(summary["train_flops_rel"], 4),
            "wall_s": summary["wall_s"],
            "extra": args.extra,
            "tuning": args.tune,
            "command": command_line(),
            "commit": started_at,
            **environment(),
            **{k: summary[k] for k in ("mask_updates", "peak_density", "activation_sparsity") if k in summary},
        }
        append_record(results, record)
        if not args.tune:
            plot_curves([out], ROOT / "benchmarks" / "results" / f"protocol_d-{name}-s{args.seed}.png")
        print(json.dumps(record))


if __name__ == "__main__":
    main()
