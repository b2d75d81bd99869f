"""Accuracy against training FLOPs for every current (not superseded) protocol-A record, one PNG (and a table on stdout).

    python benchmarks/plot_protocol_a.py [--recipe-filter none]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, read_records  # noqa: E402


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
    fig, ax = plt.subplots(figsize=(7, 5))
    print(f"{'method':<16} {'recipe':<10} {'sparsity':>8} {'test acc':>8} {'train F':>8} {'infer F':>8} {'wall s':>7}")
    for r in sorted(records, key=lambda r: r["train_flops_rel"]):
        label = r["method"] + (f" {r['sparsity']:.0%}" if r["sparsity"] else "") + (f" + {r['recipe']}" if r.get("recipe") else "")
        ax.scatter(r["train_flops_rel"], r["test_acc"], s=40)
        ax.annotate(label, (r["train_flops_rel"], r["test_acc"]), textcoords="offset points", xytext=(5, 3), fontsize=8)
        print(f"{r['method']:<16} {r.get('recipe') or '':<10} {r['sparsity']:>8.3f} {r['test_acc']:>8.2f} "
              f"{r['train_flops_rel']:>8.3f} {r['infer_flops_rel']:>8.3f} {r['wall_s']:>7.0f}")
    ax.set(xlabel="training FLOPs relative to dense", ylabel="final test accuracy (%)",
           title=f"Protocol A: {records[0]['model']} on {records[0]['dataset']}, {records[0]['epochs']} epochs")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
