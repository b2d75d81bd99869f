"""Validation loss against training FLOPs for every protocol-D run: one PNG and a Markdown table.

    python benchmarks/plot_protocol_d.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, read_records  # noqa: E402

REFERENCE = {"dense": 1.641, "static-random-uniform": 2.160}  # the bare loop, ../shared/BENCHMARKS.md


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records("protocol_d.jsonl")
    if not records:
        raise SystemExit(f"no records in {RESULTS / 'protocol_d.jsonl'}")
    lines = ["| run | seed | method | recipe | sparsity | steps | val loss (nats/char) | reference loop | train FLOPs | wall (min) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(9, 5))
    colours = plt.get_cmap("tab20").colors
    for i, r in enumerate(sorted(records, key=lambda r: r["val_loss"])):
        ref = REFERENCE.get(r["run"]) if r["seed"] == 0 else None
        lines.append(f"| {r['run']} | {r['seed']} | {r['method']} | {r.get('recipe') or ''} | {r['sparsity']:.3f} | {r['steps']} | "
                     f"{r['val_loss']:.3f} | {'' if ref is None else f'{ref:.3f}'} | {r['train_flops_rel']:.3f} | "
                     f"{r['wall_s'] / 60:.1f} |")
        ax.scatter(r["train_flops_rel"], r["val_loss"], s=50, color=colours[i % len(colours)], label=f"{r['run']} s{r['seed']} ({r['val_loss']:.3f})")
    for name, loss in REFERENCE.items():
        ax.axhline(loss, ls="--", lw=0.8, color="grey")
        ax.text(1.0, loss, f" reference {name}", va="bottom", ha="right", fontsize=7, color="grey")
    table = "\n".join(lines) + "\n"
    (RESULTS / "protocol_d.md").write_text(
        "# Protocol D (character GPT on tiny Shakespeare, 4 blocks, width 128, about 3,000 steps)\n\n"
        "Produced by `python benchmarks/plot_protocol_d.py` from the records in protocol_d.jsonl; each run's command "
        "is in its record. Validation loss over every 64-character window of the last 10% of the text. "
        "Runs on one thread, two at a time side by side.\n\n" + table)
    print(table)
    ax.set(xlabel="training FLOPs relative to dense", ylabel="validation loss (nats per character)",
           title="Protocol D: lower is better")
    ax.set_xscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    out = RESULTS / "protocol_d-loss-vs-flops.png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
