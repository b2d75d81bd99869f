"""Plot protocol B: step-time ratio against sparsity per configuration, one PNG per model.

    python benchmarks/plot_protocol_b.py

Uses the newest record of each (model, config, sparsity) in benchmarks/results/protocol_b.jsonl,
leaving out records whose ``note`` marks them superseded, and writes protocol_b-<model>.png beside it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, read_records  # noqa: E402

from sparsetrain.app.bench import BenchResult, plot_bench


def _label(r: dict) -> str:
    """The configuration, with the overrides a record added to it (another distribution is another line)."""
    extra = [e.split(".")[-1] for e in r.get("extra") or []]
    return r["config"] + (f" ({', '.join(extra)})" if extra else "")


def main() -> None:
    newest: dict[tuple, dict] = {}
    for r in read_records("protocol_b.jsonl", current=True):
        newest[(r["model"], _label(r), r["sparsity"])] = r
    for model in sorted({k[0] for k in newest}):
        rows = [
            BenchResult(
                r["model"],
                k[1],
                r["sparsity"],
                r["batch"],
                r["step_ratio"],
                r["step_s_dense_median"],
                r["step_s_sparse_median"],
                r["pairs"],
                r.get("mem_ratio"),
            )
            for k, r in newest.items()
            if k[0] == model
        ]
        print(plot_bench(rows, RESULTS / f"protocol_b-{model}.png"))


if __name__ == "__main__":
    main()
