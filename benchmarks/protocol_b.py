"""Protocol B: training-step time and memory of a sparse configuration against dense, in one process.

    python benchmarks/protocol_b.py --model vgg16 --config swat --sparsity 0.9 --pairs 20

Warms up, then alternates one dense and one sparse training step (forward, backward,
SGD step with momentum, plus the method's own per-step work at its real frequency),
and records the median of the per-pair ratios sparse/dense. Bytes saved for backward
come from saved-tensor hooks (parameters left out); peak resident memory of each
configuration is measured in a fresh process of its own, with glibc's mmap threshold fixed
(PEAK_ENV) so that freed tensors leave the resident set; ``mem_ratio_training`` subtracts each
process's resident memory from before the model was built (the library itself). Inputs are random tensors of
CIFAR shape: data loading is the same for both and is left out.
"""

from __future__ import annotations

import argparse
import os
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_record, command_line, commit, environment  # noqa: E402

from sparsetrain.accounting import peak_memory_bytes, saved_tensor_bytes_by_module
from sparsetrain.backends import apply_backend
from sparsetrain.config import load_config
from sparsetrain.methods import SetupContext, build_method
from sparsetrain.models import build_model

# glibc keeps freed blocks below its (self-raising) mmap threshold resident, so the peak RSS of a
# process would show its allocator's high-water mark, not the tensors alive at once. A fixed
# threshold returns every large freed tensor to the OS: the peak RSS then follows live memory.
PEAK_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def make(model_name: str, config: str, sparsity: float, extra: list[str], steps_per_epoch: int = 391):
    """A model, its optimizer and method for ``config`` ("dense" or a sparse configuration)."""
    torch.manual_seed(0)
    model = build_model(model_name, 10).to(memory_format=memory_format(config))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    method = None
    if config != "dense":
        overrides = {"swat": ["sparsity.method=swat"], "masked": ["sparsity.method=static"],
                     "csr": ["sparsity.method=static", "sparsity.backend=csr"],
                     "direct": ["sparsity.method=static", "sparsity.backend=direct"],
                     "auto": ["sparsity.method=static", "sparsity.backend=auto"]}[config]
        cfg = load_config(overrides=[*overrides, f"sparsity.sparsity={sparsity}", *extra])
        method = build_method(cfg)
        method.setup(SetupContext(model, opt, torch.Generator().manual_seed(0), (3, 32, 32), steps_per_epoch, 1))
        if cfg.sparsity.backend != "masked":
            apply_backend(model, method.maskset, cfg.sparsity.backend)
    return model, opt, method


def memory_format(config: str):
    """Each configuration in its faster layout: the direct kernels work on NCHW, oneDNN's dense convolutions
    (dense, masked, SWAT, and the CSR path's unfolding) are faster channels-last here."""
    return torch.contiguous_format if config in ("direct", "auto") else torch.channels_last


def step_fn(model, opt, method, x, y):
    state = {"step": 0}

    def step():
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if method:
            method.before_step(state["step"], opt)
        opt.step()
        state["step"] += 1
        if method:
            method.after_step(state["step"], opt)

    return step


def measure_peak(args) -> None:
    """Child-process mode: a few steps of one configuration, then print the peak RSS (and the RSS before the model)."""
    base = peak_memory_bytes()
    model, opt, method = make(args.model, args.peak, args.sparsity, args.extra)
    x = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=memory_format(args.peak))
    y = torch.randint(0, 10, (args.batch,))
    step = step_fn(model, opt, method, x, y)
    for _ in range(3):
        step()
    print(json.dumps({"peak": peak_memory_bytes(), "base": base}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vgg16")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--config", default="swat", choices=["swat", "masked", "csr", "direct", "auto"])
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--extra", nargs="*", default=[], help="config overrides for the sparse method, e.g. sparsity.swat.topk_period=20")
    ap.add_argument("--peak", help=argparse.SUPPRESS)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    if args.peak:
        return measure_peak(args)

    x = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))
    dense, dopt, _ = make(args.model, "dense", 0.0, [])
    sparse, sopt, method = make(args.model, args.config, args.sparsity, args.extra)
    steps = {"dense": step_fn(dense, dopt, None, x, y),
             "sparse": step_fn(sparse, sopt, method, x.contiguous(memory_format=memory_format(args.config)), y)}
    saved_dense = saved_tensor_bytes_by_module(steps["dense"], dense)
    saved_sparse = saved_tensor_bytes_by_module(steps["sparse"], sparse)
    for _ in range(args.warmup):
        steps["dense"]()
        steps["sparse"]()
    ratios, times = [], {"dense": [], "sparse": []}
    for _ in range(args.pairs):
        for name in ("dense", "sparse"):
            t = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t)
        ratios.append(times["sparse"][-1] / times["dense"][-1])
    peaks = {}
    for name in ("dense", args.config):
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--sparsity",
                              str(args.sparsity), "--peak", name, "--extra", *args.extra], capture_output=True, text=True,
                             check=True, env={**os.environ, **PEAK_ENV})
        peaks[name] = json.loads(out.stdout.strip().splitlines()[-1])
    layer_in = lambda s: s.get("Conv2d", 0) + s.get("Linear", 0)  # noqa: E731
    record = {
        "protocol": "B", "model": args.model, "batch": args.batch, "config": args.config, "sparsity": args.sparsity,
        "step_ratio": round(statistics.median(ratios), 4),
        "mem_ratio": round(peaks[args.config]["peak"] / peaks["dense"]["peak"], 4),
        "mem_ratio_training": round((peaks[args.config]["peak"] - peaks[args.config]["base"])
                                    / (peaks["dense"]["peak"] - peaks["dense"]["base"]), 4),
        "peak_bytes": {k: v["peak"] for k, v in peaks.items()}, "peak_env": PEAK_ENV,
        "saved_bytes_ratio": round(saved_sparse["total"] / saved_dense["total"], 4),
        "layer_input_saved_bytes_ratio": round(layer_in(saved_sparse) / layer_in(saved_dense), 4),
        "saved_bytes_dense": saved_dense, "saved_bytes_sparse": saved_sparse,
        "step_s_dense_median": round(statistics.median(times["dense"]), 4),
        "step_s_sparse_median": round(statistics.median(times["sparse"]), 4),
        "pairs": args.pairs, "extra": args.extra,
        "command": command_line(), "commit": commit(), **environment(),
    }
    print(json.dumps(record))
    if not args.no_record:
        append_record("protocol_b.jsonl", record)


if __name__ == "__main__":
    main()
