"""The SWAT sweep of protocol A as a table (Markdown) beside dense.

    python benchmarks/swat_sweep.py

Reads the SWAT records of benchmarks/results/protocol_a.jsonl (runs swat-* of
protocol_a.py) and the dense record, and writes results/swat_sweep.md: accuracy and
its gap to dense against the targets of the SWAT paper's claims at this budget
(SWAT-U 80% within 1.5 points, SWAT-ERK 90% within 2.5), training and inference FLOPs
relative to dense, the activation sparsity reached and the wall time.
The accuracy-against-FLOPs picture is plot_protocol_a.py's.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, acc_cell, by_run, paired_gap, read_records  # noqa: E402
from protocol_a import RUNS  # noqa: E402

# run -> the largest gap to dense (points) the target allows
TARGETS = {"swat-u80": 1.5, "swat-erk90": 2.5}


def main() -> None:
    runs = by_run([r for r in read_records("protocol_a.jsonl", current=True) if r["model"] == "resnet20"])
    dense = runs.get("dense")
    lines = [
        "| run | sparsity | test acc | vs dense | target | train FLOPs | inference FLOPs | activation sparsity | wall (min) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in (n for n in RUNS if n.startswith("swat-")):
        rs = runs.get(name)
        if rs is None:
            lines.append(f"| {name} | | not run | | | | | | |")
            continue
        r = rs[0]
        paired = paired_gap(rs, dense) if dense else None
        gap = paired[0] if paired else None
        target = ""
        if name in TARGETS and gap is not None:
            target = f"within {TARGETS[name]}: {'met' if -gap <= TARGETS[name] else 'missed'}"
        lines.append(
            f"| {name} | {r['sparsity']:.2f} | {acc_cell(rs)} | {'' if gap is None else f'{gap:+.2f}'} | {target} "
            f"| {r['train_flops_rel']:.3f} | {r['infer_flops_rel']:.3f} | {r.get('activation_sparsity', float('nan')):.3f} "
            f"| {r['wall_s'] / 60:.1f} |"
        )
    head = f"Dense: {acc_cell(dense)}.\n\n" if dense else ""
    table = "\n".join(lines) + "\n"
    (RESULTS / "swat_sweep.md").write_text(
        "# SWAT sweep, protocol A (ResNet-20, CIFAR-10, 15 epochs)\n\n"
        "Produced by `python benchmarks/swat_sweep.py` from the records in protocol_a.jsonl. "
        "Accuracy: the mean over the seeds run (each seed in brackets); the gap to dense is the mean "
        "of the per-seed differences over the seeds both runs have. "
        "FLOPs, activation sparsity and wall time: the first seed. "
        "Structured runs: the share of weights removed, as whole kernels ranked by L1 norm.\n\n" + head + table
    )
    print(head + table)


if __name__ == "__main__":
    main()
