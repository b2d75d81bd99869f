"""Shared helpers of the benchmark scripts: the environment block and the record writer."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from sparsetrain.execution.allocator import freed_memory_kept, keep_freed_memory

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    return {
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "keep_freed_memory": freed_memory_kept(),
    }


def allocator_flag(ap) -> None:
    """``--default-allocator``: time with the C allocator as the process found it. Without it the script keeps freed
    memory for the next step's tensors (``sparsetrain.keep_freed_memory``, as the command line does), for the dense
    and the sparse model alike; records say which (``keep_freed_memory``)."""
    ap.add_argument(
        "--default-allocator",
        action="store_true",
        help="leave glibc's allocator as it is (default: keep freed memory for the next step, as the CLI does)",
    )


def apply_allocator(args) -> None:
    if not args.default_allocator:
        keep_freed_memory()


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def append_record(filename: str, record: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / filename, "a") as f:
        f.write(json.dumps(record) + "\n")


def append_measurement(filename: str, record: dict) -> None:
    """Append ``record`` to ``results/filename``, a JSON list: measurements outside protocols A-F (a kernel's
    bfloat16 time, a loss curve), kept apart from the protocol records (``*.jsonl``) that the record checker reads."""
    path = RESULTS / filename
    records = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps([*records, record], indent=1) + "\n")


def read_records(filename: str, current: bool = False) -> list[dict]:
    """The records of ``results/filename``; ``current`` leaves out those whose ``note`` marks them superseded
    (kept in the file for the record, left out of tables and plots)."""
    path = RESULTS / filename
    if not path.exists():
        return []
    records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return [r for r in records if not (current and r.get("note", "").startswith("superseded"))]


def by_run(records: list[dict]) -> dict[str, list[dict]]:
    """Records grouped by run name (``run``, else ``method``), one entry per seed, in file order."""
    runs: dict[str, list[dict]] = {}
    for r in records:
        runs.setdefault(r.get("run") or r["method"], []).append(r)
    return runs


def mean_acc(records: list[dict]) -> float:
    """Mean final test accuracy over the seeds of one run."""
    return sum(r["test_acc"] for r in records) / len(records)


def acc_cell(records: list[dict]) -> str:
    """A run's accuracy for a table: the value for one seed, else the mean with each seed's value."""
    if len(records) == 1:
        return f"{records[0]['test_acc']:.2f}"
    each = ", ".join(f"s{r['seed']} {r['test_acc']:.2f}" for r in sorted(records, key=lambda r: r["seed"]))
    return f"{mean_acc(records):.2f} ({each})"


def paired_gap(records: list[dict], baseline: list[dict]) -> tuple[float, int] | None:
    """Mean accuracy difference to a baseline run over the seeds both have, and how many seeds that is."""
    base = {r["seed"]: r["test_acc"] for r in baseline}
    diffs = [r["test_acc"] - base[r["seed"]] for r in records if r["seed"] in base]
    return (sum(diffs) / len(diffs), len(diffs)) if diffs else None


def gap_cell(records: list[dict], baseline: list[dict] | None) -> str:
    """A table cell with :func:`paired_gap` in points (signed), empty when no seed is shared."""
    paired = paired_gap(records, baseline) if baseline else None
    return f"{paired[0]:+.2f}" if paired else ""
