"""Accuracy against training FLOPs for every current (not superseded) protocol-A run: one PNG and a Markdown table.

Runs with several seeds are one point at their mean accuracy; the table lists each seed and the
gap to dense as the mean of the per-seed differences.

    python benchmarks/plot_protocol_a.py [--recipe-filter none]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, acc_cell, by_run, mean_acc, paired_gap, read_records  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--file", default="protocol_a.jsonl")
    ap.add_argument("--out", default=str(RESULTS / "protocol_a-accuracy-vs-flops.png"))
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(args.file, current=True)
    if not records:
        raise SystemExit(f"no records in {RESULTS / args.file}")
    runs = by_run(records)
    dense = runs.get("dense")
    fig, ax = plt.subplots(figsize=(7, 5))
    lines = ["| run | method | recipe | sparsity | test acc | vs dense | train FLOPs | inference FLOPs | wall (min) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, rs in sorted(runs.items(), key=lambda kv: kv[1][0]["train_flops_rel"]):
        r = rs[0]
        label = r["method"] + (f" {r['sparsity']:.0%}" if r["sparsity"] else "") + (f" + {r['recipe']}" if r.get("recipe") else "")
        ax.scatter(r["train_flops_rel"], mean_acc(rs), s=40)
        ax.annotate(label, (r["train_flops_rel"], mean_acc(rs)), textcoords="offset points", xytext=(5, 3), fontsize=8)
        paired = paired_gap(rs, dense) if dense else None
        lines.append(f"| {name} | {r['method']} | {r.get('recipe') or ''} | {r['sparsity']:.3f} | {acc_cell(rs)} | "
                     f"{f'{paired[0]:+.2f}' if paired else ''} | {r['train_flops_rel']:.3f} | {r['infer_flops_rel']:.3f} | "
                     f"{r['wall_s'] / 60:.1f} |")
    table = "\n".join(lines) + "\n"
    (RESULTS / f"{Path(args.file).stem}.md").write_text(
        "# Protocol A (ResNet-20, CIFAR-10, 15 epochs)\n\n"
        f"Produced by `python benchmarks/plot_protocol_a.py` from the records in {args.file}; each run's command is "
        "in its record. Accuracy: the mean over the seeds run (each seed in brackets); vs dense: the mean of the "
        "per-seed differences over the seeds both runs have. FLOPs and wall time: the first seed.\n\n" + table)
    print(table)
    ax.set(xlabel="training FLOPs relative to dense", ylabel="final test accuracy (%)",
           title=f"Protocol A: {records[0]['model']} on {records[0]['dataset']}, {records[0]['epochs']} epochs")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
