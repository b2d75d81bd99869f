"""Command-line interface: ``sparsetrain train | eval | report | flops``."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

__all__ = ["main", "format_error"]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says what a rerun resumes from."""


def _interrupted_at(out: Path) -> str:
    """What the same command resumes from after an interrupt in run folder ``out`` (the newest checkpoint)."""
    found = sorted(out.rglob("checkpoint.pt"), key=lambda p: p.stat().st_mtime) if out.is_dir() else []
    if not found:
        return f"interrupted before the first checkpoint: nothing in {out} to resume; the same command starts over"
    return f"interrupted: the same command resumes from {found[-1]}"


def _train(args) -> int:
    from .config import load_config
    from .trainer import Trainer

    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    if args.out:
        overrides.append(f"run.out_dir={args.out}")
    if args.resume_with_changes:
        overrides.append("run.resume_with_changes=true")
    cfg = load_config(args.config, overrides)
    try:
        if cfg.sparsity.method_class().traits.rounds:
            from .lottery import lottery_ticket

            summary = lottery_ticket(cfg)
        else:
            summary = Trainer(cfg).fit()
    except KeyboardInterrupt:
        raise Interrupted(_interrupted_at(Path(cfg.run.out_dir))) from None
    from .distributed import leave, shutdown

    distributed = shutdown()
    print(json.dumps({k: v for k, v in summary.items() if k != "layers"}, indent=2))
    if distributed:
        leave(0)  # everything is written: skip the teardown that can abort a finished rank
    return 0


def _eval(args) -> int:
    from ..data.images import DATASETS, BatchLoader, load_dataset
    from ..models import build_configured
    from .checkpoint import CheckpointError, load_checkpoint
    from .config import load_config
    from .distributed import pick_device
    from .evaluation import evaluate

    run = Path(args.run_dir)
    if not (run / "config.yaml").exists():
        raise CheckpointError(f"{run} is not a run directory (no config.yaml)")
    overrides = [f"data.data_dir={args.data_dir}"] if args.data_dir else []
    cfg = load_config(run / "config.yaml", overrides)
    weights = run / ("model.pt" if (run / "model.pt").exists() else "checkpoint.pt")
    state = load_checkpoint(weights)
    info = DATASETS[cfg.data.dataset]
    model = build_configured(cfg.model, info.num_classes, cfg.data.context)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        hint = (
            (
                "the run is unfinished and its method changes the model's layers (SWAT, compact state): finish it with "
                "`sparsetrain train` on the same directory, then evaluate its model.pt"
            )
            if weights.name == "checkpoint.pt"
            else "the weights do not fit the model its config names"
        )
        raise CheckpointError(f"{run / weights.name}: {hint}") from None
    device = pick_device(cfg.run.device)
    model.to(device)
    test = load_dataset(cfg.data.dataset, cfg.data.data_dir, download=cfg.data.download, cache_dir=cfg.data.cache_dir)[
        "test"
    ]
    loader = BatchLoader(test, info, cfg.run.eval_batch_size, train=False)
    result = evaluate(model, loader, device)
    print(
        json.dumps({"run": str(run), "weights": weights.name, "test_loss": result["loss"], "test_acc": result["acc"]})
    )
    return 0


MAX_SAMPLE_CHARS = 100_000  # sample: more is a mistake, not a request


