"""Protocol F (inference after training): the sparse model's inference form against the dense model, in one process
(the measurement: :mod:`sparsetrain.app.inference_bench`; ``sparsetrain bench --inference`` runs the same).

    python benchmarks/protocol_f.py --model vgg16 --sparsity 0.95
    python benchmarks/protocol_f.py --model resnet50 --sparsity 0.95 --batches 1
    python benchmarks/protocol_f.py --model gpt --sparsity 0.9 --scheme fan_in

One record per batch size in ``results/protocol_f.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, allocator_flag, apply_allocator, command_line, commit, environment  # noqa: E402

from sparsetrain.app.inference_bench import run_inference_bench  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, choices=["vgg16", "resnet50", "gpt"])
    ap.add_argument("--sparsity", type=float, required=True)
    ap.add_argument("--scheme", default="unstructured")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--new-tokens", type=int, default=256)
    allocator_flag(ap)
    args = ap.parse_args(argv)
    apply_allocator(args)
    for row in run_inference_bench(args.model, args.sparsity, args.scheme, args.batches, args.new_tokens):
        row |= {"command": command_line(), "commit": commit(), **environment()}
        print(json.dumps({k: v for k, v in row.items() if k != "plan"}), flush=True)
        with open(RESULTS / "protocol_f.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
