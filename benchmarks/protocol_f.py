"""Protocol F (inference after training): the sparse model's inference form against the dense model, in one process.

    python benchmarks/protocol_f.py --model vgg16 --sparsity 0.95
    python benchmarks/protocol_f.py --model resnet50 --sparsity 0.95 --batches 1
    python benchmarks/protocol_f.py --model gpt --sparsity 0.9 --scheme fan_in

The sparse model: the zoo model under ``st.static`` masks (uniform, the first and last layers dense), given back
plain by ``remove()`` (its weights hold the zeros; inference speed does not depend on the values, so it is not
trained). Its inference form is ``st.for_inference(model, example_inputs=<a batch>)``, chosen per batch size;
the dense model is the same architecture with BatchNorm folded alike, under ``torch.inference_mode``. Forward
latency: sparse and dense calls alternate, median of ``--calls`` each (50 at batch 1, 10 at batch 64). The GPT also
generates ``--new-tokens`` tokens from a 128-token prompt (tokens per second, sparse against dense: ``speedup``).
``size_ratio``: the sparse checkpoint (``st.save_sparse``) against ``torch.save`` of the dense state dict. One
record per batch size in ``results/protocol_f.jsonl``.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line, commit, environment  # noqa: E402

import sparsetrain as st  # noqa: E402
from sparsetrain.app.inference import fold_batchnorm  # noqa: E402

SHAPES = {"vgg16": (3, 32, 32), "resnet50": (3, 224, 224)}
GPT = dict(width=4.0, context=128)  # protocol D-speed's GPT (width 512)


def _models(name: str, sparsity: float, scheme: str) -> tuple[nn.Module, nn.Module]:
    """The plain sparse model (zeros from static masks) and a dense one of the same architecture."""
    extra = GPT if name == "gpt" else {}
    torch.manual_seed(0)
    classes = 65 if name == "gpt" else (1000 if name == "resnet50" else 10)
    sparse, dense = (st.build_model(name, classes, **extra) for _ in range(2))
    opt = torch.optim.SGD(sparse.parameters(), lr=0.0)
    return st.static(sparse, opt, sparsity=sparsity, scheme=scheme).remove().eval(), dense.eval()


def _batch(name: str, batch: int) -> torch.Tensor:
    if name == "gpt":
        return torch.randint(0, 65, (batch, GPT["context"]))
    return torch.randn(batch, *SHAPES[name])


def _median_pair(a, b, x, calls: int) -> tuple[float, float]:
    """Median seconds of ``a(x)`` and ``b(x)``, calls alternating (a slow moment falls on both)."""
    ta, tb = [], []
    with torch.inference_mode():
        for _ in range(3):
            a(x), b(x)
        for _ in range(calls):
            t = time.perf_counter()
            a(x)
            ta.append(time.perf_counter() - t)
            t = time.perf_counter()
            b(x)
            tb.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def _size_ratio(sparse: nn.Module, dense: nn.Module) -> float:
    buf = io.BytesIO()
    torch.save(dense.state_dict(), buf)
    with tempfile.TemporaryDirectory() as d:
        path = st.save_sparse(sparse, Path(d) / "m.safetensors")
        return path.stat().st_size / buf.getbuffer().nbytes


def _tokens_per_second(model: nn.Module, new_tokens: int) -> float:
    prompt = torch.randint(0, 65, (1, 128), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        t = time.perf_counter()
        model.generate(prompt, new_tokens, generator=torch.Generator().manual_seed(0))
    return new_tokens / (time.perf_counter() - t)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, choices=["vgg16", "resnet50", "gpt"])
    ap.add_argument("--sparsity", type=float, required=True)
    ap.add_argument("--scheme", default="unstructured")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--new-tokens", type=int, default=256)
    args = ap.parse_args(argv)
    sparse, dense = _models(args.model, args.sparsity, args.scheme)
    size_ratio = _size_ratio(sparse, dense)
    dense_served = fold_batchnorm(dense)
    for batch in args.batches:
        x = _batch(args.model, batch)
        served = st.for_inference(sparse, example_inputs=x)
        with torch.inference_mode():
            torch.testing.assert_close(served(x), fold_batchnorm(sparse)(x), rtol=1e-3, atol=1e-3)
        t_sparse, t_dense = _median_pair(served, dense_served, x, 50 if batch == 1 else 10)
        row = {"protocol": "F", "model": args.model, "config": f"static-{args.scheme}-auto", "sparsity": args.sparsity}
        row |= {"batch": batch, "time_ratio": round(t_sparse / t_dense, 4), "size_ratio": round(size_ratio, 4)}
        row |= {"sparse_s": t_sparse, "dense_s": t_dense, "plan": served.plan}
        if args.model == "gpt" and batch == 1:
            row["speedup"] = round(
                _tokens_per_second(served.model, args.new_tokens) / _tokens_per_second(dense, args.new_tokens), 4
            )
        row |= {"command": command_line(), "commit": commit(), **environment()}
        print(json.dumps({k: v for k, v in row.items() if k != "plan"}), flush=True)
        with open(RESULTS / "protocol_f.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
