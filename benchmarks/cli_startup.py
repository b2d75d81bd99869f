"""How long the command line takes to answer ``--help``: process time (user + system) of ``sparsetrain --help``
and of every subcommand's ``--help``, median of 10 runs each, written to ``results/cli_startup.json``.

    python benchmarks/cli_startup.py

The help imports no torch (the registries are read only when a value is checked), so it should stay far below
half a second.
"""

from __future__ import annotations

import json
import resource
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line, commit, environment  # noqa: E402

COMMANDS = [[], ["train"], ["eval"], ["report"], ["flops"], ["sample"], ["bench"]]


def process_seconds(argv: list[str]) -> float:
    """User + system CPU seconds of one run of ``argv``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    exe = shutil.which("sparsetrain") or sys.exit("the sparsetrain command is not installed (pip install -e .)")
    rows = {}
    for sub in COMMANDS:
        name = " ".join(["sparsetrain", *sub, "--help"])
        rows[name] = round(statistics.median(process_seconds([exe, *sub, "--help"]) for _ in range(10)), 4)
        print(f"{name:<32} {rows[name]:.3f} s")
    out = {
        "what": "process seconds (user + system) of --help, median of 10",
        "seconds": rows,
        "worst": max(rows.values()),
        "command": command_line(),
        "commit": commit(),
        **environment(),
    }
    (RESULTS / "cli_startup.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
