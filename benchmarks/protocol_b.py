"""Protocol B (and D-speed): training-step time and memory of a sparse configuration against dense, in one process.

    python benchmarks/protocol_b.py --model vgg16 --config swat --sparsity 0.9 --pairs 20
    python benchmarks/protocol_b.py --model gpt --model-args width=4.0 context=128 --batch 16 \
        --config condensed-compact --sparsity 0.9 --extra sparsity.scheme=fan_in

A sequence model (the GPT) makes a D-speed record (``protocol_d_speed.jsonl``): AdamW, random token
windows, the output head dense (see sparsetrain/bench.py).

The timing and the peak-memory processes are those of ``sparsetrain bench`` (see
sparsetrain/bench.py: A B A B median ratio; peak resident memory of each configuration in a
fresh process, following live tensors; ``mem_ratio_training`` subtracts each process's
memory from before the model was built). This script adds the bytes saved for backward,
per module kind, from saved-tensor hooks (what the modules hold between steps left out: parameters, buffers,
a sparse layer's index lists, those reported as ``module_state``), and writes the record.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import allocator_flag, append_record, apply_allocator, command_line, commit, environment  # noqa: E402

from sparsetrain.app.bench import CONFIGS, PEAK_ENV, build, make_step, peak_memory, time_pairs
from sparsetrain.app.config import load_config
from sparsetrain.core.accounting import saved_tensor_bytes_by_module
from sparsetrain.models import SEQUENCE_MODELS, model_input_shape


def _model_args(pairs: list[str]) -> dict:
    """``key=value`` words as zoo keyword arguments (numbers where they parse)."""
    out = {}
    for word in pairs:
        key, sep, value = word.partition("=")
        if not sep:
            raise SystemExit(f"--model-args takes key=value words, got {word!r}")
        try:
            out[key] = int(value)
        except ValueError:
            out[key] = float(value)
    return out


def _state_bytes(model, opt) -> dict:
    """Bytes of the parameters, their gradients and the optimizer's state after a step (each storage once; masks
    and the kernels' index lists apart): the training state beside the activations. SWAT keeps its weights, their
    gradient and momentum dense by design (its dense update can bring pruned weights back); this shows that part."""

    def total(tensors) -> int:
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if torch.is_tensor(t)}
        return sum(storages.values())

    params = list(model.parameters())
    return {
        "weights": total(params),
        "grads": total(p.grad for p in params),
        "optimizer": total(v for state in opt.state.values() for v in state.values()),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vgg16")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--config", default="swat", choices=sorted(CONFIGS))
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--extra",
        nargs="*",
        default=[],
        help="config overrides for the sparse method, e.g. sparsity.swat.topk_period=20",
    )
    ap.add_argument("--model-args", nargs="*", default=[], help="zoo keyword arguments, e.g. width=4.0 context=128")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="both steps under torch.compile(fullgraph=True) (memory and saved bytes from eager steps)",
    )
    ap.add_argument(
        "--bf16",
        action="store_true",
        help="both steps under torch.autocast('cpu', dtype=torch.bfloat16) (memory and saved bytes from float32 steps)",
    )
    ap.add_argument("--no-record", action="store_true")
    allocator_flag(ap)
    args = ap.parse_args(argv)
    apply_allocator(args)

    shape = model_input_shape(args.model)
    margs = _model_args(args.model_args)
    dense, dopt, _ = build(args.model, "dense", model_args=margs)
    sparse, sopt, method = build(args.model, args.config, args.sparsity, args.extra, margs)
    # the timed steps first: ``auto`` plans on the first one made, which for --bf16 must run under its autocast
    steps = {
        "dense": make_step(dense, dopt, None, args.batch, "dense", shape, args.compile, args.bf16),
        "sparse": make_step(sparse, sopt, method, args.batch, args.config, shape, args.compile, args.bf16),
    }
    eager = steps
    if args.compile or args.bf16:  # saved bytes from eager float32 steps, on the same plan
        eager = {
            "dense": make_step(dense, dopt, None, args.batch, "dense", shape),
            "sparse": make_step(sparse, sopt, method, args.batch, args.config, shape),
        }
    saved_dense = saved_tensor_bytes_by_module(eager["dense"], dense)
    saved_sparse = saved_tensor_bytes_by_module(eager["sparse"], sparse)
    # with the lossless activation savings on, dense training with the same savings is the second baseline
    lossless = load_config(
        overrides=[*CONFIGS[args.config], "sparsity.sparsity=0.5", *args.extra]
    ).sparsity.lossless_activations
    if lossless:
        ldense, lopt, lmethod = build(args.model, "dense-lossless", model_args=margs)
        saved_lossless = saved_tensor_bytes_by_module(
            make_step(ldense, lopt, lmethod, args.batch, "dense-lossless", shape), ldense
        )
        del ldense, lopt, lmethod
    t_dense, t_sparse = time_pairs(steps["dense"], steps["sparse"], args.pairs, args.warmup)
    ratios = [s / d for d, s in zip(t_dense, t_sparse)]
    # the path each sparse layer took in the last step (swapped layers and SWAT's alike)
    chosen = {n: m.ran for n, m in sparse.named_modules() if isinstance(getattr(m, "ran", None), str)}
    state = {"dense": _state_bytes(dense, dopt), args.config: _state_bytes(sparse, sopt)}
    del dense, dopt, sparse, sopt, method, steps
    peaks = {
        "dense": peak_memory(args.model, "dense", 0.0, args.batch, model_args=margs),
        args.config: peak_memory(args.model, args.config, args.sparsity, args.batch, args.extra, model_args=margs),
    }
    if lossless:
        peaks["dense-lossless"] = peak_memory(args.model, "dense-lossless", 0.0, args.batch, model_args=margs)
    layer_in = lambda s: s.get("Conv2d", 0) + s.get("Linear", 0)  # noqa: E731
    sequence = args.model in SEQUENCE_MODELS
    record = {
        "protocol": "D-speed" if sequence else "B",
        "model": args.model,
        "model_args": margs,
        "batch": args.batch,
        "config": args.config,
        "sparsity": args.sparsity,
        "step_ratio": round(statistics.median(ratios), 4),
        "step_ratio_mean": round(sum(t_sparse) / sum(t_dense), 4),  # every step's cost, mask updates included
        "mem_ratio": round(peaks[args.config]["peak"] / peaks["dense"]["peak"], 4),
        "mem_ratio_training": round(
            (peaks[args.config]["peak"] - peaks[args.config]["base"])
            / (peaks["dense"]["peak"] - peaks["dense"]["base"]),
            4,
        ),
        "peak_bytes": {k: v["peak"] for k, v in peaks.items()},
        "peak_env": PEAK_ENV,
        "saved_bytes_ratio": round(saved_sparse["total"] / saved_dense["total"], 4),
        "layer_input_saved_bytes_ratio": round(layer_in(saved_sparse) / layer_in(saved_dense), 4),
        "state_bytes": state,
        "saved_bytes_dense": saved_dense,
        "saved_bytes_sparse": saved_sparse,
        "step_s_dense_median": round(statistics.median(t_dense), 4),
        "step_s_sparse_median": round(statistics.median(t_sparse), 4),
        "lossless_activations": lossless,
        **(
            {
                "mem_ratio_vs_lossless_dense": round(peaks[args.config]["peak"] / peaks["dense-lossless"]["peak"], 4),
                "saved_bytes_ratio_vs_lossless_dense": round(saved_sparse["total"] / saved_lossless["total"], 4),
                "saved_bytes_dense_lossless": saved_lossless["total"],
            }
            if lossless
            else {}
        ),
        "pairs": args.pairs,
        "compile": args.compile,
        **({"dtype": "bf16", "memory_dtype": "fp32"} if args.bf16 else {}),
        "extra": args.extra,
        "paths": dict(sorted(collections.Counter(chosen.values()).items())),
        "command": command_line(),
        "commit": commit(),
        **environment(),
    }
    print(json.dumps(record))
    if not args.no_record:
        append_record("protocol_d_speed.jsonl" if sequence else "protocol_b.jsonl", record)


if __name__ == "__main__":
    main()
