"""Reports over run directories: a table of final metrics and per-layer sparsity, and curves as PNG."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["read_run", "format_table", "format_layers", "plot_curves"]


def read_run(run_dir: str | Path) -> dict:
    """The final summary and per-epoch metrics of a run directory."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no metrics.jsonl)")
    metrics = []
    for ln in metrics_path.read_text().splitlines():
        try:
            metrics.append(json.loads(ln))
        except ValueError:  # a line cut by a kill: the run resumes without it
            continue
    final_path = run_dir / "final.json"
    final = json.loads(final_path.read_text()) if final_path.exists() else {}
    return {"dir": str(run_dir), "metrics": metrics, "final": final}


def format_table(runs: list[dict]) -> str:
    """One line per run: method, sparsity, epochs, final test accuracy (language models: validation loss),
    FLOPs relative to dense, wall time."""
    head = f"{'run':<40} {'method':<16} {'sparsity':>8} {'epochs':>6} {'acc|loss':>8} {'train F':>8} {'infer F':>8} {'wall s':>8}"
    lines = [head, "-" * len(head)]
    for r in runs:
        f, last = r["final"], (r["metrics"][-1] if r["metrics"] else {})
        done = "" if f else " (running)"
        lines.append(
            f"{Path(r['dir']).name[:40]:<40} {f.get('method', '?'):<16} {f.get('sparsity', last.get('sparsity', 0)):>8.4f} "
            f"{last.get('epoch', 0):>6} {last.get('test_acc', last.get('val_loss', float('nan'))):>8.2f} "
            f"{f.get('train_flops_rel', last.get('train_flops_rel', float('nan'))):>8.4f} "
            f"{f.get('infer_flops_rel', float('nan')):>8.4f} {last.get('wall_s', float('nan')):>8.0f}{done}"
        )
    return "\n".join(lines)


def format_layers(run: dict) -> str:
    """Per-layer shape, kept weights and sparsity of a run's final model."""
    layers = run["final"].get("layers", [])
    if not layers:
        return f"{run['dir']}: all layers dense"
    lines = [f"{run['dir']}:", f"  {'layer':<40} {'shape':<20} {'nonzeros':>10} {'sparsity':>8}"]
    for ly in layers:  # every layer; those the method left dense say so
        kind = "  dense" if ly.get("dense") else ""
        lines.append(
            f"  {ly['name']:<40} {str(tuple(ly['shape'])):<20} {ly['nonzeros']:>10} {1 - ly['density']:>8.4f}{kind}"
        )
    return "\n".join(lines)


def plot_curves(run_dirs: list[str | Path], out_png: str | Path) -> Path:
    """Test accuracy (language models: validation loss) and training loss against epoch for each run, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for d in run_dirs:
        run = read_run(d)
        ep = [m["epoch"] for m in run["metrics"]]
        label = run["final"].get("method") or Path(d).name
        text = bool(run["metrics"]) and "test_acc" not in run["metrics"][0]  # a language model: validation loss
        key = "val_loss" if text else "test_acc"
        ax_acc.plot(ep, [m.get(key) for m in run["metrics"]], marker="o", ms=3, label=label)
        ax_loss.plot(ep, [m["train_loss"] for m in run["metrics"]], marker="o", ms=3, label=label)
        ax_acc.set(
            xlabel="epoch",
            ylabel="validation loss (nats/char)" if text else "test accuracy (%)",
            title="Validation loss" if text else "Test accuracy",
        )
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, out_png)


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
