"""Does sparsity buy time and memory here? Training-step time and peak memory of sparse configurations
against dense, measured the way the benchmark protocol asks (``sparsetrain bench``).

Time: one process holds the dense model and the sparse one; after a warm-up it alternates one
dense and one sparse training step (forward, backward, SGD step with momentum, plus the
method's own per-step work at its real frequency), A B A B, and reports the median of the
per-pair ratios sparse/dense, so slow drifts of the machine hit both alike.

Memory: each configuration trains a few steps in a fresh process of its own, whose peak
resident set is read from the kernel (the process's own high-water mark). glibc's mmap
threshold is fixed there (:data:`PEAK_ENV`), so freed tensors leave the resident set and
the peak follows the tensors alive at once rather than the allocator's high-water mark.

Inputs are random tensors of the dataset's shape (random token ids for the sequence models):
data loading is the same for every configuration and is left out. Vision models step with SGD
(momentum 0.9, as protocol B); sequence models with AdamW and their output head dense (protocol D).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.accounting import peak_memory_bytes
from ..execution.backends import get_backend
from ..execution.plan import LAYOUTS
from ..methods import METHODS
from ..models import SEQUENCE_MODELS, build_model, model_input_shape
from .config import load_config
from .report import save_figure

__all__ = [
    "CONFIGS",
    "PEAK_ENV",
    "BenchResult",
    "build",
    "make_step",
    "memory_format",
    "time_pairs",
    "peak_memory",
    "run_bench",
    "plot_bench",
    "results_json",
]

BASELINE = "dense"  # the configuration every other is timed against (plain dense training)
# configuration -> config overrides (besides the sparsity); BASELINE is not among them
CONFIGS: dict[str, list[str]] = {
    "masked": ["sparsity.method=static"],
    "csr": ["sparsity.method=static", "sparsity.backend=csr"],
    "direct": ["sparsity.method=static", "sparsity.backend=direct"],
    "compact": ["sparsity.method=static", "sparsity.backend=direct", "sparsity.compact_state=true"],
    # RigL (ERK, an update every 100 steps, full weight gradients on those steps only) and MEST with the soft
    # bound, both storing only kept weights; a window of over 100 pairs holds an update step
    "rigl-compact": [
        "sparsity.method=rigl",
        "sparsity.distribution=erk",
        "sparsity.backend=direct",
        "sparsity.compact_state=true",
    ],
    "mest-compact": [
        "sparsity.method=mest",
        "sparsity.mest.soft_bound=true",
        "sparsity.backend=direct",
        "sparsity.compact_state=true",
    ],
    "condensed": ["sparsity.method=static", "sparsity.backend=condensed"],
    "condensed-compact": ["sparsity.method=static", "sparsity.backend=condensed", "sparsity.compact_state=true"],
    "channel": ["sparsity.method=static", "sparsity.scheme=channel_out", "sparsity.backend=channel"],
    "channel-both": [
        "sparsity.method=static",
        "sparsity.scheme=channel_out",
        "sparsity.backend=channel",
        "sparsity.channel_both_sides=true",
    ],
    "channel-both-compact": [
        "sparsity.method=static",
        "sparsity.scheme=channel_out",
        "sparsity.backend=channel",
        "sparsity.channel_both_sides=true",
        "sparsity.compact_state=true",
    ],
    "auto": ["sparsity.method=static", "sparsity.backend=auto"],
    "auto-compact": ["sparsity.method=static", "sparsity.backend=auto", "sparsity.compact_state=true"],
    "rigl-auto-compact": [
        "sparsity.method=rigl",
        "sparsity.distribution=erk",
        "sparsity.backend=auto",
        "sparsity.compact_state=true",
    ],
    "swat": ["sparsity.method=swat"],
    "swat-auto": ["sparsity.method=swat", "sparsity.backend=auto"],
    # dense training with the lossless activation savings: the baseline that shows what sparsity itself saves
    "dense-lossless": ["sparsity.method=dense", "sparsity.lossless_activations=true"],
}

# glibc keeps freed blocks below its (self-raising) mmap threshold resident; a fixed threshold
# returns every large freed tensor to the OS, so the peak RSS follows live memory.
PEAK_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _overrides(config: str, sparsity: float) -> list[str]:
    """The config overrides of ``config`` at ``sparsity`` (a dense method takes no sparsity)."""
    return CONFIGS[config] + ([] if "sparsity.method=dense" in CONFIGS[config] else [f"sparsity.sparsity={sparsity}"])


def memory_format(config: str) -> torch.memory_format:
    """The layout a configuration's model starts in: channels-last where its backend runs it (oneDNN's dense
    convolutions and the direct kernels' channels-last form are fastest so on CPUs), else NCHW; ``auto`` then
    takes the layout its plan chose."""
    if config == BASELINE:
        return torch.channels_last
    backend = get_backend(load_config(overrides=_overrides(config, 0.5)).sparsity.backend)
    return torch.channels_last if "channels_last" in backend.layouts else torch.contiguous_format


def build(model_name: str, config: str, sparsity: float = 0.0, extra: list[str] = (), model_args: dict | None = None):
    """(model, optimizer, method or None) for ``config``: "dense" or a key of :data:`CONFIGS`; the model
    takes the input of its usual dataset (CIFAR-size for the CIFAR zoo); ``model_args`` go to the zoo
    (e.g. a GPT's ``width`` and ``context``). The method is built by its public factory, with the config's
    execution as the factory's ``execution=`` (``auto`` chooses on :func:`make_step`'s batch)."""
    if config != BASELINE and config not in CONFIGS:
        raise ValueError(f"unknown configuration {config!r}; choose dense or one of {sorted(CONFIGS)}")
    torch.manual_seed(0)
    model = build_model(model_name, **(model_args or {}))
    sequence = model_name in SEQUENCE_MODELS
    if sequence:
        decay = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1
        )
    else:
        model = model.to(memory_format=memory_format(config))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    method = None
    if config != BASELINE:
        layers_default = ["sparsity.dense_layers=[last]"] if sequence else []  # embeddings, LayerNorms, head dense
        sparse = "sparsity.method=dense" not in CONFIGS[config]
        cfg = load_config(overrides=[*_overrides(config, sparsity), *(layers_default if sparse else []), *extra])
        sc = cfg.sparsity
        method = METHODS[sc.method](
            model,
            opt,
            steps_per_epoch=391,
            epochs=1,
            **sc.method_kwargs(),
            execution=sc.execution_options(),
        )
    return model, opt, method


def make_step(
    model,
    opt,
    method,
    batch: int,
    config: str = BASELINE,
    input_shape: tuple[int, ...] = (3, 32, 32),
    compiled: bool = False,
    bf16: bool = False,
):
    """A function running one training step on a fixed random batch of ``input_shape`` images, or, for a model
    with a ``context`` (the GPT), of random token windows with next-token targets. A method whose plan waits
    for a batch (``auto``) makes it on this one. ``compiled``: the model's forward (and so its backward) under
    ``torch.compile(fullgraph=True)``, after one eager step (in which sparse layers build their lists); the
    optimizer step and the method's work around it stay eager. ``bf16``: the forward and the loss under
    ``torch.autocast("cpu", dtype=torch.bfloat16)`` (float32 weights and optimizer state, as mixed precision
    trains), and ``auto``'s plan timed under it too, as a training loop's first forward would (on CPUs with AMX
    tiles a dense bfloat16 product can beat a sparse kernel that wins in float32)."""
    g = torch.Generator().manual_seed(1)
    context = getattr(model, "context", None)
    if context is not None:
        vocab = model.tok.num_embeddings
        x = torch.randint(0, vocab, (batch, context), generator=g)
        y = torch.randint(0, vocab, (batch, context), generator=g)
    else:
        x = torch.randn(batch, *input_shape, generator=g).contiguous(memory_format=memory_format(config))
        model.eval()
        with torch.no_grad():
            num_classes = model(x[:2]).shape[-1]
        model.train()
        y = torch.randint(0, num_classes, (batch,), generator=g)
    if method is not None and method.plan is None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # auto times what the steps will run
            method.choose_execution(x)
    if method is not None and method.plan.layout is not None:
        x = x.contiguous(memory_format=LAYOUTS[method.plan.layout])  # once here, not in the model's input hook

    run = model

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = run(x)
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()  # the method's per-step work runs in here

    if compiled:
        step()
        run = torch.compile(model, fullgraph=True)
    return step


def time_pairs(dense_step, sparse_step, pairs: int, warmup: int) -> tuple[list[float], list[float]]:
    """Seconds per step of each, alternated A B A B after ``warmup`` steps of each."""
    for _ in range(warmup):
        dense_step()
        sparse_step()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(pairs):
        for step, out in ((dense_step, times[0]), (sparse_step, times[1])):
            t = time.perf_counter()
            step()
            out.append(time.perf_counter() - t)
    return times


def peak_memory(
    model_name: str,
    config: str,
    sparsity: float,
    batch: int,
    extra: list[str] = (),
    steps: int = 3,
    model_args: dict | None = None,
) -> dict:
    """Peak resident bytes of a fresh process training ``steps`` steps of ``config``, and its bytes before the model."""
    cmd = [
        sys.executable,
        "-m",
        "sparsetrain.app.bench",
        "--peak",
        model_name,
        config,
        str(sparsity),
        str(batch),
        str(steps),
        json.dumps(model_args or {}),
        *extra,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **PEAK_ENV})
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory run of {config} failed: {done.stderr.strip()[-800:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _peak_child(
    model_name: str, config: str, sparsity: str, batch: str, steps: str, model_args: str, *extra: str
) -> None:
    base = peak_memory_bytes()
    model, opt, method = build(model_name, config, float(sparsity), list(extra), json.loads(model_args))
    step = make_step(model, opt, method, int(batch), config, model_input_shape(model_name))
    for _ in range(int(steps)):
        step()
    print(json.dumps({"peak": peak_memory_bytes(), "base": base}))


@dataclass
class BenchResult:
    """One configuration at one sparsity against dense."""

    model: str
    config: str
    sparsity: float
    batch: int
    step_ratio: float
    step_s_dense: float
    step_s_sparse: float
    pairs: int
    mem_ratio: float | None = None
    mem_ratio_training: float | None = None
    peak_bytes: dict = field(default_factory=dict)
    backends: dict | None = None


def run_bench(
    model_name: str,
    configs: list[str],
    sparsities: list[float],
    batch: int = 128,
    pairs: int = 10,
    warmup: int = 3,
    extra: list[str] = (),
    memory: bool = True,
    progress: bool = True,
) -> list[BenchResult]:
    """Every configuration at every sparsity against one dense baseline (see the module docstring)."""
    from tqdm import tqdm

    for c in configs:
        if c not in CONFIGS:
            raise ValueError(f"unknown configuration {c!r}; choose from {sorted(CONFIGS)}")
    for s in sparsities:
        if not 0 < s < 1:
            raise ValueError(f"sparsity must be in (0, 1), got {s}")
    shape = model_input_shape(model_name)
    dense_step = make_step(*build(model_name, BASELINE), batch, BASELINE, shape)
    dense_peak = peak_memory(model_name, BASELINE, 0.0, batch) if memory else None
    results = []
    for config, sparsity in tqdm([(c, s) for c in configs for s in sparsities], desc="bench", disable=not progress):
        model, opt, method = build(model_name, config, sparsity, list(extra))
        t_dense, t_sparse = time_pairs(dense_step, make_step(model, opt, method, batch, config, shape), pairs, warmup)
        chosen = {n: m.backend for n, m in model.named_modules() if hasattr(m, "backend") and hasattr(m, "maskset")}
        r = BenchResult(
            model_name,
            config,
            sparsity,
            batch,
            statistics.median(s / d for d, s in zip(t_dense, t_sparse)),
            statistics.median(t_dense),
            statistics.median(t_sparse),
            pairs,
            backends=chosen or None,
        )
        del model, opt, method
        if memory:
            peak = peak_memory(model_name, config, sparsity, batch, list(extra))
            r.mem_ratio = peak["peak"] / dense_peak["peak"]
            r.mem_ratio_training = (peak["peak"] - peak["base"]) / (dense_peak["peak"] - dense_peak["base"])
            r.peak_bytes = {BASELINE: dense_peak["peak"], config: peak["peak"]}
        results.append(r)
    return results


def plot_bench(results: list[BenchResult], path: str | Path) -> Path:
    """Step-time ratio against sparsity for each configuration, with the 1 - s FLOP line as the physical limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = plt.get_cmap("tab20").colors  # enough distinct colours for every configuration
    for i, config in enumerate(dict.fromkeys(r.config for r in results)):
        rows = sorted((r for r in results if r.config == config), key=lambda r: r.sparsity)
        ax.plot(
            [r.sparsity for r in rows], [r.step_ratio for r in rows], "o-", label=config, color=colors[i % len(colors)]
        )
    xs = sorted({r.sparsity for r in results})
    ax.plot(xs, [1 - s for s in xs], "k--", lw=1, label="1 - s (FLOPs)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("sparsity")
    ax.set_ylabel("step time / dense")
    models = ", ".join(sorted({f"{r.model} batch {r.batch}" for r in results}))
    ax.set_title(f"Training step against dense: {models}")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return save_figure(fig, path)


def results_json(results: list[BenchResult]) -> list[dict]:
    """The results as JSON-ready dicts."""
    return [asdict(r) for r in results]


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--peak":
    _peak_child(*sys.argv[2:])