def _sample(args) -> int:
    import torch

    from ..data.text import CharVocab
    from ..models import SEQUENCE_MODELS, build_configured
    from .checkpoint import CheckpointError, load_checkpoint
    from .config import load_config

    run = Path(args.run_dir)
    if not (run / "config.yaml").exists():
        raise CheckpointError(f"{run} is not a run directory (no config.yaml)")
    cfg = load_config(run / "config.yaml")
    if cfg.model.name not in SEQUENCE_MODELS:
        raise CheckpointError(
            f"{run} trained {cfg.model.name!r}, which does not generate text (sequence models: "
            f"{sorted(SEQUENCE_MODELS)})"
        )
    if not (run / "model.pt").exists() or not (run / "vocab.json").exists():
        raise CheckpointError(f"{run} has no model.pt and vocab.json yet: the run is unfinished; finish it first")
    if not math.isfinite(args.temperature) or args.temperature <= 0:
        raise ValueError(
            f"--temperature must be a finite number > 0 (lower: closer to the most likely character), "
            f"got {args.temperature}"
        )
    if not 1 <= args.chars <= MAX_SAMPLE_CHARS:
        raise ValueError(f"--chars must be between 1 and {MAX_SAMPLE_CHARS}, got {args.chars}")
    if not args.prompt:
        raise ValueError("--prompt must hold at least one character (the default is a newline)")
    vocab = CharVocab.load(run / "vocab.json")
    model = build_configured(cfg.model, len(vocab), cfg.data.context)
    saved = load_checkpoint(run / "model.pt")["model"]
    width = next((v.shape[0] for k, v in saved.items() if k.endswith("tok.weight")), len(vocab))
    if width != len(vocab):
        raise CheckpointError(
            f"{run / 'vocab.json'} holds {len(vocab)} characters but the model was trained on {width}: "
            "the vocabulary is not this run's"
        )
    model.load_state_dict(saved)
    prompt = vocab.encode(args.prompt)[None]
    out = model.generate(prompt, args.chars, args.temperature, torch.Generator().manual_seed(args.seed))
    print(vocab.decode(out[0]))
    return 0


def _export(args) -> int:
    from .export import export_run

    path = export_run(args.run_dir, args.format, args.out, args.batch)
    print(
        json.dumps({"run": str(args.run_dir), "format": args.format, "file": str(path), "bytes": path.stat().st_size})
    )
    return 0


def _report(args) -> int:
    from .report import format_layers, format_table, plot_curves, read_run

    runs = [read_run(d) for d in args.run_dirs]
    print(format_table(runs))
    if args.layers:
        for r in runs:
            print()
            print(format_layers(r))
    png = Path(args.png) if args.png else Path(args.run_dirs[0]) / "curves.png"
    plot_curves(args.run_dirs, png)
    print(f"\ncurves: {png}")
    return 0


def _flops(args) -> int:
    # long: one command's whole recipe (build, mask, count), read top to bottom
    from ..core.accounting import measure_layer_costs
    from ..core.masks import select_parameters
    from ..data.images import DATASETS
    from ..methods import METHOD_CLASSES
    from ..models import build_model, model_input_shape

    for flag, value in (("--sparsity", args.sparsity), ("--activation-sparsity", args.activation_sparsity)):
        if value is not None and not 0 <= value < 1:
            raise SystemExit(f"error: {flag} must be in [0, 1), got {value}")
    if args.input_size:
        shape = tuple(args.input_size)
    elif args.dataset:
        shape = DATASETS[args.dataset].image_shape
    else:
        shape = model_input_shape(args.model)
    classes = DATASETS[args.dataset].num_classes if args.dataset else None
    model = build_model(args.model, classes)
    try:
        costs = measure_layer_costs(model, shape)
    except RuntimeError as e:  # the model's first layer does not take this input
        raise ValueError(
            f"model {args.model!r} does not take inputs of shape {shape} ({str(e).splitlines()[0]}); "
            "give --input-size C H W that fits it, or --dataset"
        ) from None
    density: dict[str, float] = {}
    grad_density: dict[str, float] = {}
    method = METHOD_CLASSES[args.method]
    if method.traits.masks:
        layers = args.dense_layers if args.dense_layers is not None else method.knob("dense_layers").default
        shapes = {n: tuple(p.shape) for n, p in select_parameters(model, layers).items()}
        density, grad_density = method.flops_densities(
            shapes, args.sparsity, args.distribution, args.activation_sparsity
        )
    train = costs.training_flops(density, grad_density)
    dense_train = costs.training_flops()
    infer, dense_infer = costs.forward_flops(density), costs.forward_flops()
    if args.json:
        print(
            json.dumps(
                {
                    "model": args.model,
                    "input": list(shape),
                    "method": args.method,
                    "sparsity": args.sparsity,
                    "forward_macs_dense": dense_infer / 2,
                    "forward_flops": infer,
                    "forward_flops_dense": dense_infer,
                    "train_flops": train,
                    "train_flops_dense": dense_train,
                    "train_flops_rel": train["total"] / dense_train["total"],
                    "infer_flops_rel": infer / dense_infer,
                    "layers": [
                        {
                            "name": lc.name,
                            "params": lc.params,
                            "density": density.get(lc.name, 1.0),
                            "forward_flops": lc.forward,
                        }
                        for lc in costs.layers
                    ],
                },
                indent=2,
            )
        )
        return 0
    print(f"{args.model}, input {shape}, method {args.method}, sparsity {args.sparsity} (1 MAC = 2 FLOPs; per image)")
    print(f"{'layer':<36} {'params':>10} {'density':>8} {'fwd MFLOPs':>11} {'train MFLOPs':>13}")
    for lc in costs.layers:
        d = density.get(lc.name, 1.0)
        print(
            f"{lc.name:<36} {lc.params:>10} {d:>8.3f} {lc.forward * d / 1e6:>11.2f} "
            f"{(lc.forward + lc.input_grad + lc.weight_grad) * d / 1e6:>13.2f}"
        )
    print(
        f"\nforward (inference): {infer / 1e9:.4f} GFLOPs = {infer / 2e9:.4f} GMACs  "
        f"(dense {dense_infer / 2e9:.4f} GMACs; {infer / dense_infer:.3f} of dense)"
    )
    print(
        f"training step: {train['total'] / 1e9:.4f} GFLOPs  (forward {train['forward'] / 1e9:.4f}, input grad "
        f"{train['input_grad'] / 1e9:.4f}, weight grad {train['weight_grad'] / 1e9:.4f}; "
        f"{train['total'] / dense_train['total']:.3f} of dense)"
    )
    return 0


