"""Each kernel's bfloat16 time against its float32 time: the condensed kernels on the GPT's Linear shapes (protocol
D-speed: width 512, 16 x 128 tokens, fan-in 90%) and the channels-last convolution kernels on VGG-16's 3 x 3 layers
(batch 128, 95% sparse): forward, input gradient and kept-weight gradient, each the median of ``--calls`` calls, one
kernel at a time. Beside them, the dense forward product of the same shape (PyTorch's, oneDNN's: on CPUs with AMX
tiles its bfloat16 products run on them) in both dtypes: what the sparse kernels compete with under each. One
record per kernel and shape in ``results/bf16_kernels.json``.

    python benchmarks/bf16_kernels.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import append_measurement, command_line, commit, environment

from sparsetrain.core.schemes import parse_scheme
from sparsetrain.execution import native
from sparsetrain.execution.backends.condensed import CondensedStructure
from sparsetrain.execution.backends.direct import DirectStructure, direct_geometry

SHAPES = [(512, 512), (512, 2048), (2048, 512)]  # (in, out): attention projections, MLP up and down
# VGG-16's channels-last 3 x 3 convolutions at batch 128 (channels, plane side), 95% sparse as in protocol B
CONV_SHAPES = [(64, 32), (128, 16), (256, 8), (512, 4), (512, 2)]


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


def _dense_forward(product, operands: list[torch.Tensor], calls: int) -> dict:
    """``product(*operands)`` (the dense forward) in float32 and in bfloat16, its median ms in each."""
    times = {}
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        args = [t.to(dtype) for t in operands]  # (layouts kept)
        times[f"dense_forward_{label}_ms"] = round(_median_seconds(lambda: product(*args), calls) * 1e3, 3)
    return times


def _kernels(x, g, values, rows, out_features):
    """The three kernels on these operands (the weight gradient includes the sum of the workers' parts)."""
    return {
        "forward": lambda: native.condensed_forward(x, values, None, rows, out_features),
        "input_grad": lambda: native.condensed_backward(x, g, values, rows, True, False),
        "weight_grad": lambda: native.condensed_backward(x, g, values, rows, False, True),
    }


def _conv_kernels(x, g, values, structure, geom, out, gx):
    """The channels-last kernels on these operands (NHWC memory; stride 1, so the input gradient is a forward)."""
    return {
        "forward": lambda: native.nhwc_conv_forward(geom, x, values, None, structure.by_out, out),
        "input_grad": lambda: native.nhwc_conv_input_grad(
            geom, (3, 3), g, values, structure.by_in, structure.by_in_flipped(), gx
        ),
        "weight_grad": lambda: native.nhwc_conv_weight_grad(geom, x, g, structure.by_out, values.numel()),
    }


def _conv_records(batch: int, density: float, calls: int, g: torch.Generator):
    """(kernel, shape fields, float32 seconds, bfloat16 seconds) of each channels-last kernel and VGG-16 shape."""
    for channels, side in CONV_SHAPES:
        mask = torch.rand(channels, channels, 3, 3, generator=g) < density
        structure = DirectStructure.from_mask(mask)
        values = torch.randn(int(mask.sum()), generator=g)
        geom = direct_geometry((batch, channels, side, side), tuple(mask.shape), (1, 1), (1, 1), (1, 1))
        kernels = {}
        for dtype in (torch.float32, torch.bfloat16):
            x, grad = (torch.randn(batch, side, side, channels, generator=g).to(dtype) for _ in range(2))
            out, gx = (torch.empty(batch, side, side, channels, dtype=dtype) for _ in range(2))
            kernels[dtype] = _conv_kernels(x, grad, values, structure, geom, out, gx)
        operands = [
            torch.randn(batch, channels, side, side, generator=g).contiguous(memory_format=torch.channels_last),
            torch.randn(channels, channels, 3, 3, generator=g).contiguous(memory_format=torch.channels_last),
        ]
        dense = _dense_forward(lambda x, w: F.conv2d(x, w, padding=1), operands, calls)
        for name in kernels[torch.float32]:
            t32 = _median_seconds(kernels[torch.float32][name], calls)
            t16 = _median_seconds(kernels[torch.bfloat16][name], calls)
            shape = {"batch": batch, "channels": channels, "plane": [side, side], "kernel_size": [3, 3]}
            yield f"channels-last conv {name}", {**shape, **dense}, t32, t16


def _linear_records(tokens: int, density: float, calls: int, g: torch.Generator):
    """(kernel, shape fields, float32 seconds, bfloat16 seconds) of each condensed kernel and GPT shape."""
    for n_in, n_out in SHAPES:
        mask = parse_scheme("fan_in").mask(torch.rand(n_out, n_in, generator=g), density)
        structure = CondensedStructure.from_mask(mask)
        values = torch.randn(int(mask.sum()), generator=g)
        x = torch.randn(tokens, n_in, generator=g)
        grad = torch.randn(tokens, n_out, generator=g)
        fp32 = _kernels(x, grad, values, structure.rows, n_out)
        bf16 = _kernels(x.bfloat16(), grad.bfloat16(), values, structure.rows, n_out)
        dense = _dense_forward(F.linear, [x, torch.randn(n_out, n_in, generator=g)], calls)
        for name in fp32:
            shape = {"tokens": tokens, "in": n_in, "out": n_out, **dense}
            yield f"condensed {name}", shape, _median_seconds(fp32[name], calls), _median_seconds(bf16[name], calls)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--density", type=float, default=0.1, help="kept share of the Linear layers (fan-in)")
    ap.add_argument("--conv-density", type=float, default=0.05, help="kept share of the convolutions")
    ap.add_argument("--batch", type=int, default=128, help="images per convolution call")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    if not native.bf16_kernels():
        raise SystemExit("this build has no bfloat16 kernels (they need AVX-512)")
    g = torch.Generator().manual_seed(0)
    rows = [
        *((*r, args.density) for r in _linear_records(args.tokens, args.density, args.calls, g)),
        *((*r, args.conv_density) for r in _conv_records(args.batch, args.conv_density, args.calls, g)),
    ]
    for kernel, shape, t32, t16, density in rows:
        record = {
            "benchmark": "bf16_kernels",
            "kernel": kernel,
            **shape,
            "density": density,
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
