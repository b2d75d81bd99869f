"""Protocol F (inference after training): a table (``results/protocol_f.md``) and a plot
(``results/protocol_f.png``) of the current records: the table every record, the plot one bar per model, sparsity
and batch on each CPU (the median of the newest commit's runs, each run a dot).

    python benchmarks/plot_protocol_f.py
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, read_records  # noqa: E402


def _latest_runs(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Per (model, sparsity, batch, CPU): the records of the newest commit that measured it (one per process)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["sparsity"], r["batch"], r["cpu"]), []).append(r)
    return {key: [r for r in runs if r["commit"] == runs[-1]["commit"]] for key, runs in groups.items()}


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_records("protocol_f.jsonl", current=True)
    if not rows:
        raise SystemExit(f"no records in {RESULTS / 'protocol_f.jsonl'}")
    lines = [
        "| model | masks | sparsity | batch | time vs dense | generation speed-up | file vs dense | CPU | commit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        lines.append(
            f"| {r['model']} | {r['config']} | {r['sparsity']:.2f} | {r['batch']} | {r['time_ratio']:.3f} | "
            f"{speedup} | {r['size_ratio']:.3f} | {r['cpu']} | {r['commit']} |"
        )
    (RESULTS / "protocol_f.md").write_text(
        "# Protocol F (inference)\n\n"
        "Produced by `python benchmarks/plot_protocol_f.py` from the records in protocol_f.jsonl (each with its "
        "command). Time vs dense: the inference form's forward against the dense model's (BatchNorm folded in both), "
        "calls alternating in blocks of five (single calls in records without `alternation`), medians; generation: tokens per second generating 256 tokens from a 128-token prompt; "
        "file: the sparse checkpoint against `torch.save` of the dense state dict.\n\n" + "\n".join(lines) + "\n"
    )
    latest = _latest_runs(rows)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    labels = [f"{model} {sparsity:.0%}\nbatch {batch}" for model, sparsity, batch, _ in latest]
    medians = [statistics.median(r["time_ratio"] for r in runs) for runs in latest.values()]
    ax.bar(labels, medians, color="tab:blue")
    for i, runs in enumerate(latest.values()):  # each process's figure as a dot
        ax.plot([i] * len(runs), [r["time_ratio"] for r in runs], "o", color="black", markersize=3)
        ax.text(i, max(r["time_ratio"] for r in runs) + 0.02, f"{medians[i]:.2f}", ha="center", fontsize=8)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylabel("forward time / dense")
    ax.set_title(f"Protocol F: inference against dense, newest commit of each row ({rows[-1]['cpu']})", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "protocol_f.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
