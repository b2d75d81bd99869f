"""The headline figures table, generated from the records (never copied by hand).

    python benchmarks/figures.py            # print the table (Markdown)
    python benchmarks/figures.py --readme   # rewrite the table between the markers in README.md

One row per command of ``real_speed_sweep.py`` (protocol B and D-speed), one column pair (step / dense, peak memory
/ dense) per CPU class, each from the latest valid record of that command on that CPU (a record whose per-pair mean
is more than 10% away from its median was disturbed and does not count), with the commit it ran at. The docs site
includes the same table (``{{ figures_table }}`` in its pages, filled by ``docs/hooks.py``); a test keeps the
README's copy equal to it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, read_records  # noqa: E402
from real_speed_sweep import ROWS, command_of  # noqa: E402

START, END = "<!-- figures:start (python benchmarks/figures.py --readme) -->", "<!-- figures:end -->"
CPU_CLASSES = {"AMD EPYC": "AMD EPYC", "Intel": "Intel Xeon"}  # a record's cpu field -> its class


def cpu_class(cpu: str) -> str:
    """The CPU class of a record's ``cpu`` (its first matching prefix; the field itself otherwise)."""
    return next((label for prefix, label in CPU_CLASSES.items() if cpu.startswith(prefix)), cpu)


def valid(record: dict) -> bool:
    """Whether a timing record counts: its per-pair mean within 10% of its median."""
    median, mean = record.get("step_ratio"), record.get("step_ratio_mean")
    return median is not None and (mean is None or abs(mean - median) <= 0.1 * median)


def label(row: list[str]) -> str:
    """A short name for a sweep row: model (width, batch), configuration, sparsity, extra keys."""
    args: dict[str, list[str]] = {}
    for token in row:
        if token.startswith("--"):
            key = token
            args[key] = []
        else:
            args[key].append(token)
    model = args["--model"][0]
    width = [a.split("=")[1] for a in args.get("--model-args", []) if a.startswith("width=")]
    model += f" width x{width[0]}" if width else ""
    model += f" batch {args['--batch'][0]}" if "--batch" in args else ""
    extra = ", ".join(args.get("--extra", []))
    compiled = (", torch.compile" if "--compile" in args else "") + (", bf16 autocast" if "--bf16" in args else "")
    name = f"{model}, {args['--config'][0]} {float(args['--sparsity'][0]):.0%}{compiled}"
    return name + (f" ({extra})" if extra else "")


def table(records: list[dict] | None = None) -> str:
    """The Markdown table of the latest valid figures per sweep row and CPU class."""
    if records is None:
        records = [*read_records("protocol_b.jsonl"), *read_records("protocol_d_speed.jsonl")]
    latest: dict[tuple[str, str], dict] = {}
    for r in records:
        if "command" in r and "cpu" in r and valid(r):
            latest[(r["command"], cpu_class(r["cpu"]))] = r  # later lines are newer
    classes = sorted({c for _, c in latest})
    head = "| row | " + " | ".join(f"{c}: step / dense | {c}: memory / dense" for c in classes) + " |"
    lines = [head, "|---" * (1 + 2 * len(classes)) + "|"]
    for row in ROWS:
        cells = []
        for c in classes:
            r = latest.get((command_of(row), c))
            if r is None:
                cells += ["—", "—"]
            else:
                mem = r.get("mem_ratio")
                cells += [f"{r['step_ratio']:.2f} (`{r['commit']}`)", "—" if mem is None else f"{mem:.2f}"]
        lines.append(f"| {label(row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_block() -> str:
    """The README's generated block, markers included."""
    return f"{START}\n{table()}\n{END}"


def write_readme(path: Path = ROOT / "README.md") -> None:
    """Replace the block between the markers in ``path`` with the current table."""
    text = path.read_text()
    a, b = text.index(START), text.index(END) + len(END)
    path.write_text(text[:a] + readme_block() + text[b:])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readme", action="store_true", help="rewrite the table in README.md")
    args = ap.parse_args(argv)
    if args.readme:
        write_readme()
    else:
        print(table())


if __name__ == "__main__":
    main()
