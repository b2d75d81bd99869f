"""RigL on a ResNet-20 inside a Lightning ``Trainer``, on CIFAR-10.

    pip install "sparsetrain[lightning]"
    python examples/lightning_resnet.py --data ../shared/data/cifar10-jpeg.tar --epochs 2

The callback builds the method once Lightning has made the optimizer, runs its pre-step work
after backward (Lightning calls backward inside ``optimizer.step(closure)``), and keeps its state
in Lightning's checkpoints: ``--resume`` continues from ``--out/last.ckpt`` exactly.
``--data synthetic`` trains on random images (no files, for a quick look).
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import sparsetrain as st
from sparsetrain.integrations.lightning import SparsityCallback
from sparsetrain.recipes import KeptSampler


class Classifier(L.LightningModule):
    """Any zoo model as a LightningModule: cross-entropy, SGD with Nesterov momentum."""

    def __init__(self, model: torch.nn.Module, lr: float = 0.05):
        super().__init__()
        self.model, self.lr = model, lr

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)


def cifar_tensors(data: str, limit: int) -> TensorDataset:
    """CIFAR-10 training images as normalised float tensors (``synthetic``: random ones)."""
    if data == "synthetic":
        g = torch.Generator().manual_seed(0)
        return TensorDataset(torch.randn(limit, 3, 32, 32, generator=g), torch.randint(0, 10, (limit,), generator=g))
    from sparsetrain.data.images import DATASETS

    train = st.load_dataset("cifar10", data)["train"]
    info = DATASETS["cifar10"]
    x = train.images[:limit].float() / 255
    x = (x - torch.tensor(info.mean).view(1, 3, 1, 1)) / torch.tensor(info.std).view(1, 3, 1, 1)
    return TensorDataset(x, train.labels[:limit])


def build(args):
    L.seed_everything(args.seed, verbose=False)
    module = Classifier(st.build_model("resnet20", 10, args.width), lr=args.lr)
    ds = cifar_tensors(args.data, args.limit)
    # a sampler seeded by the epoch (Lightning calls set_epoch): a resumed run sees the same order
    loader = DataLoader(ds, batch_size=args.batch, sampler=KeptSampler(len(ds), seed=args.seed), drop_last=True)
    callback = SparsityCallback(
        functools.partial(st.rigl, sparsity=args.sparsity, distribution="erk", update_every_steps=args.update_every),
        execution=args.execution,
    )  # auto: each layer's fastest path, timed on the first batch
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=args.out, save_last=True, save_top_k=1, save_on_train_epoch_end=True
    )
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[callback, checkpoints],
        logger=False,
        enable_progress_bar=args.progress,
        enable_model_summary=False,
        default_root_dir=args.out,
        deterministic=True,
    )
    return trainer, module, loader, callback


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar"))
    p.add_argument("--limit", type=int, default=50_000, help="training images used")
    p.add_argument("--out", help="output folder (default: a new temporary one, printed; --resume needs it)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--update-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from --out/last.ckpt")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--execution", default="auto", help="masked, a backend's name, or auto (the fastest per layer)")
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    if args.out is None:
        if args.resume:
            raise SystemExit("--resume continues the run in --out: give the folder")
        args.out = tempfile.mkdtemp(prefix="sparsetrain-lightning-resnet20-rigl-")
        print(f"writing to {args.out}")
    trainer, module, loader, callback = build(args)
    trainer.fit(module, loader, ckpt_path=str(Path(args.out) / "last.ckpt") if args.resume else None)
    sp = callback.sparsifier
    print(f"sparsity {sp.sparsity():.4f}, mask updates {sp.updates}, steps {sp.clock.step}")
    return {"trainer": trainer, "module": module, "sparsifier": sp}


if __name__ == "__main__":
    main()
