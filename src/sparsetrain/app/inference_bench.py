"""Protocol F's measurement (inference after training), shared by ``sparsetrain bench --inference`` and
``benchmarks/protocol_f.py``: a zoo model under static masks in its inference form (:func:`~sparsetrain.for_inference`)
against the dense model of the same architecture, in one process.

The sparse model: the zoo model under ``st.static`` masks (uniform, the first and last layers dense), given back
plain by ``remove()`` (its weights hold the zeros; inference speed does not depend on the values, so it is not
trained). Its inference form is chosen per batch size; the dense model has BatchNorm folded alike and runs under
``torch.inference_mode``. Forward latency: sparse and dense calls alternate in blocks of five (records say
``alternation``; earlier records alternated single calls), median of 50 calls each at batch 1, 10 above. The GPT also generates ``new_tokens`` tokens from a 128-token prompt (``speedup``: tokens per second, sparse
against dense). ``size_ratio``: the sparse checkpoint against ``torch.save`` of the dense state dict.
"""

from __future__ import annotations

import io
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from ..methods.static import static
from ..models import build_model
from .artifact import save_sparse
from .inference import fold_batchnorm, for_inference

__all__ = ["INFERENCE_MODELS", "run_inference_bench"]

IMAGE_INPUTS = {"vgg16": (3, 32, 32), "resnet50": (3, 224, 224)}  # one image, C x H x W
INFERENCE_MODELS = (*IMAGE_INPUTS, "gpt")
GPT = dict(width=4.0, context=128)  # protocol D-speed's GPT (width 512)


def _models(name: str, sparsity: float, scheme: str) -> tuple[nn.Module, nn.Module]:
    """The plain sparse model (zeros from static masks) and a dense one of the same architecture."""
    extra = GPT if name == "gpt" else {}
    torch.manual_seed(0)
    classes = 65 if name == "gpt" else (1000 if name == "resnet50" else 10)
    sparse, dense = (build_model(name, classes, **extra) for _ in range(2))
    opt = torch.optim.SGD(sparse.parameters(), lr=0.0)
    return static(sparse, opt, sparsity=sparsity, scheme=scheme).remove().eval(), dense.eval()


def _batch(name: str, batch: int) -> torch.Tensor:
    if name == "gpt":
        return torch.randint(0, 65, (batch, GPT["context"]))
    return torch.randn(batch, *IMAGE_INPUTS[name])


BLOCK = 5  # calls of one model in a row (see _median_pair)


def _median_pair(a, b, x, calls: int, block: int = BLOCK) -> tuple[float, float]:
    """Median seconds of ``a(x)`` and ``b(x)`` over ``calls`` calls each, in alternating blocks of ``block`` calls
    (A A A A A B B B B B ...): a slow stretch of the machine falls on both, and each model is timed as it is served,
    one request after another, its weights and lists in cache. With single calls alternating, every call of the
    small sparse model started from caches the dense model had just filled with its own weights."""
    ta, tb = [], []
    with torch.inference_mode():
        for _ in range(3):
            a(x), b(x)
        for _ in range(-(-calls // block)):
            for model, times in ((a, ta), (b, tb)):
                for _ in range(block):
                    t = time.perf_counter()
                    model(x)
                    times.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def _size_ratio(sparse: nn.Module, dense: nn.Module) -> float:
    buf = io.BytesIO()
    torch.save(dense.state_dict(), buf)
    with tempfile.TemporaryDirectory() as d:
        path = save_sparse(sparse, Path(d) / "m.safetensors")
        return path.stat().st_size / buf.getbuffer().nbytes


def _tokens_per_second(model: nn.Module, new_tokens: int) -> float:
    prompt = torch.randint(0, 65, (1, 128), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        t = time.perf_counter()
        model.generate(prompt, new_tokens, generator=torch.Generator().manual_seed(0))
    return new_tokens / (time.perf_counter() - t)


def run_inference_bench(
    name: str, sparsity: float, scheme: str = "unstructured", batches=(1, 64), new_tokens: int = 256
) -> list[dict]:
    """Protocol F for zoo model ``name`` (:data:`INFERENCE_MODELS`): one row per batch size, with
    ``time_ratio``, ``size_ratio``, the medians, the plan and (the GPT at batch 1) ``speedup``."""
    if name not in INFERENCE_MODELS:
        raise ValueError(f"inference benchmark model {name!r}: choose one of {sorted(INFERENCE_MODELS)}")
    sparse, dense = _models(name, sparsity, scheme)
    size_ratio = _size_ratio(sparse, dense)
    dense_served = fold_batchnorm(dense)
    rows = []
    for batch in batches:
        x = _batch(name, batch)
        served = for_inference(sparse, example_inputs=x)
        with torch.inference_mode():
            torch.testing.assert_close(served(x), fold_batchnorm(sparse)(x), rtol=1e-3, atol=1e-3)
        t_sparse, t_dense = _median_pair(served, dense_served, x, 50 if batch == 1 else 10)
        row = {"protocol": "F", "model": name, "config": f"static-{scheme}-auto", "sparsity": sparsity, "batch": batch}
        row["alternation"] = f"blocks of {BLOCK} calls"
        row |= {"time_ratio": round(t_sparse / t_dense, 4), "size_ratio": round(size_ratio, 4)}
        row |= {"sparse_s": t_sparse, "dense_s": t_dense, "plan": served.plan}
        if name == "gpt" and batch == 1:
            row["speedup"] = round(
                _tokens_per_second(served.model, new_tokens) / _tokens_per_second(dense, new_tokens), 4
            )
        rows.append(row)
    return rows
