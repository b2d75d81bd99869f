"""How close the condensed Linear kernels run to what one core allows: their multiply-add rate on the GPT's shapes
(one thread, fan-in 90%) against the core's own rates for the kernels' inner loop with every row in the
first-level cache (``load_ceiling.c``: register peak; one load per multiply-add; the kernel's listed loop; rows
sharing their input; and, where the CPU has AVX512-BF16, ``vdpbf16ps`` on registers and the bfloat16 kernels'
listed loop). One record in ``results/load_ceiling.json``.

    python benchmarks/load_ceiling.py

Each kept weight multiplies its own input row, so the products make one vector load per vector multiply-add; a
dense product reuses each load across a register tile (MKL: about 0.7 of the register peak). Needs AVX-512 and a C
compiler (``$CC``, else ``cc``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from common import append_measurement, command_line, commit, environment

from sparsetrain.core.schemes import parse_scheme
from sparsetrain.execution import native
from sparsetrain.execution.backends.condensed import CondensedStructure

HERE = Path(__file__).resolve().parent
SHAPES = [(512, 512), (512, 2048), (2048, 512)]  # (in, out): attention projections, MLP up and down
LANES = 16  # floats a vector multiply-add takes with AVX-512


def core_rates() -> dict:
    """``load_ceiling.c``'s rates in vector multiply-adds per nanosecond (one thread)."""
    with tempfile.TemporaryDirectory() as d:
        exe = Path(d) / "load_ceiling"
        subprocess.run(
            [*native.compiler(), "-O2", "-march=native", str(HERE / "load_ceiling.c"), "-o", str(exe)], check=True
        )
        out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    rates = json.loads(out)
    rates.pop("checksum")
    return rates


def _best_seconds(fn, calls: int) -> float:
    fn()
    best = float("inf")
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def kernel_rates(tokens: int, density: float, calls: int) -> dict:
    """The condensed kernels' vector multiply-adds per nanosecond, whole calls (transposes included), one thread."""
    g = torch.Generator().manual_seed(0)
    rates = {}
    for n_in, n_out in SHAPES:
        mask = parse_scheme("fan_in").mask(torch.rand(n_out, n_in, generator=g), density)
        rows = CondensedStructure.from_mask(mask).rows
        values = torch.randn(int(mask.sum()), generator=g)
        x, grad = torch.randn(tokens, n_in, generator=g), torch.randn(tokens, n_out, generator=g)
        fmas = values.numel() * tokens / LANES
        fwd = _best_seconds(lambda: native.condensed_forward(x, values, None, rows, n_out), calls)
        both = _best_seconds(lambda: native.condensed_backward(x, grad, values, rows, True, True), calls)
        rates[f"{n_in}x{n_out}"] = {
            "forward": round(fmas / fwd / 1e9, 3),
            "both_grads": round(2 * fmas / both / 1e9, 3),
        }
    return rates


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    if " avx512f" not in Path("/proc/cpuinfo").read_text():
        raise SystemExit("this measurement is written for AVX-512 (16-float vectors), which this CPU does not have")
    torch.set_num_threads(1)
    record = {
        "benchmark": "load_ceiling",
        "unit": "vector multiply-adds per ns, one thread",
        "core": core_rates(),
        "kernels": kernel_rates(args.tokens, args.density, args.calls),
        "tokens": args.tokens,
        "density": args.density,
        "command": command_line(),
        "commit": commit(),
        **environment(),
    }
    print(json.dumps(record, indent=1))
    if not args.no_record:
        append_measurement("load_ceiling.json", record)


if __name__ == "__main__":
    main()
