"""Training under bfloat16 autocast against float32: the same sparse model, initialisation and batches, 200 steps
each, on real data: VGG-16 95% (`auto` + compact, CIFAR-10, batch 128, the protocol B optimizer) and the GPT of
D-speed fan-in 90% (condensed + compact, tiny Shakespeare, batch 16 x 128 characters, AdamW). The loss curves are
compared by their means over windows of ``--window`` steps: the record gives the largest relative gap of a window
(``max_window_gap``) and the last window's, and a plot draws both curves. ``--dense-reference`` trains the dense
model both ways too: the gap that bfloat16 alone makes over the same steps.

    python benchmarks/bf16_loss_curves.py --data ../shared/data
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, append_measurement, command_line, commit, environment  # noqa: E402

from sparsetrain.app.bench import build  # noqa: E402
from sparsetrain.data.images import load_dataset  # noqa: E402
from sparsetrain.data.text import load_text  # noqa: E402

RUNS = {  # model -> (protocol B configuration, sparsity, extra overrides, zoo arguments, batch)
    "vgg16": ("auto-compact", 0.95, [], {}, 128),
    "gpt": ("condensed-compact", 0.9, ["sparsity.scheme=fan_in"], {"width": 4.0, "context": 128}, 16),
}


def _batches(model_name: str, data: Path, batch: int, steps: int, context: int = 128) -> list[tuple]:
    """``steps`` fixed training batches (inputs, targets) of the model's real data, drawn with seed 0."""
    g = torch.Generator().manual_seed(0)
    if model_name == "gpt":
        splits, _ = load_text(data / "tinyshakespeare.txt", context)
        train = splits["train"]
        picks = torch.randint(0, len(train), (steps, batch), generator=g)
        return [tuple(torch.stack(t) for t in zip(*(train[int(i)] for i in row))) for row in picks]
    train = load_dataset("cifar10", data / "cifar10-jpeg.tar", download=False)["train"]
    mean = train.images[:5000].float().mean((0, 2, 3), keepdim=True)
    std = train.images[:5000].float().std((0, 2, 3), keepdim=True)
    picks = torch.randint(0, len(train), (steps, batch), generator=g)
    return [((train.images[row].float() - mean) / std, train.labels[row]) for row in picks]


def _train(model_name: str, batches: list[tuple], bf16: bool, dense: bool = False) -> list[float]:
    config, sparsity, extra, margs, _ = RUNS[model_name]
    model, opt, method = (
        build(model_name, "dense", model_args=margs) if dense else build(model_name, config, sparsity, extra, margs)
    )
    if method is not None and method.plan is None:
        method.choose_execution(batches[0][0])  # (outside autocast: the plan is the float32 one in both runs)
    losses = []
    for x, y in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _window_means(losses: list[float], window: int) -> list[float]:
    return [sum(losses[i : i + window]) / len(losses[i : i + window]) for i in range(0, len(losses), window)]


def _gaps(reference: list[float], other: list[float]) -> list[float]:
    """Each window's relative gap of ``other`` from ``reference``."""
    return [abs(b - a) / a for a, b in zip(reference, other)]


def _plot(model_name: str, curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=name, linewidth=1)
    ax.set(xlabel="step", ylabel="training loss", title=f"{model_name}: float32 and bfloat16 autocast")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--models", nargs="*", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument(
        "--dense-reference",
        action="store_true",
        help="also train the dense model both ways: the gap bfloat16 makes without sparsity (dense_max_window_gap)",
    )
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    for model_name in args.models:
        batches = _batches(model_name, args.data, RUNS[model_name][4], args.steps)
        curves = {"float32": _train(model_name, batches, False), "bf16 autocast": _train(model_name, batches, True)}
        means = {k: _window_means(v, args.window) for k, v in curves.items()}
        gaps = _gaps(means["float32"], means["bf16 autocast"])
        reference = {}
        if args.dense_reference:
            dense = [
                _window_means(_train(model_name, batches, bf16, dense=True), args.window) for bf16 in (False, True)
            ]
            reference = {
                "dense_max_window_gap": round(max(_gaps(*dense)), 4),
                "dense_last_window_gap": round(_gaps(*dense)[-1], 4),
                "dense_window_means": {
                    "float32": [round(v, 4) for v in dense[0]],
                    "bf16 autocast": [round(v, 4) for v in dense[1]],
                },
            }
        config, sparsity, extra, margs, batch = RUNS[model_name]
        record = {
            "benchmark": "bf16_loss_curves",
            "model": model_name,
            "model_args": margs,
            "config": config,
            "sparsity": sparsity,
            "extra": extra,
            "batch": batch,
            "steps": args.steps,
            "window": args.window,
            "max_window_gap": round(max(gaps), 4),
            "last_window_gap": round(gaps[-1], 4),
            **reference,
            "window_means": {k: [round(v, 4) for v in m] for k, m in means.items()},
            "command": command_line(),
            "commit": commit(),
            **environment(),
        }
        print(json.dumps(record))
        if not args.no_record:
            append_measurement("bf16_loss_curves.json", record)
            _plot(model_name, curves, RESULTS / f"bf16_loss_curves-{model_name}.png")


if __name__ == "__main__":
    main()