def _bench(args) -> int:
    from ..execution.allocator import keep_freed_memory
    from .bench import plot_bench, results_json, run_bench

    keep_freed_memory()  # as training from the command line does (run.keep_freed_memory), dense and sparse alike
    if args.inference:
        return _bench_inference(args)
    try:
        results = run_bench(
            args.model,
            args.configs,
            args.sparsity,
            args.batch,
            args.pairs,
            args.warmup,
            args.extra,
            memory=not args.no_memory,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = results_json(results)
    print(f"{'config':<8} {'sparsity':>8} {'step ratio':>10} {'dense s':>8} {'sparse s':>9} {'mem ratio':>9}")
    for r in results:
        mem = "" if r.mem_ratio is None else f"{r.mem_ratio:.3f}"
        print(
            f"{r.config:<8} {r.sparsity:>8.3f} {r.step_ratio:>10.3f} {r.step_s_dense:>8.3f} {r.step_s_sparse:>9.3f} {mem:>9}"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.png:
        print(f"plot: {plot_bench(results, args.png)}")
    return 0


def _bench_inference(args) -> int:
    """``bench --inference``: protocol F (the inference form against dense) at each sparsity, batches 1 and 64."""
    from .inference_bench import run_inference_bench

    scheme = next((e.split("=", 1)[1] for e in args.extra if e.startswith("sparsity.scheme=")), "unstructured")
    rows = [r for s in args.sparsity for r in run_inference_bench(args.model, s, scheme, args.batches)]
    print(f"{'sparsity':>8} {'batch':>5} {'time ratio':>10} {'dense s':>9} {'sparse s':>9} {'file ratio':>10}")
    for r in rows:
        print(
            f"{r['sparsity']:>8.3f} {r['batch']:>5} {r['time_ratio']:>10.3f} {r['dense_s']:>9.4f} "
            f"{r['sparse_s']:>9.4f} {r['size_ratio']:>10.3f}"
            + (f"  generation {r['speedup']:.2f}x" if "speedup" in r else "")
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


class _Names:
    """An argparse ``type`` that accepts the names of a registry, read when a value is first checked: help imports
    no torch (`sparsetrain --help` stays instant), and a bad value says what is allowed, as argparse's choices do."""

    def __init__(self, module: str, registry: str):
        self.module, self.registry = module, registry

    def __call__(self, value: str) -> str:
        import importlib

        names = sorted(getattr(importlib.import_module(self.module), self.registry))
        if value not in names:
            raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(map(repr, names))})")
        return value


def build_parser() -> argparse.ArgumentParser:
    """The ``sparsetrain`` argument parser with its commands."""
    # long: a declarative table of the commands and their flags
    models = _Names("sparsetrain.models", "MODELS")
    p = argparse.ArgumentParser(
        prog="sparsetrain",
        description="Sparse neural-network training in PyTorch. "
        "Errors print one line; add --debug (anywhere) for the traceback.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train a model (resumes if the run directory holds a checkpoint)",
        description="Train from a YAML config plus section.key=value overrides, e.g. "
        "`sparsetrain train --config configs/resnet20_cifar10.yaml sparsity.method=static "
        "sparsity.sparsity=0.9`. Launch with torchrun for data-parallel training.",
    )
    t.add_argument("--config", help="YAML config file (see configs/)")
    t.add_argument("--data-dir", help="dataset file or folder (overrides data.data_dir)")
    t.add_argument("--out", help="run directory (overrides run.out_dir)")
    t.add_argument(
        "--resume-with-changes",
        action="store_true",
        help="resume although schedule keys (optim.epochs, optim.lr, ...) changed; recorded in final.json",
    )
    t.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=0.05")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="evaluate a run's final (or latest) weights on the test set")
    e.add_argument("run_dir")
    e.add_argument("--data-dir", help="dataset file or folder, if it moved since training")
    e.set_defaults(func=_eval)

    x = sub.add_parser(
        "export",
        help="write a finished run's model to ship: sparse checkpoint, torch.export program or ONNX",
        description="Write a finished run's model: --format sparse (safetensors, kept values and a bitmask), pt2 "
        "(a torch.export program of its inference form, the sparse layers as sparsetrain operators) or onnx "
        "(pruned channels taken out; unstructured sparse layers are refused).",
    )
    x.add_argument("run_dir")
    x.add_argument("--format", required=True, help="sparse, pt2 or onnx (sparsetrain.app.export.FORMATS)")
    x.add_argument(
        "--out", help="where to write it (default: model.sparse.safetensors, model.pt2 or model.onnx in the run)"
    )
    x.add_argument("--batch", type=int, default=1, help="pt2: the batch size it is timed and traced at (default 1)")
    x.set_defaults(func=_export)

    r = sub.add_parser("report", help="table of final metrics (and per-layer sparsity) and curves as PNG")
    r.add_argument("run_dirs", nargs="+")
    r.add_argument("--layers", action="store_true", help="also print per-layer sparsity")
    r.add_argument("--png", help="where to write the curves (default RUN_DIR/curves.png of the first run)")
    r.set_defaults(func=_report)

    f = sub.add_parser("flops", help="FLOPs of a model for a method and sparsity, without training")
    f.add_argument("--model", required=True, type=models, metavar="MODEL", help="a model of the zoo, e.g. resnet20")
    f.add_argument(
        "--dataset",
        type=_Names("sparsetrain.data.images", "DATASETS"),
        metavar="DATASET",
        help="sets input size and classes, e.g. cifar10",
    )
    f.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"))
    f.add_argument(
        "--method",
        default="dense",
        type=_Names("sparsetrain.methods", "METHODS"),
        metavar="METHOD",
        help="any masked method: forward, input and weight gradient scale with each layer's density",
    )
    f.add_argument("--sparsity", type=float, default=0.0)
    f.add_argument(
        "--distribution",
        default="uniform",
        type=_Names("sparsetrain.core.distributions", "DISTRIBUTIONS"),
        metavar="DISTRIBUTION",
        help="uniform, er or erk",
    )
    f.add_argument(
        "--activation-sparsity",
        type=float,
        help="swat: share of layer inputs dropped for the weight gradient (default: the weight sparsity)",
    )
    f.add_argument("--dense-layers", nargs="*", help="layers left dense (default: first last; swat: first)")
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=_flops)

    g = sub.add_parser(
        "sample",
        help="print text generated by a trained language model",
        description="Sample characters from a finished run of a sequence model (e.g. gpt on text): "
        "sparsetrain sample runs/gpt --prompt 'ROMEO:' --chars 300",
    )
    g.add_argument("run_dir")
    g.add_argument("--prompt", default="\n", help="text to continue (its characters must be in the vocabulary)")
    g.add_argument("--chars", type=int, default=500, help="characters to generate")
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=_sample)

    b = sub.add_parser(
        "bench",
        help="training-step time and peak memory of sparse configurations against dense",
        description="Alternates dense and sparse training steps (A B A B) in one process and reports "
        "the median ratio; peak memory of each configuration in a fresh process. "
        "Example: sparsetrain bench --model vgg16 --configs direct auto --sparsity 0.9 0.95 0.98",
    )
    b.add_argument("--model", default="vgg16", type=models, metavar="MODEL", help="a model of the zoo")
    b.add_argument(
        "--configs",
        nargs="+",
        default=["auto"],
        metavar="CONFIG",
        help="configurations of sparsetrain.app.bench.CONFIGS, e.g. direct auto-compact",
    )
    b.add_argument("--sparsity", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    b.add_argument("--batch", type=int, default=128)
    b.add_argument("--pairs", type=int, default=10, help="timed dense/sparse step pairs")
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--extra", nargs="*", default=[], help="config overrides, e.g. sparsity.distribution=erk")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    b.add_argument(
        "--inference",
        action="store_true",
        help="protocol F instead: the inference form's forward against dense (vgg16, resnet50, gpt), at --batches",
    )
    b.add_argument("--batches", type=int, nargs="+", default=[1, 64], help="--inference: the batch sizes")
    b.add_argument("--json", help="write the results here")
    b.add_argument("--png", help="write the ratio-against-sparsity plot here")
    b.set_defaults(func=_bench)
    return p


