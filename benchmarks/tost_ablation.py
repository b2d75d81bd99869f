"""The ToST ablation of protocol A as a table (Markdown) and a bar chart (PNG).

    python benchmarks/tost_ablation.py

Reads the 98%-sparsity records of benchmarks/results/protocol_a.jsonl (runs named by
protocol_a.py: <mask>98, <mask>98-<variant> for the VARIANTS below, random98-<component>)
and writes results/tost_ablation.md and results/tost_ablation.png: for each mask the default
protocol against ToST (and against the earlier defaults: with GradInit, with ghost skips and
GradInit), each ToST component alone on the random mask, and the validation runs that chose
the default (protocol_a_validation.jsonl).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, acc_cell, by_run, gap_cell, mean_acc, paired_gap, read_records  # noqa: E402
from protocol_a import COMPONENTS, MASKS98  # noqa: E402

# the ToST variants per mask, as (run suffix, label): the default first, then the earlier defaults
VARIANTS = [
    ("tost", "ToST"),
    ("tost-rescale-gradinit", "ToST + GradInit"),
    ("tost-skips", "ToST + ghost skips + GradInit"),
]


def main() -> None:
    runs = by_run(read_records("protocol_a.jsonl", current=True))
    head = " | ".join(f"{label} | gain" for _, label in VARIANTS)
    lines = [f"| mask (98% sparse) | default | {head} |", "|---|---|" + "---|---|" * len(VARIANTS)]
    gains: dict[str, list[float]] = {suffix: [] for suffix, _ in VARIANTS}
    pairs = []  # (mask, default's mean, each variant's mean or None)
    cell = lambda rs: acc_cell(rs) if rs else "not run"  # noqa: E731
    for mask in MASKS98:
        base = runs.get(f"{mask}98")
        variants = [runs.get(f"{mask}98-{suffix}") for suffix, _ in VARIANTS]
        row = f"| {mask} | {cell(base)} |"
        for (suffix, _), rs in zip(VARIANTS, variants):
            paired = paired_gap(rs, base) if base and rs else None
            if paired:
                gains[suffix].append(paired[0])
            row += f" {cell(rs)} | {gap_cell(rs, base) if rs and base else ''} |"
        lines.append(row)
        if base:
            pairs.append((mask, mean_acc(base), [mean_acc(rs) if rs else None for rs in variants]))
    lines.append(
        "| mean gain | |"
        + "".join(f" | {sum(g) / len(g):+.2f} ({len(g)} masks) |" if g else " | |" for g in gains.values())
    )
    lines += ["", "| random mask, one component | test acc | vs default |", "|---|---|---|"]
    base = runs.get("random98")
    parts = []
    for name in COMPONENTS:
        rs = runs.get(f"random98-{name}")
        if rs:
            parts.append((name, mean_acc(rs)))
        lines.append(f"| {name} | {acc_cell(rs)} | {gap_cell(rs, base)} |" if rs else f"| {name} | not run | |")
    validation = read_records("protocol_a_validation.jsonl")
    if validation:
        lines += [
            "",
            "| validation run (not the test set) | held out | val acc | test acc, not used to choose |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['run']} (seed {r['seed']}) | {r['val_fraction']:.0%} of train | {r['val_acc']:.2f} "
            f"| {r['test_acc']:.2f} |"
            for r in validation
        ]
    table = "\n".join(lines) + "\n"
    (RESULTS / "tost_ablation.md").write_text(
        "# ToST ablation, protocol A (ResNet-20, CIFAR-10, 15 epochs)\n\n"
        "Produced by `python benchmarks/tost_ablation.py` from the records in protocol_a.jsonl. "
        "Accuracy: the mean over the seeds run (each seed in brackets); gains: the mean of the per-seed "
        "differences over the seeds both runs have.\n\n" + table
    )
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 4]})
    xs = range(len(pairs))
    width = 0.8 / (1 + len(VARIANTS))
    left.bar([x - 0.4 + width / 2 for x in xs], [p[1] for p in pairs], width, label="default")
    for i, (_, label) in enumerate(VARIANTS, start=1):
        bars = [(x, p[2][i - 1]) for x, p in zip(xs, pairs) if p[2][i - 1] is not None]
        left.bar([x - 0.4 + width * (i + 0.5) for x, _ in bars], [v for _, v in bars], width, label=label)
    left.set_xticks(list(xs), [p[0] for p in pairs])
    left.set(ylabel="test accuracy (%)", title="98% masks: default vs ToST")
    left.legend()
    if base:
        names = ["default", *[p[0] for p in parts]]
        right.bar(range(len(names)), [mean_acc(base), *[p[1] for p in parts]], color="grey")
        right.set_xticks(range(len(names)), names, rotation=20)
        right.set(title="random 98% mask: one component each")
    lows = (
        [v for p in pairs for v in (p[1], *p[2]) if v is not None]
        + [p[1] for p in parts]
        + ([mean_acc(base)] if base else [])
    )
    for ax in (left, right):
        if lows:
            ax.set_ylim(min(lows) - 3, max(lows) + 2)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(RESULTS / "tost_ablation.png", dpi=120)
    print(RESULTS / "tost_ablation.png")


if __name__ == "__main__":
    main()
