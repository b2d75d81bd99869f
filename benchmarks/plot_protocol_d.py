"""Validation loss against training FLOPs for every protocol-D run (a PNG and a Markdown table), and the
D-speed records as a table and a bar chart of step time and peak memory against dense.

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
    lines = [
        "| run | seed | method | recipe | sparsity | steps | val loss (nats/char) | reference loop | train FLOPs | wall (min) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    fig, ax = plt.subplots(figsize=(9, 5))
    colours = plt.get_cmap("tab20").colors
    for i, r in enumerate(sorted(records, key=lambda r: r["val_loss"])):
        ref = REFERENCE.get(r["run"]) if r["seed"] == 0 else None
        lines.append(
            f"| {r['run']} | {r['seed']} | {r['method']} | {r.get('recipe') or ''} | {r['sparsity']:.3f} | {r['steps']} | "
            f"{r['val_loss']:.3f} | {'' if ref is None else f'{ref:.3f}'} | {r['train_flops_rel']:.3f} | "
            f"{r['wall_s'] / 60:.1f} |"
        )
        ax.scatter(
            r["train_flops_rel"],
            r["val_loss"],
            s=50,
            color=colours[i % len(colours)],
            label=f"{r['run']} s{r['seed']} ({r['val_loss']:.3f})",
        )
    for name, loss in REFERENCE.items():
        ax.axhline(loss, ls="--", lw=0.8, color="grey")
        ax.text(1.0, loss, f" reference {name}", va="bottom", ha="right", fontsize=7, color="grey")
    table = "\n".join(lines) + "\n"
    (RESULTS / "protocol_d.md").write_text(
        "# Protocol D (character GPT on tiny Shakespeare, 4 blocks, width 128, about 3,000 steps)\n\n"
        "Produced by `python benchmarks/plot_protocol_d.py` from the records in protocol_d.jsonl; each run's command "
        "is in its record. Validation loss over every 64-character window of the last 10% of the text. "
        "Runs on one thread, two at a time side by side.\n\n" + table
    )
    print(table)
    ax.set(
        xlabel="training FLOPs relative to dense",
        ylabel="validation loss (nats per character)",
        title="Protocol D: lower is better",
    )
    ax.set_xscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    out = RESULTS / "protocol_d-loss-vs-flops.png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    speed()


def _speed_label(r: dict) -> str:
    scheme = "fan-in" if "sparsity.scheme=fan_in" in r.get("extra", []) else "unstructured"
    return f"{r['config']}, {scheme} {r['sparsity']:.0%}"


def speed() -> None:
    """D-speed: the table (protocol_d_speed.md) and the plot (protocol_d_speed.png) of every record."""
    import matplotlib.pyplot as plt

    records = read_records("protocol_d_speed.jsonl")
    if not records:
        return
    cell = lambda r, k: f"{r[k]:.3f}" if k in r else "—"  # noqa: E731 (factory-API records time only)
    lines = [
        "| configuration | width | scheme | sparsity | step / dense | peak memory / dense | (training part) | saved for backward | dense step (s) | threads |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        scheme = "fan-in" if "sparsity.scheme=fan_in" in r.get("extra", []) else "unstructured"
        width = int(128 * float((r.get("model_args") or {}).get("width", 4.0)))
        lines.append(
            f"| {r['config']} | {width} | {scheme} | {r['sparsity']:.2f} | {r['step_ratio']:.3f} | "
            f"{cell(r, 'mem_ratio')} | {cell(r, 'mem_ratio_training')} | {cell(r, 'saved_bytes_ratio')} | "
            f"{cell(r, 'step_s_dense_median')} | {r.get('threads', '')} |"
        )
    table = "\n".join(lines) + "\n"
    (RESULTS / "protocol_d_speed.md").write_text(
        "# D-speed (protocol D's GPT at width 512 (and 1024 where the width says so), context 128, batch 16; AdamW)\n\n"
        "Produced by `python benchmarks/plot_protocol_d.py` from protocol_d_speed.jsonl; each record holds its command "
        "(`benchmarks/protocol_b.py --model gpt ...`). Step: the whole training step against dense, alternating, median "
        "of 20 pairs. Memory: peak resident memory of a process per configuration (the training part subtracts each "
        "process's memory before the model was built).\n\n" + table
    )
    print(table)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = [_speed_label(r) for r in records]
    xs = range(len(records))
    ax.bar([x - 0.2 for x in xs], [r["step_ratio"] for r in records], 0.4, label="step time / dense")
    ax.bar([x + 0.2 for x in xs], [r.get("mem_ratio", 0.0) for r in records], 0.4, label="peak memory / dense")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="against dense", title="D-speed: GPT width 512, 2 CPU cores (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "protocol_d_speed.png", dpi=120)
    print(f"wrote {RESULTS / 'protocol_d_speed.png'}")


if __name__ == "__main__":
    main()
