"""The engine's training epoch against a bare PyTorch loop of protocol A, side by side.

    python benchmarks/engine_vs_bare.py --data ../shared/data/cifar10-jpeg.tar \
        --reference ../shared/tools/reference_protocol_a.py --pairs 2

Alternates one engine epoch and one bare-loop epoch (A B A B ...) in one process, on
the same data tensors, both dense ResNet-20 at batch 128, and records the median
ratio engine/bare of the epoch times as a protocol-B record (config "engine-vs-bare").
Evaluation is excluded from both; the engine's epoch includes its progress bar,
FLOP accounting and mid-epoch checkpoints at their protocol-A frequency.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_record, command_line, commit, environment  # noqa: E402

from sparsetrain.app import Trainer
from sparsetrain.app.config import load_config
from sparsetrain.data.images import DATASETS, load_dataset


def bare_epoch(ref, model, opt, sched, xtr, ytr, batch, limit):
    """One epoch of the reference loop's inner body, unchanged in substance."""
    model.train()
    perm = torch.randperm(len(xtr))
    steps = min(math.ceil(len(xtr) / batch), limit)
    for k in range(steps):
        b = perm[k * batch : (k + 1) * batch]
        loss = F.cross_entropy(model(ref.augment(xtr[b]).contiguous(memory_format=torch.channels_last)), ytr[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--reference", required=True, help="path of reference_protocol_a.py")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=0, help="limit each epoch to this many steps (0: full epoch)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    spec = importlib.util.spec_from_file_location("reference_protocol_a", args.reference)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)

    splits = load_dataset("cifar10", args.data)
    info = DATASETS["cifar10"]
    mean, std = torch.tensor(info.mean).view(1, 3, 1, 1), torch.tensor(info.std).view(1, 3, 1, 1)
    xtr = (splits["train"].images.float() / 255 - mean) / std
    ytr = splits["train"].labels
    batch, limit = 128, args.steps or 10**9

    torch.manual_seed(0)
    bare = ref.resnet20().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(bare.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            overrides=[
                f"data.data_dir={args.data}",
                f"run.out_dir={tmp}",
                "run.checkpoint_every_steps=100",
                f"optim.epochs={args.pairs + 1}",
            ]
        )
        engine = Trainer(cfg, datasets=splits)
        engine.out.mkdir(parents=True, exist_ok=True)
        if args.steps:
            engine.train_loader.dataset = engine.train_loader.dataset.subset(torch.arange(args.steps * batch))
        times = {"engine": [], "bare": []}
        for pair in range(args.pairs):
            t = time.perf_counter()
            engine.train_epoch()
            engine.progress.epoch += 1
            times["engine"].append(time.perf_counter() - t)
            t = time.perf_counter()
            bare_epoch(ref, bare, opt, sched, xtr, ytr, batch, limit)
            times["bare"].append(time.perf_counter() - t)
            print(
                json.dumps(
                    {"pair": pair, "engine_s": round(times["engine"][-1], 2), "bare_s": round(times["bare"][-1], 2)}
                ),
                flush=True,
            )
    ratios = [e / b for e, b in zip(times["engine"], times["bare"])]
    record = {
        "protocol": "B",
        "model": "resnet20",
        "batch": batch,
        "config": "engine-vs-bare",
        "sparsity": 0.0,
        "step_ratio": round(statistics.median(ratios), 4),
        "pairs": args.pairs,
        "steps_per_epoch": min(391, limit),
        "engine_epoch_s": [round(t, 2) for t in times["engine"]],
        "bare_epoch_s": [round(t, 2) for t in times["bare"]],
        "command": command_line(),
        "commit": commit(),
        **environment(),
    }
    print(json.dumps(record))
    if not args.no_record:
        append_record("engine_speed.jsonl", record)


if __name__ == "__main__":
    main()
