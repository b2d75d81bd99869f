"""MEST inside a Hugging Face ``transformers.Trainer``: a tiny GPT-2, randomly initialised, on characters.

    pip install "sparsetrain[hf]"
    python examples/huggingface_gpt2.py --text ../shared/data/tinyshakespeare.txt --steps 300

No download: the model comes from a ``GPT2Config``; the text is split into windows of ``--context``
characters. The callback builds MEST when training starts, saves its state in every checkpoint
and restores it with ``trainer.train(resume_from_checkpoint=True)``.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import sparsetrain as st
from sparsetrain.integrations.huggingface import SparsityCallback

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


class CharWindows(torch.utils.data.Dataset):
    """Non-overlapping windows of ``context + 1`` characters as next-character examples."""

    def __init__(self, text: str, vocab: dict[str, int], context: int):
        ids = torch.tensor([vocab[c] for c in text], dtype=torch.long)
        n = (len(ids) - 1) // context
        self.windows = ids[: n * context + 1]
        self.context, self.n = context, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        chunk = self.windows[i * self.context : (i + 1) * self.context]
        return {"input_ids": chunk, "labels": chunk}  # GPT-2 shifts the labels itself


def build(args) -> tuple[Trainer, SparsityCallback]:
    text = Path(args.text).read_text(encoding="utf-8")[: args.chars]
    vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    torch.manual_seed(args.seed)
    config = GPT2Config(
        vocab_size=len(vocab),
        n_positions=args.context,
        n_embd=args.width,
        n_layer=args.depth,
        n_head=args.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    # MEST on every projection of the blocks; the output head (tied to the embedding) stays dense
    make = functools.partial(st.mest, sparsity=args.sparsity, every_epochs=1, dense_layers=["last"], distribution="erk")
    callback = SparsityCallback(
        make, execution=args.execution
    )  # auto: GPT-2's Conv1D layers have no sparse backend yet
    training = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.steps // 20,
        weight_decay=0.01,
        logging_steps=args.log_every,
        save_steps=args.save_every,
        save_strategy="steps",
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=not args.progress,
    )
    trainer = Trainer(
        model=model, args=training, train_dataset=CharWindows(text, vocab, args.context), callbacks=[callback]
    )
    return trainer, callback


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default=str(DEFAULT_TEXT), help="any UTF-8 text file")
    p.add_argument("--chars", type=int, default=200_000, help="characters of the text used")
    p.add_argument("--out", help="output folder (default: a new temporary one, printed; --resume needs it)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--execution", default="auto", help="masked, a backend's name, or auto (the fastest per layer)")
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    if args.out is None:
        if args.resume:
            raise SystemExit("--resume continues the run in --out: give the folder")
        args.out = tempfile.mkdtemp(prefix="sparsetrain-hf-gpt2-mest-")
        print(f"writing to {args.out}")
    trainer, callback = build(args)
    result = trainer.train(resume_from_checkpoint=True if args.resume else None)
    sp = callback.sparsifier
    print(f"loss {result.training_loss:.3f}, sparsity {sp.sparsity():.4f}, mutations {sp.updates}")
    return {"trainer": trainer, "sparsifier": sp, "loss": result.training_loss}


if __name__ == "__main__":
    main()
