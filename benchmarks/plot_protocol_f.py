"""Protocol F (inference after training): a table (``results/protocol_f.md``) and a plot
(``results/protocol_f.png``) of the current records, one row per model, sparsity and batch on each CPU.

    python benchmarks/plot_protocol_f.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, read_records  # noqa: E402


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
    fig, ax = plt.subplots(figsize=(7, 3.2))
    labels = [f"{r['model']} {r['sparsity']:.0%}\nbatch {r['batch']}" for r in rows]
    ax.bar(labels, [r["time_ratio"] for r in rows], color="tab:blue")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylabel("forward time / dense")
    ax.set_title(f"Protocol F: inference against dense ({rows[-1]['cpu']})", fontsize=10)
    ax.tick_params(axis="x", labelsize=8)
    for i, r in enumerate(rows):
        ax.text(i, r["time_ratio"] + 0.02, f"{r['time_ratio']:.2f}", ha="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "protocol_f.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
