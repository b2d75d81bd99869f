"""The protocol B / D-speed rows behind the "Real speed III" figures, one after another, resumable.

    python benchmarks/real_speed_sweep.py            # every row not yet recorded at this commit
    python benchmarks/real_speed_sweep.py --only vgg16 --dry-run

Each row is one ``benchmarks/protocol_b.py`` command in its own process (so that one row's memory never reaches
the next one's peak); a row whose command already has a record at the current commit is skipped, so a sweep cut
short goes on where it stopped. Run it on an idle machine: nothing else may share the cores while it times.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, commit, read_records  # noqa: E402

LOSSLESS = ["--extra", "sparsity.lossless_activations=true"]


def _gpt_fan_in(width: str, *more: str) -> list[str]:
    """The D-speed row: the GPT at ``width`` (x 128), context 128, batch 16, fan-in 90% condensed + compact."""
    return [
        *("--model", "gpt", "--model-args", f"width={width}", "context=128", "--batch", "16"),
        *("--config", "condensed-compact", "--sparsity", "0.9", "--extra", "sparsity.scheme=fan_in", *more),
    ]


ROWS: list[list[str]] = [
    # VGG-16, CIFAR, batch 128: static unstructured on auto + compact state
    *[["--model", "vgg16", "--config", "auto-compact", "--sparsity", s] for s in ("0.9", "0.95", "0.98")],
    ["--model", "vgg16", "--config", "auto-compact", "--sparsity", "0.95", *LOSSLESS],
    ["--model", "vgg16", "--config", "swat-auto", "--sparsity", "0.9"],
    ["--model", "vgg16", "--config", "swat-auto", "--sparsity", "0.9", *LOSSLESS],
    ["--model", "vgg16", "--config", "channel-both-compact", "--sparsity", "0.5"],
    ["--model", "vgg16", "--config", "channel-both-compact", "--sparsity", "0.5", *LOSSLESS],
    ["--model", "vgg16", "--config", "rigl-auto-compact", "--sparsity", "0.95", "--pairs", "110"],
    ["--model", "vgg16", "--config", "mest-compact", "--sparsity", "0.95"],
    # ResNet-20: auto never above dense
    *[["--model", "resnet20", "--config", "auto", "--sparsity", s] for s in ("0.5", "0.8", "0.9", "0.95", "0.98")],
    # ResNet-18 beside VGG-16
    *[["--model", "resnet18", "--config", "auto-compact", "--sparsity", s] for s in ("0.9", "0.95", "0.98")],
    ["--model", "resnet18", "--config", "swat-auto", "--sparsity", "0.9"],
    # ImageNet-sized layers: ResNet-50 at 224 x 224, batch 32, synthetic input
    [
        "--model",
        "resnet50",
        "--batch",
        "32",
        "--config",
        "auto-compact",
        "--sparsity",
        "0.9",
        "--extra",
        "sparsity.distribution=erk",
    ],
    ["--model", "resnet50", "--batch", "32", "--config", "swat-auto", "--sparsity", "0.8"],
    ["--model", "resnet50", "--batch", "32", "--config", "auto-compact", "--sparsity", "0.95"],
    ["--model", "resnet50", "--batch", "32", "--config", "auto-compact", "--sparsity", "0.95", *LOSSLESS],
    # D-speed: GPT width 512 and 1024, context 128, batch 16, fan-in 90% on the condensed kernels
    *[_gpt_fan_in(w) for w in ("4.0", "8.0")],
    # ... and unstructured RigL 90% (no fan-in) on auto + compact state
    [
        *("--model", "gpt", "--model-args", "width=4.0", "context=128", "--batch", "16"),
        *("--config", "rigl-auto-compact", "--sparsity", "0.9"),
    ],
    # compiled: the sparse step under torch.compile against the compiled dense step
    *[["--model", "vgg16", "--config", "auto-compact", "--sparsity", s, "--compile"] for s in ("0.95", "0.98")],
    _gpt_fan_in("4.0", "--compile"),
    # bfloat16 autocast: the sparse step against the dense step under the same autocast
    _gpt_fan_in("4.0", "--bf16"),
    ["--model", "vgg16", "--config", "auto-compact", "--sparsity", "0.95", "--bf16"],
]


def command_of(row: list[str]) -> str:
    """The command line protocol_b.py records for ``row`` (its ``command`` field)."""
    import shlex

    return "python " + " ".join(shlex.quote(a) for a in ["benchmarks/protocol_b.py", *row])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="run only rows whose command contains this text")
    ap.add_argument("--dry-run", action="store_true", help="list the rows to run and stop")
    ap.add_argument(
        "--done-at",
        nargs="*",
        default=[],
        metavar="COMMIT",
        help="also count rows recorded at these commits as done (their code paths unchanged since)",
    )
    args = ap.parse_args(argv)
    head = commit()
    done = {
        r["command"]
        for f in ("protocol_b.jsonl", "protocol_d_speed.jsonl")
        for r in read_records(f)
        if r.get("commit") in (head, *args.done_at)
    }
    asked = [row for row in ROWS if args.only is None or args.only in command_of(row)]
    todo = [row for row in asked if command_of(row) not in done]
    print(f"{len(asked) - len(todo)} of {len(asked)} rows recorded at {head}; {len(todo)} to run", flush=True)
    for i, row in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {command_of(row)}", flush=True)
        if not args.dry_run:
            subprocess.run([sys.executable, "benchmarks/protocol_b.py", *row], cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
