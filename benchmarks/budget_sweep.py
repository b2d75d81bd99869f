"""How long must a sparse network train? Protocol A at a longer budget for the seed methods' claims.

    python benchmarks/budget_sweep.py --data ../shared/data/cifar10-jpeg.tar --epochs 60 --parallel 2
    python benchmarks/budget_sweep.py --data ... --device cuda --parallel 7    # a GPU: every run at once
    python benchmarks/budget_sweep.py --plot                                   # the gap-to-dense plot only

Seven runs of protocol A, everything but the epochs unchanged (seed 0): dense, RigL 90% (ERK), MEST+EM&S
90% (ERK, mutation every 4 epochs: the 15-epoch run's every epoch, scaled), SWAT-U 80%, SWAT-ERK 90%,
static random 98% and static random 98% with the ToST recipe. Each run is one ``protocol_a.py`` process
(records in results/protocol_a_budget.jsonl, each with its device); ``--parallel`` runs that many side by
side, at one thread each on the CPU. Both levels resume: a recorded run is skipped, an unfinished one
continues from its checkpoint in benchmarks/runs/. The plot sets each method's gap to dense at 15 epochs
(results/protocol_a.jsonl) beside the longer budgets (results/protocol_a_budget.png, and the same figures as
a table in results/protocol_a_budget.md).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, by_run, read_records  # noqa: E402

BUDGET_FILE = "protocol_a_budget.jsonl"
# run name -> its 15-epoch counterpart in protocol_a.jsonl (MEST's interval is scaled with the budget)
RUNS = {
    "dense": "dense",
    "rigl": "rigl",
    "mest-ems-erk-every4": "mest-ems-erk",
    "swat-u80": "swat-u80",
    "swat-erk90": "swat-erk90",
    "random98": "random98",
    "random98-tost": "random98-tost",
}


def sweep(args) -> None:
    """Run the missing runs, ``args.parallel`` at a time."""
    done = {r["run"] for r in read_records(BUDGET_FILE) if r["epochs"] == args.epochs and r["seed"] == 0}
    todo = [n for n in RUNS if n not in done]
    threads = 1 if args.device != "cuda" else 0
    running: list[subprocess.Popen] = []
    for name in todo:
        while True:  # a slot frees when any run ends
            running = [p for p in running if p.poll() is None]
            if len(running) < args.parallel:
                break
            time.sleep(5)
        log = open(ROOT / "benchmarks" / "runs" / f"budget-{name}-e{args.epochs}.log", "a")
        running.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "benchmarks" / "protocol_a.py"),
                    "--data",
                    args.data,
                    "--runs",
                    name,
                    "--epochs",
                    str(args.epochs),
                    "--threads",
                    str(threads),
                    "--device",
                    args.device,
                    "--results",
                    BUDGET_FILE,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        print(f"started {name} ({args.epochs} epochs, {args.device})", flush=True)
    for p in running:
        p.wait()


def accuracies() -> dict[tuple[str, int], float]:
    """Seed-0 test accuracy by (run, epochs): 15 epochs from protocol_a.jsonl, longer budgets from the sweep's file."""
    at15 = by_run(
        [
            r
            for r in read_records("protocol_a.jsonl")
            if r["seed"] == 0 and r["epochs"] == 15 and r.get("model", "resnet20") == "resnet20"
        ]
    )
    accs = {(name, 15): at15[short][-1]["test_acc"] for name, short in RUNS.items() if short in at15}
    for r in read_records(BUDGET_FILE):
        if r["seed"] == 0:
            accs[(r["run"], r["epochs"])] = r["test_acc"]
    return accs


def plot(accs: dict[tuple[str, int], float]) -> Path:
    """Gap to dense (points of test accuracy) against the training budget, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in RUNS:
        if name == "dense":
            continue
        pts = sorted((e, accs[(name, e)] - accs[("dense", e)]) for (n, e) in accs if n == name and ("dense", e) in accs)
        if pts:
            ax.plot([e for e, _ in pts], [g for _, g in pts], "o-", label=name)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set(xlabel="epochs", ylabel="test accuracy - dense (points)", title="Gap to dense against the training budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = RESULTS / "protocol_a_budget.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def table(accs: dict[tuple[str, int], float]) -> Path:
    """A Markdown table of each run's accuracy and gap to dense at every budget recorded (results/protocol_a_budget.md)."""
    budgets = sorted({e for _, e in accs})
    head = "| run | " + " | ".join(f"{e} epochs | gap" for e in budgets) + " |"
    lines = [
        "# Accuracy against training budget (protocol A, ResNet-20, CIFAR-10, seed 0)",
        "",
        "Produced by `python benchmarks/budget_sweep.py --plot` from protocol_a.jsonl (15 epochs) and "
        f"{BUDGET_FILE}. Gap: test accuracy minus dense at the same budget, in points; blank: not run yet.",
        "",
        head,
        "|---|" + "---|---|" * len(budgets),
    ]
    for name in RUNS:
        cells = []
        for e in budgets:
            acc, dense = accs.get((name, e)), accs.get(("dense", e))
            gap = "" if acc is None or dense is None or name == "dense" else f"{acc - dense:+.2f}"
            cells += ["" if acc is None else f"{acc:.2f}", gap]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    out = RESULTS / "protocol_a_budget.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="CIFAR-10 source (e.g. ../shared/data/cifar10-jpeg.tar)")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--plot", action="store_true", help="only draw the plot from the records")
    args = ap.parse_args(argv)
    if not args.plot:
        if not args.data:
            ap.error("--data is required to run the sweep")
        if args.parallel < 1:
            ap.error(f"--parallel must be >= 1, got {args.parallel}")
        sweep(args)
    accs = accuracies()
    print(f"wrote {plot(accs)} and {table(accs)}")


if __name__ == "__main__":
    main()
