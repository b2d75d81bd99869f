"""Memory per model: the bytes each configuration keeps for backward, by module kind, against dense
(``results/memory-<model>.png``), from the protocol B and D-speed records that measured them.

    python benchmarks/plot_memory.py

One bar per configuration (the newest record of each configuration, sparsity and options on the newest records'
CPU), stacked by the kind of module that kept the bytes, and the dense step's bars on top: what each method and
each activation option saves, and where the rest sits. The bytes kept (each tensor once) and the peak, each against plain dense, are written beside each bar.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, read_records  # noqa: E402

MODELS = ("vgg16", "gpt", "resnet50")
# the configurations compared (each with and without lossless activations, at every sparsity recorded)
CONFIGS = ("auto-compact", "rigl-auto-compact", "condensed-compact", "swat-auto", "channel-both-compact")
# the kinds of module, in the order stacked; anything else falls in "other"
KINDS = ("Conv2d", "Linear", "BatchNorm2d", "LayerNorm", "ReLU", "BitReLU", "GELU", "MaxPool2d", "CompactMaxPool2d")


def _label(r: dict) -> str:
    extra = " ".join(e.split(".")[-1] for e in r.get("extra", []))
    return f"{r['config']} {r['sparsity']:.0%}" + (f" ({extra})" if extra else "")


def _latest(rows: list[dict]) -> list[dict]:
    """The newest record per configuration, sparsity and options (records append: the last one wins)."""
    newest: dict[str, dict] = {}
    for r in rows:
        newest[_label(r) + str(r.get("model_args", {}))] = r
    return list(newest.values())


def _kinds(saved: dict) -> dict[str, float]:
    """MB kept per kind (each storage counted for every op that keeps it; ``total`` counts it once; what the modules
    hold between steps, ``module_state``, is not activation memory and is left out)."""
    out = {k: saved.get(k, 0) / 2**20 for k in KINDS}
    out["other"] = sum(v for k, v in saved.items() if k not in (*KINDS, "total", "module_state")) / 2**20
    return out


def plot(model: str, rows: list[dict], plt) -> Path | None:
    rows = [
        r
        for r in rows
        if r.get("model") == model and r.get("saved_bytes_sparse") and not r.get("compile") and r["config"] in CONFIGS
    ]
    if not rows:
        return None
    cpu, args = rows[-1]["cpu"], rows[-1].get("model_args", {})  # the newest records' CPU and model size
    rows = _latest([r for r in rows if r["cpu"] == cpu and r.get("model_args", {}) == args])
    bars = [("dense", _kinds(rows[-1]["saved_bytes_dense"]), "saved 1.00, peak 1.00")]
    bars += [
        (_label(r), _kinds(r["saved_bytes_sparse"]), f"saved {r['saved_bytes_ratio']:.2f}, peak {r['mem_ratio']:.2f}")
        for r in sorted(rows, key=_label)
    ]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(bars) + 2.0))
    colours = plt.get_cmap("tab10")
    for y, (_, kinds, _) in enumerate(bars):
        left = 0.0
        for i, (kind, mb) in enumerate(kinds.items()):
            ax.barh(y, mb, left=left, color=colours(i % 10), label=kind if y == 0 else None)
            left += mb
    for y, (_, kinds, text) in enumerate(bars):
        ax.text(sum(kinds.values()) * 1.01, y, text, va="center", fontsize=7)
    ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("MB kept for backward by each kind of module (a tensor two keep counts twice)", fontsize=8)
    ax.set_xlim(0, max(sum(k.values()) for _, k, _ in bars) * 1.3)
    size = " ".join(f"{k}={v}" for k, v in args.items())
    ax.set_title(f"{model} {size}: kept for backward ({cpu})", fontsize=9)
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.5 / len(bars)))
    fig.tight_layout()
    out = RESULTS / f"memory-{model}.png"
    fig.savefig(out, dpi=110, bbox_inches="tight")  # (long labels and the figures beside the bars stay in)
    plt.close(fig)
    return out


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_records("protocol_b.jsonl", current=True) + read_records("protocol_d_speed.jsonl", current=True)
    for model in MODELS:
        out = plot(model, rows, plt)
        print(out if out is not None else f"{model}: no record with saved bytes")


if __name__ == "__main__":
    main()
