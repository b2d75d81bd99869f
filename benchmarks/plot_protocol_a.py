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
from common import RESULTS, acc_cell, by_run, gap_cell, mean_acc, read_records  # noqa: E402


def _family(method: str) -> str:
    """The method a run's name starts with: mest-ems-data and mest-em are MEST, swat-u and swat-erk SWAT."""
    return method.split("-")[0] if method.startswith(("mest", "swat")) else method


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
    fig, ax = plt.subplots(figsize=(11, 6))
    colours = plt.get_cmap("tab10").colors
    markers = "osD^vP*Xph"
    points = []
    lines = [
        "| run | method | recipe | sparsity | test acc | vs dense | train FLOPs | inference FLOPs | wall (min) | threads |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in sorted(runs.items(), key=lambda kv: kv[1][0]["train_flops_rel"]):
        r = rs[0]
        # grouped, not one legend entry a run (35 entries were too small to read): colour names the method, the
        # marker the recipe; the table below names every run
        points.append((mean_acc(rs), r["train_flops_rel"], _family(r["method"]), r.get("recipe") or "none"))
        lines.append(
            f"| {name} | {r['method']} | {r.get('recipe') or ''} | {r['sparsity']:.3f} | {acc_cell(rs)} | "
            f"{gap_cell(rs, dense)} | {r['train_flops_rel']:.3f} | {r['infer_flops_rel']:.3f} | "
            f"{r['wall_s'] / 60:.1f} | {r.get('threads', '')} |"
        )
    families = sorted({p[2] for p in points}, key=lambda f: (f != "dense", f))
    recipes = sorted({p[3] for p in points}, key=lambda r: (r != "none", r))
    for acc, flops, family, recipe in points:
        ax.scatter(
            flops, acc, s=60, marker=markers[recipes.index(recipe) % len(markers)],
            color=colours[families.index(family) % len(colours)], edgecolor="black", linewidth=0.4,
        )  # fmt: skip
    from matplotlib.lines import Line2D

    def key(label, **kw):
        return Line2D([], [], linestyle="", markersize=8, label=label, **kw)

    by_method = [key(f, marker="o", color=colours[i % len(colours)]) for i, f in enumerate(families)]
    by_recipe = [key(r, marker=markers[i % len(markers)], color="grey") for i, r in enumerate(recipes)]
    first = ax.legend(handles=by_method, title="method", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=10)
    ax.add_artist(first)
    ax.legend(handles=by_recipe, title="recipe (ToST parts)", loc="lower left", bbox_to_anchor=(1.01, 0.0), fontsize=10)
    table = "\n".join(lines) + "\n"
    (RESULTS / f"{Path(args.file).stem}.md").write_text(
        "# Protocol A (ResNet-20, CIFAR-10, 15 epochs)\n\n"
        f"Produced by `python benchmarks/plot_protocol_a.py` from the records in {args.file}; each run's command is "
        "in its record. Accuracy: the mean over the seeds run (each seed in brackets); vs dense: the mean of the "
        "per-seed differences over the seeds both runs have. FLOPs and wall time: the first seed. Runs on one thread "
        "ran two at a time side by side, so their wall times compare with each other, not with two-thread runs.\n\n"
        + table
    )
    print(table)
    ax.set(
        xlabel="training FLOPs relative to dense",
        ylabel="final test accuracy (%)",
        title=f"Protocol A: {records[0]['model']} on {records[0]['dataset']}, {records[0]['epochs']} epochs",
    )
    ax.set_xscale("log")
    ax.set_xticks([0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0], ["0.03", "0.05", "0.1", "0.2", "0.3", "0.5", "1"])
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
