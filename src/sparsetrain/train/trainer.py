"""The training engine: one loop for dense and sparse training, resumable at any step.

Everything that decides what happens next is in the checkpoint: model, optimizer,
method state (masks), data-efficiency statistics, RNG state, data position and accounting (the learning rate is a function of progress). A run
killed at any point and restarted in the same directory continues exactly as if it
had not stopped.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..accounting import FlopMeter, measure_layer_costs, peak_memory_bytes, saved_tensor_bytes
from ..config import Config
from ..data import DATASETS, ArrayDataset, BatchLoader, load_dataset, split_validation
from ..forgetting import ForgettingTracker
from ..methods import Method, SetupContext, build_method
from ..models import build_model
from ..backends import apply_backend
from ..compact import compact_layers
from ..tost import ToST
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import DistInfo, barrier, init_distributed, pick_device
from .optim import build_optimizer, lr_factor, set_lr

__all__ = ["Trainer", "evaluate", "CHECKPOINT", "FINAL_MODEL"]

CHECKPOINT = "checkpoint.pt"
FINAL_MODEL = "model.pt"
CHECKPOINT_FORMAT = 1


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, device: torch.device) -> dict[str, float]:
    """Mean loss and accuracy (percent) of ``model`` over every batch of ``loader``."""
    was_training = model.training
    model.eval()
    loader.start_epoch(0)
    loss_sum, correct, n = 0.0, 0, 0
    for x, y, _ in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        n += len(y)
    model.train(was_training)
    return {"loss": loss_sum / max(n, 1), "acc": 100.0 * correct / max(n, 1)}


@dataclass
class _Progress:
    epoch: int = 0
    step: int = 0  # global optimizer steps taken
    elapsed: float = 0.0  # wall seconds of training so far, across resumes


class Trainer:
    """Train ``cfg``'s model (or a given ``model``) on its dataset, writing to ``cfg.run.out_dir``.

    ``datasets`` ({"train", "test"} ArrayDatasets) and ``model`` let Python users
    bring their own; otherwise both come from the config. ``masks`` gives a static
    method its mask instead of computing one (lottery tickets).
    """

    def __init__(
        self,
        cfg: Config,
        model: nn.Module | None = None,
        datasets: dict[str, ArrayDataset] | None = None,
        masks: dict[str, torch.Tensor] | None = None,
    ):
        self.cfg = cfg
        self.out = Path(cfg.run.out_dir)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.device = pick_device(cfg.run.device)
        self.dist: DistInfo = init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = pick_device("cuda", self.dist.local_rank)
        torch.manual_seed(cfg.run.seed)
        info = DATASETS[cfg.data.dataset]
        splits = datasets or load_dataset(cfg.data.dataset, cfg.data.data_dir, download=cfg.data.download, cache_dir=cfg.data.cache_dir)
        train = splits["train"]
        self.val_loader = None
        if cfg.data.val_fraction > 0:
            train, val = split_validation(train, cfg.data.val_fraction, cfg.run.seed)
            self.val_loader = BatchLoader(val, info, cfg.run.eval_batch_size, train=False, channels_last=cfg.model.channels_last)
        self.train_loader = BatchLoader(
            train, info if cfg.data.augment else _no_augment(info), cfg.optim.batch_size, train=True, seed=cfg.run.seed,
            rank=self.dist.rank, world_size=self.dist.world_size, channels_last=cfg.model.channels_last,
        )
        self.test_loader = BatchLoader(splits["test"], info, cfg.run.eval_batch_size, train=False, channels_last=cfg.model.channels_last)
        self.input_shape = tuple(train.images.shape[1:])

        self.model = model if model is not None else build_model(cfg.model.name, info.num_classes, cfg.model.width)
        self.model.to(self.device)
        if cfg.model.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.steps_per_epoch = len(self.train_loader)  # on the full training set; the LR schedule counts in these
        self.total_steps = cfg.optim.epochs * self.steps_per_epoch
        self.method: Method = build_method(cfg)
        self.method.setup(SetupContext(
            model=self.model, optimizer=self.optimizer, generator=torch.Generator().manual_seed(cfg.run.seed + 7919),
            input_shape=self.input_shape, steps_per_epoch=self.steps_per_epoch, epochs=cfg.optim.epochs,
            batches=lambda: self._scoring_batches(train, info), given_masks=masks,
        ))
        de = cfg.sparsity.data_efficiency
        self.forgetting = ForgettingTracker(len(train), de.remove_epoch, de.remove_fraction, cfg.run.seed) if de.enabled else None
        self.flops = FlopMeter(measure_layer_costs(self.model, self.input_shape, self.device))
        self.flops.set_densities(self.method.weight_density(), self.method.grad_density())
        # after the FLOP count (it runs the model on a batch of 2): the backend times layers on real batches
        self.backend_layers = apply_backend(self.model, self.method.maskset, cfg.sparsity.backend) if cfg.sparsity.backend != "masked" else {}
        # after the FLOP count: ghost skips are accounted apart, as extra work while they live
        smoothing = cfg.recipe.label_smoothing if cfg.recipe.label_smoothing is not None else cfg.optim.label_smoothing
        self.criterion = nn.CrossEntropyLoss(label_smoothing=smoothing)
        self.recipe = ToST(cfg.recipe)
        self.recipe.setup(
            self.model, self.method.weight_density(), lambda: self._scoring_batches(train, info, count=1),
            self.input_shape, self.device, cfg.model.channels_last, cfg.optim.momentum, cfg.optim.weight_decay,
            masks=self.method.maskset.masks if self.method.maskset is not None else None, criterion=self.criterion,
        )
        if cfg.sparsity.compact_state:  # last: the recipe's rescaling above writes the dense weights
            compact_layers(self.backend_layers, self.method.maskset, self.optimizer)
        self.net = self.model
        if self.dist.enabled:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.progress = _Progress()
        self.snapshot: tuple[int, Path] | None = None  # (step, file): save the weights once at that step (lottery rewinding)
        self.is_main = self.dist.rank == 0

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "forgetting": self.forgetting.state_dict() if self.forgetting else {},
            "recipe": self.recipe.state_dict(),
            "method": self.method.state_dict(),
            "loader": self.train_loader.state_dict(),
            "flops": self.flops.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "progress": {"epoch": self.progress.epoch, "step": self.progress.step, "elapsed": self.progress.elapsed},
        }

    def load_state_dict(self, state: dict) -> None:
        # masks first: layers that store only kept weights take the saved layout before the weights load into it
        self.method.load_state_dict(state["method"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.forgetting:
            self.forgetting.load_state_dict(state["forgetting"])
        self.recipe.load_state_dict(state["recipe"])
        self.train_loader.load_state_dict(state["loader"])
        self.flops.load_state_dict(state["flops"])
        self.flops.set_densities(self.method.weight_density(), self.method.grad_density())
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        p = state["progress"]
        self.progress = _Progress(int(p["epoch"]), int(p["step"]), float(p["elapsed"]))

    def save(self) -> None:
        if self.is_main:
            save_checkpoint(self.state_dict(), self.out / CHECKPOINT)
        barrier()

    def _log(self, record: dict) -> None:
        if self.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ training
    def fit(self) -> dict:
        """Train to the configured number of epochs (resuming from the run directory if a checkpoint is there)."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if (self.out / CHECKPOINT).exists():
            self.load_state_dict(load_checkpoint(self.out / CHECKPOINT, self.device))
            if self.is_main:  # drop records logged after the checkpoint was taken
                kept = [ln for ln in _records(self.out / "metrics.jsonl") if json.loads(ln)["epoch"] <= self.progress.epoch]
                (self.out / "metrics.jsonl").write_text("".join(ln + "\n" for ln in kept))
        elif self.is_main:
            (self.out / "config.yaml").write_text(cfg.to_yaml())
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
        while self.progress.epoch < cfg.optim.epochs:
            train_stats = self.train_epoch()
            self.end_epoch(train_stats)
        return self.finish()

    def train_epoch(self) -> dict[str, float]:
        """Run the rest of the current epoch (all of it, or what is left after a resume)."""
        cfg, every = self.cfg, self.cfg.run.checkpoint_every_steps
        epoch = self.progress.epoch
        if self.train_loader.epoch != epoch or self.train_loader.position == 0:
            self.train_loader.start_epoch(epoch)
        self.net.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen = 0
        bar = tqdm(
            total=self.steps_per_epoch, initial=self.train_loader.position, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
            disable=not (cfg.run.progress and self.is_main), leave=False, mininterval=1.0, dynamic_ncols=True,
        )
        steps_now = len(self.train_loader)
        for x, y, idx in self.train_loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # the schedule runs on epochs: with fewer examples (data efficiency) each step covers more of it
            virtual = epoch * self.steps_per_epoch + (self.train_loader.position - 1) * self.steps_per_epoch // steps_now
            set_lr(self.optimizer, cfg.optim.lr, lr_factor(cfg.optim, virtual, self.total_steps, self.steps_per_epoch))
            self.recipe.on_progress(virtual / self.total_steps)
            out = self.net(x)
            loss = self.recipe.loss(out, y, x, self.criterion)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            changed = self.method.before_step(self.progress.step, self.optimizer)
            self.optimizer.step()
            self.recipe.after_backward(self.optimizer.param_groups[0]["lr"])
            self.progress.step += 1
            if self.snapshot and self.progress.step == self.snapshot[0] and self.is_main:
                save_checkpoint({"format": CHECKPOINT_FORMAT, "model": self.model.state_dict()}, self.snapshot[1])
            changed = self.method.after_step(self.progress.step, self.optimizer) or changed
            if changed:
                self.flops.set_densities(self.method.weight_density(), self.method.grad_density())
            samples = len(y) * self.dist.world_size
            extra = self.recipe.extra_flops(samples)
            if self.method.took_dense_gradient:
                extra += self._dense_gradient_flops(samples)
            self.flops.step(samples, extra)
            with torch.no_grad():
                hits = out.argmax(1) == y
                loss_sum += loss.detach() * len(y)
                correct += hits.sum()
            if self.forgetting:
                self.forgetting.record(idx, hits)
            seen += len(y)
            bar.update(1)
            if every and self.progress.step % every == 0 and self.train_loader.position < self.steps_per_epoch:
                self.progress.elapsed += time.perf_counter() - t0
                t0 = time.perf_counter()
                self.save()
        bar.close()
        self.progress.elapsed += time.perf_counter() - t0
        return {
            "train_loss": (loss_sum.item() / seen) if seen else math.nan,
            "train_acc": (100.0 * correct.item() / seen) if seen else math.nan,
        }

    def _full_schedule_samples(self, epochs: int | None = None) -> int:
        """Examples a dense run on the whole training set sees in ``epochs`` (default: all) epochs."""
        return len(self.train_loader.dataset) * (self.cfg.optim.epochs if epochs is None else epochs)

    def _dense_gradient_flops(self, samples: int) -> float:
        """Extra cost of a step that took the dense weight gradient instead of the masked one."""
        gd = self.method.grad_density() or {}
        return samples * sum(lc.weight_grad * (1 - gd.get(lc.name, 1.0)) for lc in self.flops.costs.layers)

    def _saved_bytes_per_step(self) -> int:
        """Bytes autograd keeps for backward in one training step (on a copy, so BN statistics stay put)."""
        x, y = self._scoring_batches(self.train_loader.dataset, self.train_loader.info, count=1)[0]
        net = copy.deepcopy(self.model).train()
        return saved_tensor_bytes(lambda: self.criterion(net(x), y).backward())

    def _scoring_batches(self, train: ArrayDataset, info, count: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches for data-driven mask scores (SNIP, GraSP), drawn apart from the training order."""
        loader = BatchLoader(train, info, self.cfg.optim.batch_size, train=True, seed=self.cfg.run.seed + 1,
                             channels_last=self.cfg.model.channels_last)
        out = []
        for x, y, _ in loader:
            out.append((x.to(self.device), y.to(self.device)))
            if len(out) == (count or self.cfg.sparsity.init_batches):
                break
        return out

    def end_epoch(self, train_stats: dict[str, float]) -> dict:
        """Close an epoch: method and data-efficiency updates, evaluation, one metrics record, checkpoint."""
        self.progress.epoch += 1
        if self.method.end_epoch(self.progress.epoch, self.optimizer):
            self.flops.set_densities(self.method.weight_density(), self.method.grad_density())
        if self.forgetting and (keep := self.forgetting.end_epoch(self.progress.epoch)) is not None:
            self.train_loader.set_active(keep)
            if self.is_main:
                (self.out / "removed_examples.json").write_text(json.dumps(self.forgetting.removed.tolist()))
        record = {"epoch": self.progress.epoch, "step": self.progress.step, "lr": self.optimizer.param_groups[0]["lr"], **train_stats}
        test = evaluate(self.model, self.test_loader, self.device)
        record.update(test_loss=test["loss"], test_acc=test["acc"])
        if self.val_loader is not None:
            val = evaluate(self.model, self.val_loader, self.device)
            record.update(val_loss=val["loss"], val_acc=val["acc"])
        record.update(
            sparsity=self.method.global_sparsity(),
            train_flops_rel=self.flops.relative(self._full_schedule_samples(self.progress.epoch)), wall_s=round(self.progress.elapsed, 2),
        )
        self._log(record)
        if self.is_main and self.cfg.run.progress:
            tqdm.write(
                f"epoch {record['epoch']}: loss {record['train_loss']:.4f}  test acc {record['test_acc']:.2f}%  "
                f"({record['wall_s']:.0f}s)"
            )
        self.save()
        return record

    def finish(self) -> dict:
        """Write the final model and a summary (``final.json``) with per-layer sparsity and FLOPs."""
        costs = self.flops.costs
        dense_infer = costs.forward_flops()
        saved = self._saved_bytes_per_step()
        wd = self.method.weight_density()
        summary = {
            "method": self.method.name,
            "model": self.cfg.model.name,
            "dataset": self.cfg.data.dataset,
            "epochs": self.cfg.optim.epochs,
            "seed": self.cfg.run.seed,
            "sparsity": self.method.global_sparsity(),
            "train_flops_rel": self.flops.relative(self._full_schedule_samples()),
            "infer_flops_rel": costs.forward_flops(wd) / dense_infer if dense_infer else 1.0,
            "train_flops": self.flops.spent["total"],
            "steps": self.progress.step,
            "steps_full_data": self.total_steps,
            "examples_removed": int(self.forgetting.removed.numel()) if self.forgetting else 0,
            "recipe": "+".join(self.cfg.recipe.components()) or None,
            "init_scales": self.recipe.init_scales or None,  # what rescaled initialisation multiplied each tensor by
            "backends": {n: m.backend for n, m in self.backend_layers.items()} or None,
            **self.method.summary(),
            "infer_flops_per_sample": costs.forward_flops(wd),
            "wall_s": round(self.progress.elapsed, 2),
            "saved_bytes_per_step": saved,
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "layers": [
                {"name": ls.name, "shape": list(ls.shape), "numel": ls.numel, "nonzeros": ls.nonzeros, "density": ls.density}
                for ls in self.method.layer_sparsity()
            ],
        }
        last = _last_record(self.out / "metrics.jsonl")
        summary.update({k: last[k] for k in ("test_acc", "test_loss", "val_acc", "train_loss") if k in last})
        if self.is_main:
            save_checkpoint({"format": CHECKPOINT_FORMAT, "model": self.method.export_state(self.model)}, self.out / FINAL_MODEL)
            (self.out / "final.json").write_text(json.dumps(summary, indent=2))
        barrier()
        return summary


def _records(path: Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def _last_record(path: Path) -> dict:
    lines = _records(path)
    return json.loads(lines[-1]) if lines else {}


def _no_augment(info):
    from dataclasses import replace

    return replace(info, crop_padding=0, flip=False)