def format_error(e: BaseException) -> str | None:
    """The one line the CLI prints for an error it reports (None: not one of those, so a bug: let it raise)."""
    from ..data.images import DatasetError
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .trainer import TrainingError

    if isinstance(e, (ConfigError, DatasetError, CheckpointError, TrainingError)):
        text = str(e)
    elif isinstance(e, (ValueError, OSError)):
        text = f"{type(e).__name__}: {e}"
    else:
        return None
    return "error: " + " ".join(part.strip() for part in text.splitlines() if part.strip())


def others_busy_cores(seconds: float = 0.2) -> float | None:
    """How many cores other processes kept busy over ``seconds`` (``/proc/stat``; this process sleeps meanwhile),
    or None where that file does not exist."""

    def busy_and_total() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
        return sum(ticks) - idle, sum(ticks)

    try:
        busy0, total0 = busy_and_total()
        time.sleep(seconds)
        busy1, total1 = busy_and_total()
    except (OSError, ValueError, IndexError):
        return None
    return (busy1 - busy0) / max(total1 - total0, 1) * (os.cpu_count() or 1)


def choose_openmp_wait_policy(environ=os.environ) -> str | None:
    """Before torch loads: on a CPU that other processes keep busy (half a core or more), OpenMP's threads sleep
    while they wait (``OMP_WAIT_POLICY=PASSIVE``) instead of spinning, which on a shared core starves the thread
    they wait for (measured on the quickstart, 2 cores beside one busy process: 9 steps/s spinning, 21.5 passive;
    idle, spinning is the faster: ``benchmarks/threads_under_load.py``). Where the others take half the cores or
    more, PyTorch also starts with only the cores left (``OMP_NUM_THREADS``): a thread that shares its core with
    another process stalls every other thread at each join. A policy or thread count the user set is kept
    (``run.threads`` still decides the threads). Returns the policy set, or None."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ or "torch" in sys.modules:
        return None
    busy = others_busy_cores()
    if busy is None or busy < 0.5:
        return None
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    cores = os.cpu_count() or 1
    free = max(1, int(cores - busy + 0.5))
    if "OMP_NUM_THREADS" not in environ and free <= cores // 2:
        environ["OMP_NUM_THREADS"] = str(free)
    return "PASSIVE"


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a command. A refused input, a data, checkpoint or training error is one line
    (``error: ...``, exit code 2); ``--debug`` shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    args = build_parser().parse_args(argv)
    choose_openmp_wait_policy()
    try:
        return args.func(args)
    except KeyboardInterrupt as e:
        print(str(e) if isinstance(e, Interrupted) else "interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        line = format_error(e)
        if debug or line is None:
            raise
        print(line, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
