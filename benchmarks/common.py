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
    return {"cpu": cpu_model(), "nproc": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def append_record(filename: str, record: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / filename, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_records(filename: str, current: bool = False) -> list[dict]:
    """The records of ``results/filename``; ``current`` leaves out those whose ``note`` marks them superseded
    (kept in the file for the record, left out of tables and plots)."""
    path = RESULTS / filename
    if not path.exists():
        return []
    records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return [r for r in records if not (current and r.get("note", "").startswith("superseded"))]
