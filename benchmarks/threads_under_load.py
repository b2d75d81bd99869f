"""The quickstart's training speed with each thread setting, idle and beside a busy process, so that the setting the
command line takes by default is chosen on figures, not on a guess.

    python benchmarks/threads_under_load.py [--data ../shared/data/tinyshakespeare.txt] [--epochs 1] [--only TEXT]

Each row runs ``sparsetrain train --config configs/quick.yaml`` for ``--epochs`` (one by default) in a fresh process
with one setting (environment variables read by OpenMP when torch loads, or ``run.threads``) under one load: idle,
beside one busy process (``sh -c 'while :; do :; done'``) at normal priority, or beside the same at ``nice -n 19``.
The figure is training steps per second over the run (``step / wall_s`` of its last metrics record, so start-up
and auto's planning are in it as a user sees them). Rows are added to ``results/threads_under_load.json`` as
they land; a row already there for this commit, CPU, setting, load and repeat is skipped (resumable). With
``--repeats N`` the settings alternate N times (the machine's slow moments fall on all of them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, command_line, commit, environment  # noqa: E402

OUT = RESULTS / "threads_under_load.json"  # a JSON list (not a protocol record: no .jsonl)

# name -> (environment for the training process, extra CLI keys); "cli default" is whatever the command line sets
SETTINGS = {
    "cli default": ({}, []),
    "2 threads, spinning (GOMP_SPINCOUNT=300000, libgomp's own)": ({"GOMP_SPINCOUNT": "300000"}, []),
    "2 threads, OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, []),
    "1 thread": ({}, ["run.threads=1"]),
}
LOADS = {"idle": None, "busy": [], "busy, nice 19": ["nice", "-n", "19"]}
BUSY = ["sh", "-c", "while :; do :; done"]


def steps_per_second(env: dict, keys: list[str], data: str, epochs: int) -> float:
    """Train the quickstart for ``epochs`` in a new process; its steps per second, start-up included."""
    exe = shutil.which("sparsetrain") or sys.exit("the sparsetrain command is not installed (pip install -e .)")
    with tempfile.TemporaryDirectory() as out:
        full_env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | env
        argv = [exe, "train", "--config", str(ROOT / "configs" / "quick.yaml"), "--data-dir", data]
        argv += [f"optim.epochs={epochs}", "run.progress=false", f"run.out_dir={out}/run", *keys]
        subprocess.run(argv, check=True, env=full_env, stdout=subprocess.DEVNULL)
        last = json.loads((Path(out) / "run" / "metrics.jsonl").read_text().splitlines()[-1])
        return last["step"] / last["wall_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--only", nargs="+", default=[""], help="run only the settings whose name contains one of these")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over every setting and load (alternating)")
    ap.add_argument("--loads", nargs="+", default=list(LOADS), choices=list(LOADS), help="the loads to run under")
    args = ap.parse_args()
    env_block = environment()
    done = set()
    rows = json.loads(OUT.read_text()) if OUT.exists() else []
    for r in rows:
        done.add((r["commit"], r["cpu"], r["setting"], r["load"], r["epochs"], r.get("repeat", 0)))
    for repeat, load in ((r, load) for r in range(args.repeats) for load in args.loads):
        prefix = LOADS[load]
        for name, (env, keys) in SETTINGS.items():
            key = (commit(), env_block["cpu"], name, load, args.epochs, repeat)
            if not any(text in name for text in args.only) or key in done:
                continue
            busy = None if prefix is None else subprocess.Popen(prefix + BUSY)
            try:
                time.sleep(0.5 if busy else 0)
                rate = steps_per_second(env, keys, args.data, args.epochs)
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
            row = {"benchmark": "threads_under_load", "setting": name, "load": load, "epochs": args.epochs}
            row["repeat"] = repeat
            row |= {"steps_per_s": round(rate, 2), "command": command_line(), "commit": commit(), **env_block}
            print(f"{load:<14} {name:<38} {rate:6.2f} steps/s", flush=True)
            rows.append(row)
            OUT.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
