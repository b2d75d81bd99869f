"""Protocol D-hf: Hugging Face transformers sparsified through the Hugging Face ``SparsityCallback``, step time
against dense in one process.

    python benchmarks/protocol_dhf.py --model hf-gpt2 --sparsity 0.9 --execution auto
    python benchmarks/protocol_dhf.py --model hf-llama --sparsity 0.9 --execution auto
    python benchmarks/protocol_dhf.py --model hf-gpt2 --compact-state   # only the kept weights and their AdamW state

GPT-2 small from ``GPT2Config()`` (12 layers, width 768, 50,257 tokens) or a Llama-style model from
``LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
vocab_size=32000)``; nothing is downloaded. Random token windows (context 128, batch 8), AdamW, the loss the model
computes from ``labels``. The sparse model gets its sparsifier the way a ``transformers.Trainer`` run does: the
callback's ``on_train_begin`` with the model, the optimizer and the step counts (``"api": "callback"``), RigL by
default over every attention and MLP projection (the embeddings and the output head dense); then dense and sparse
steps alternate, median ratio over the pairs. One record per run in ``results/protocol_dhf.jsonl``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import allocator_flag, append_record, apply_allocator, command_line, commit, environment  # noqa: E402

import sparsetrain as st  # noqa: E402
from sparsetrain.app.bench import time_pairs  # noqa: E402

CONTEXT, BATCH = 128, 8


def build_model(name: str, seed: int = 0) -> torch.nn.Module:
    """``hf-gpt2`` or ``hf-llama`` from its config, randomly initialised (same seed, same weights)."""
    import transformers

    torch.manual_seed(seed)
    if name == "hf-gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config())
    if name == "hf-llama":
        cfg = transformers.LlamaConfig(
            hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, vocab_size=32000
        )
        return transformers.LlamaForCausalLM(cfg)
    raise SystemExit(f"unknown model {name!r}; allowed: hf-gpt2, hf-llama")


def dense_layer_patterns(model: torch.nn.Module) -> list[str]:
    """The embeddings and the output head stay dense (protocol D-hf): their weights' names."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    return [n for n in names if "lm_head" in n or "wte" in n or "wpe" in n or "embed_tokens" in n]


def attach(model, optimizer, make, execution: str, total_steps: int, compact_state: bool = False):
    """The sparsifier as a ``transformers.Trainer`` run gets it: the callback's ``on_train_begin``."""
    from sparsetrain.integrations.huggingface import SparsityCallback

    cb = SparsityCallback(make, execution=execution, compact_state=compact_state)
    args = types.SimpleNamespace(gradient_accumulation_steps=1, output_dir=".")
    state = types.SimpleNamespace(max_steps=total_steps, num_train_epochs=1, global_step=0)
    cb.on_train_begin(args, state, None, model=model, optimizer=optimizer, train_dataloader=None)
    return cb.sparsifier


def make_step(model, optimizer, vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (BATCH, CONTEXT), generator=g)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="hf-gpt2", choices=["hf-gpt2", "hf-llama"])
    ap.add_argument("--method", default="rigl", choices=["rigl", "static"])
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--execution", default="auto")
    ap.add_argument(
        "--compact-state",
        action="store_true",
        help="the callback's compact_state=True: the sparse layers keep only their kept weights, gradients and AdamW "
        "moments",
    )
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    allocator_flag(ap)
    args = ap.parse_args(argv)
    apply_allocator(args)

    dense = build_model(args.model)
    sparse = build_model(args.model)
    vocab = dense.config.vocab_size
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1) for m in (dense, sparse)]
    factory = st.METHODS[args.method]
    make = functools.partial(factory, sparsity=args.sparsity, dense_layers=dense_layer_patterns(sparse))
    sp = attach(sparse, opts[1], make, args.execution, total_steps=10_000, compact_state=args.compact_state)
    dense_step, sparse_step = make_step(dense, opts[0], vocab), make_step(sparse, opts[1], vocab)
    sparse_step()  # auto plans on this first batch
    td, ts = time_pairs(dense_step, sparse_step, args.pairs, args.warmup)
    ratios = [s / d for s, d in zip(ts, td)]
    plan = sp.plan
    record = {
        "protocol": "D-hf",
        "model": args.model,
        "api": "callback",
        "method": args.method,
        "config": args.execution + ("-compact" if args.compact_state else ""),
        "compact_state": args.compact_state,
        "sparsity": args.sparsity,
        "step_ratio": round(statistics.median(ratios), 4),
        "step_ratio_mean": round(statistics.fmean(ratios), 4),
        "step_s_dense_median": round(statistics.median(td), 4),
        "step_s_sparse_median": round(statistics.median(ts), 4),
        "pairs": args.pairs,
        "batch": BATCH,
        "context": CONTEXT,
        "plan_layers": len(plan.layers) if plan else 0,
        "paths": plan.counts() if plan else {},
        "layout": plan.layout if plan else None,
        "command": command_line(),
        "commit": commit(),
        **environment(),
    }
    print(plan)
    print(record)
    append_record("protocol_dhf.jsonl", record)


if __name__ == "__main__":
    main()
