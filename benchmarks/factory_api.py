"""Protocol B (and D-speed) through the public factories in a plain PyTorch loop, beside the Trainer, in one process.

    python benchmarks/factory_api.py --case static-auto-compact --sparsity 0.95
    python benchmarks/factory_api.py --case swat-u --sparsity 0.9
    python benchmarks/factory_api.py --case rigl-erk-auto-compact --sparsity 0.95 --pairs 110
    python benchmarks/factory_api.py --case gpt-rigl-fanin-condensed-compact --sparsity 0.9

Three models are built from the same seed: dense, the method through its factory (``st.static(model, opt,
sparsity=..., execution="auto", compact_state=True)``, nothing else from the library), and, for the VGG-16 cases,
the same configuration built by our Trainer (its model, optimizer and method, as ``sparsetrain train`` makes them).
After a warm-up, one training step of each runs in turn (dense, factory, Trainer; forward, backward, SGD step with
momentum, the method's work inside ``optimizer.step()``) for ``--pairs`` rounds; each sparse path's figure is the
median over rounds of its step time over the dense step time of that round. One record per path
(``"api": "factory"`` or ``"trainer"``) goes to ``results/protocol_b.jsonl`` (``protocol_d_speed.jsonl`` for the
GPT), with the plan each path chose.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import append_record, command_line, commit, environment  # noqa: E402

import sparsetrain as st  # noqa: E402
from sparsetrain.models import build_model  # noqa: E402

STEPS_PER_EPOCH = 391  # CIFAR-10 at batch 128: RigL's schedule (an update every 100 steps) as in a real run

# case -> (model, factory call on (model, optimizer, sparsity), Trainer overrides or None)
CASES = {
    "static-auto-compact": (
        "vgg16",
        lambda m, o, s: st.static(m, o, sparsity=s, execution="auto", compact_state=True),
        ["sparsity.method=static", "sparsity.backend=auto", "sparsity.compact_state=true"],
    ),
    "rigl-erk-auto-compact": (
        "vgg16",
        lambda m, o, s: st.rigl(
            m,
            o,
            sparsity=s,
            distribution="erk",
            steps_per_epoch=STEPS_PER_EPOCH,
            epochs=1,
            execution="auto",
            compact_state=True,
        ),
        ["sparsity.method=rigl", "sparsity.distribution=erk", "sparsity.backend=auto", "sparsity.compact_state=true"],
    ),
    "swat-u": (
        "vgg16",
        lambda m, o, s: st.swat(m, o, sparsity=s, steps_per_epoch=STEPS_PER_EPOCH, epochs=1),
        ["sparsity.method=swat"],
    ),
    "gpt-rigl-fanin-condensed-compact": (
        "gpt",
        lambda m, o, s: st.rigl(
            m,
            o,
            sparsity=s,
            scheme="fan_in",
            dense_layers=["last"],
            steps_per_epoch=STEPS_PER_EPOCH,
            epochs=1,
            execution="condensed",
            compact_state=True,
        ),
        None,
    ),
}


def _optimizer(model, sequence: bool):
    if sequence:  # protocol D: AdamW, weight decay on matrices only
        decay = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        return torch.optim.AdamW(
            [{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1
        )
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)


def _model(name: str, sequence: bool):
    torch.manual_seed(0)
    model = build_model(name, width=4.0, context=128) if sequence else build_model(name)
    return model if sequence else model.to(memory_format=torch.channels_last)  # dense convolutions' faster layout


def _trainer(overrides: list[str], sparsity: float, batch: int, out: Path):
    """The Trainer as ``sparsetrain train`` builds it, on synthetic CIFAR-sized data (its model, optimizer, method)."""
    from sparsetrain.app.config import load_config
    from sparsetrain.app.trainer import Trainer
    from sparsetrain.data.images import ArrayDataset

    g = torch.Generator().manual_seed(2)
    n = STEPS_PER_EPOCH * batch
    train = ArrayDataset(
        torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,), generator=g)
    )
    test = ArrayDataset(train.images[:batch], train.labels[:batch])
    cfg = load_config(
        overrides=[
            "model.name=vgg16",
            "data.dataset=cifar10",
            f"optim.batch_size={batch}",
            "optim.epochs=1",
            "optim.name=sgd",
            "optim.momentum=0.9",
            "optim.nesterov=true",
            "optim.weight_decay=5e-4",
            "optim.lr=0.01",
            f"run.out_dir={out}",
            "run.progress=false",
            f"sparsity.sparsity={sparsity}",
            *overrides,
        ]
    )
    return Trainer(cfg, datasets={"train": train, "test": test})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", required=True, choices=sorted(CASES))
    ap.add_argument("--sparsity", type=float, required=True)
    ap.add_argument("--batch", type=int, default=None, help="default 128 (VGG-16), 16 (GPT)")
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-trainer", action="store_true", help="time the factory path against dense only")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)

    name, factory, overrides = CASES[args.case]
    sequence = name == "gpt"
    batch = args.batch or (16 if sequence else 128)
    g = torch.Generator().manual_seed(1)
    if sequence:
        x = torch.randint(0, 65, (batch, 128), generator=g)
        y = torch.randint(0, 65, (batch, 128), generator=g)
    else:
        x = torch.randn(batch, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,), generator=g)

    paths = {}
    dense = _model(name, sequence)
    paths["dense"] = (dense, _optimizer(dense, sequence))
    model = _model(name, sequence)
    opt = _optimizer(model, sequence)
    sp = factory(model, opt, args.sparsity)
    paths["factory"] = (model, opt)
    tmp = tempfile.TemporaryDirectory()
    if overrides is not None and not args.no_trainer:
        trainer = _trainer(overrides, args.sparsity, batch, Path(tmp.name))
        paths["trainer"] = (trainer.model, trainer.optimizer)

    def step(model, opt):
        out = model(x)  # the factory's model puts x into its plan's layout itself (a forward pre-hook)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):  # the factory's auto plan is timed in its first step
        for m, o in paths.values():
            step(m, o)
    times = {k: [] for k in paths}
    for _ in range(args.pairs):
        for k, (m, o) in paths.items():
            t = time.perf_counter()
            step(m, o)
            times[k].append(time.perf_counter() - t)
    dense_med = statistics.median(times["dense"])
    plans = {"factory": sp.plan}
    if "trainer" in paths:
        plans["trainer"] = trainer.method.plan
    for api in [k for k in paths if k != "dense"]:
        ratios = [s / d for s, d in zip(times[api], times["dense"])]
        plan = plans[api]
        record = {
            "protocol": "D-speed" if sequence else "B",
            "api": api,
            "model": name,
            "batch": batch,
            "config": args.case,
            "sparsity": args.sparsity,
            "step_ratio": round(statistics.median(ratios), 4),
            "step_ratio_mean": round(sum(times[api]) / sum(times["dense"]), 4),
            "step_s_dense_median": round(dense_med, 4),
            "step_s_sparse_median": round(statistics.median(times[api]), 4),
            "pairs": args.pairs,
            "layout": plan.layout if plan else None,
            "paths": plan.counts() if plan else {},
            "compact_layers": sum(lp.compact for lp in plan.layers.values()) if plan else 0,
            "command": command_line(),
            "commit": commit(),
            **environment(),
        }
        print(json.dumps(record))
        if not args.no_record:
            append_record("protocol_d_speed.jsonl" if sequence else "protocol_b.jsonl", record)
    tmp.cleanup()


if __name__ == "__main__":
    main()
