"""Each condensed kernel's bfloat16 time against its float32 time, on the GPT's Linear shapes (protocol D-speed:
width 512, 16 x 128 tokens, fan-in 90%): forward, input gradient and kept-weight gradient, each the median of
``--calls`` calls, one kernel at a time. One record per kernel and shape in ``results/bf16_kernels.json``.

    python benchmarks/bf16_kernels.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from common import append_measurement, command_line, commit, environment

from sparsetrain.core.schemes import parse_scheme
from sparsetrain.execution import native
from sparsetrain.execution.backends.condensed import CondensedStructure

SHAPES = [(512, 512), (512, 2048), (2048, 512)]  # (in, out): attention projections, MLP up and down


def _has_avx512_bf16() -> bool:
    """Whether the CPU says it has AVX512-BF16 (vdpbf16ps); without it the kernels pair products in float32."""
    try:
        return " avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _median_seconds(fn, calls: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _kernels(x, g, values, rows, out_features):
    """The three kernels on these operands (the weight gradient includes the sum of the workers' parts)."""
    return {
        "forward": lambda: native.condensed_forward(x, values, None, rows, out_features),
        "input_grad": lambda: native.condensed_backward(x, g, values, rows, True, False),
        "weight_grad": lambda: native.condensed_backward(x, g, values, rows, False, True),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    if not native.bf16_kernels():
        raise SystemExit("this build has no bfloat16 kernels (they need AVX-512)")
    g = torch.Generator().manual_seed(0)
    for n_in, n_out in SHAPES:
        mask = parse_scheme("fan_in").mask(torch.rand(n_out, n_in, generator=g), args.density)
        structure = CondensedStructure.from_mask(mask)
        values = torch.randn(int(mask.sum()), generator=g)
        x = torch.randn(args.tokens, n_in, generator=g)
        grad = torch.randn(args.tokens, n_out, generator=g)
        fp32 = _kernels(x, grad, values, structure.rows, n_out)
        bf16 = _kernels(x.bfloat16(), grad.bfloat16(), values, structure.rows, n_out)
        for name in fp32:
            t32, t16 = _median_seconds(fp32[name], args.calls), _median_seconds(bf16[name], args.calls)
            record = {
                "benchmark": "bf16_kernels",
                "kernel": f"condensed {name}",
                "tokens": args.tokens,
                "in": n_in,
                "out": n_out,
                "density": args.density,
                "fp32_ms": round(t32 * 1e3, 3),
                "bf16_ms": round(t16 * 1e3, 3),
                "ratio": round(t16 / t32, 4),
                "avx512_bf16": _has_avx512_bf16(),
                "command": command_line(),
                "commit": commit(),
                **environment(),
            }
            print(json.dumps(record))
            if not args.no_record:
                append_measurement("bf16_kernels.json", record)


if __name__ == "__main__":
    main()
