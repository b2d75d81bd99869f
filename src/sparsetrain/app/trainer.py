"""The training engine: one loop for dense and sparse training, resumable at any step.

The Trainer is a thin client of the public API: it builds the method with the same factory a user calls
(``sparsetrain.METHODS[cfg.sparsity.method]``, or a factory given from Python), runs its layers through the same
execution plan (``sp.use_execution``), builds the ToST recipe with ``sparsetrain.tost``, and drives them through
their one lifecycle: their work happens inside ``optimizer.step()``. What differs between images and text is a
task object (:mod:`.tasks`); the run directory (:mod:`.rundir`), evaluation (:mod:`.evaluation`), resume checks
(:mod:`.resume`) and accounting (:mod:`.run_accounting`) are modules of their own.

Everything that decides what happens next is in the checkpoint: model, optimizer, method state (masks, clock,
execution plan), recipe state, data-efficiency statistics, RNG state, data position and accounting (the learning
rate is a function of progress). A run killed at any point and restarted in the same directory continues exactly
as if it had not stopped.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import sys
import time
from dataclasses import replace
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..data.images import BatchLoader, split_validation
from ..execution.allocator import keep_freed_memory
from ..methods import METHODS, Sparsifier
from ..models import build_configured
from ..recipes import ForgettingTracker, ToST
from ..recipes.tost import tost
from .checkpoint import load_checkpoint
from .config import Config, ConfigError
from .distributed import DistInfo, init_distributed, pick_device, shard_model
from .evaluation import TokenCrossEntropy, evaluate
from .optim import build_optimizer, lr_factor, set_lr
from .persistence import Progress, Resumable, TrainingError
from .run_accounting import RunAccounting
from .rundir import CHECKPOINT, RunDirectory, load_run_model
from .tasks import make_task

__all__ = ["Trainer", "TrainingError", "method_seed"]


def method_seed(run_seed: int) -> int:
    """The ``seed`` the Trainer gives a method's factory for a run seeded ``run_seed`` (apart from the
    model's initialisation and the data order, which ``run_seed`` seeds directly)."""
    return run_seed + 7919


class Trainer(Resumable):
    """Train ``cfg``'s model (or a given ``model``) on its dataset, writing to ``cfg.run.out_dir``.

    From Python: ``datasets`` ({"train", "test"}: ArrayDatasets, the fast default, or any map-style
    ``torch.utils.data.Dataset`` of ``(input, label)`` items), ``model`` (any ``nn.Module``), ``loss_fn``
    (``loss_fn(output, target)``; default cross-entropy with the configured label smoothing) and ``method`` (a
    factory ``method(model, optimizer, *, steps_per_epoch, epochs)`` returning a sparsifier, e.g.
    ``functools.partial(sparsetrain.rigl, sparsity=0.9)``; default: the configured ``sparsity.method``) replace
    what the config would build.
    """

    def __init__(
        self,
        cfg: Config,
        model: nn.Module | None = None,
        datasets: dict | None = None,
        *,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        method: Callable[..., Sparsifier] | None = None,
    ):
        if cfg.sparsity.method_class().traits.rounds and method is None:
            raise ConfigError(
                f"method {cfg.sparsity.method!r} trains several rounds, each a run of its own: use "
                "sparsetrain.app.lottery_ticket(cfg) or `sparsetrain train` (the CLI runs the rounds), "
                "or pass method=partial(sparsetrain.lottery, ...) for one round"
            )
        self.cfg, self._explicit_loss = cfg, loss_fn is not None  # a loss of the user's is also the evaluation loss
        # The set-up order is part of the engine's meaning: each stage uses what the ones before made.
        self._setup_runtime()  # threads, device, process group, the global seed (model initialisation)
        self.out = RunDirectory(cfg.run.out_dir, self.is_main, cfg.run.tensorboard)
        self._setup_data(datasets)  # the task, its splits and resumable loaders; the length of an epoch
        self._setup_model(model, loss_fn)  # model on its device and layout, optimizer, loss
        self.method: Sparsifier = self._build_method(method)  # the same factory a user calls
        try:  # FLOP costs of the model as the method made it, before execution swaps layers
            self.accounting = RunAccounting(
                self.model,
                self.method,
                self.input_shape,
                self.device,
                len(self.train_set),
                cfg.optim.epochs,
                self.task.accounting_example(self.train_set),
            )
        except RuntimeError as e:  # the first forward pass: a model that does not take the data's input
            raise ConfigError(
                f"model {cfg.model.name!r} does not take {cfg.data.dataset}'s input of shape "
                f"{self.input_shape}: {str(e).splitlines()[0]}"
            ) from None
        self.flops = self.accounting.flops
        self.recipe: ToST | None = self._build_recipe()  # after the FLOP count: ghost skips are accounted apart
        self._setup_execution()  # the method's plan: backends, layout, compact layers (a resume's own plan)
        self._setup_parallel()  # data efficiency, the DDP wrapper or FSDP2 sharding, progress

    def _setup_runtime(self) -> None:
        if self.cfg.run.threads:
            torch.set_num_threads(self.cfg.run.threads)
        if self.cfg.run.keep_freed_memory:  # (off: the process's allocator is left as it is)
            keep_freed_memory()
        self.device = pick_device(self.cfg.run.device)
        self.dist: DistInfo = init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = pick_device("cuda", self.dist.local_rank)
        torch.manual_seed(self.cfg.run.seed)
        self.is_main = self.dist.rank == 0

    def _setup_data(self, datasets: dict | None) -> None:
        cfg = self.cfg
        self.task, splits = make_task(cfg, datasets)
        self.info, train, self.val_loader = self.task.info, splits["train"], None
        cl = self.channels_last = cfg.model.channels_last
        loader = lambda ds, bs, **kw: BatchLoader(ds, kw.pop("info", self.info), bs, channels_last=cl, **kw)  # noqa: E731
        if self.task.holds_out_validation(cfg):
            train, val = split_validation(train, cfg.data.val_fraction, cfg.run.seed)
            self.val_loader = loader(val, cfg.run.eval_batch_size, train=False)
        self.train_set = train
        info = self.info if cfg.data.augment else replace(self.info, crop_padding=0, flip=False)
        self.train_loader = loader(
            train,
            cfg.optim.batch_size,
            info=info,
            train=True,
            seed=cfg.run.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.test_loader = loader(splits["test"], cfg.run.eval_batch_size, train=False)
        self.input_shape = (
            tuple(train.images.shape[1:]) if hasattr(train, "images") else tuple(torch.as_tensor(train[0][0]).shape)
        )
        if len(self.train_loader) == 0:
            raise ConfigError(
                f"no training batch: {len(train)} training examples after data.val_fraction="
                f"{cfg.data.val_fraction}; lower data.val_fraction or use more data"
            )
        self.steps_per_epoch = len(self.train_loader)  # on the full training set; the LR schedule counts in these
        self.total_steps = cfg.optim.epochs * self.steps_per_epoch

    def _setup_model(self, model: nn.Module | None, loss_fn) -> None:
        cfg = self.cfg
        self.model = (
            model if model is not None else build_configured(cfg.model, self.info.num_classes, cfg.data.context)
        )
        self.model.to(self.device)
        if cfg.model.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.sharded = cfg.run.parallel == "fsdp"  # sharded last, in _setup_parallel, once compact layers exist
        if self.sharded and not self.dist.enabled:
            raise ConfigError(
                "run.parallel=fsdp shards the model over the processes torchrun starts: run "
                "`torchrun --nproc_per_node N -m sparsetrain.app.cli train ...` with N >= 2"
            )
        self.optimizer = build_optimizer(self.model, cfg.optim)
        smoothing = cfg.recipe.label_smoothing if cfg.recipe.label_smoothing is not None else cfg.optim.label_smoothing
        self.criterion = loss_fn if loss_fn is not None else TokenCrossEntropy(label_smoothing=smoothing)

    def _build_method(self, factory: Callable[..., Sparsifier] | None) -> Sparsifier:
        """The configured method through its factory (or the given one), with the length of training."""
        sc, length = self.cfg.sparsity, {"steps_per_epoch": self.steps_per_epoch, "epochs": self.cfg.optim.epochs}
        if factory is not None:
            return factory(self.model, self.optimizer, **length)
        make, kw = METHODS[sc.method], sc.method_kwargs()
        self.task.check_method(kw)
        if "seed" in inspect.signature(make).parameters:
            kw["seed"] = method_seed(self.cfg.run.seed)
        if kw.get("init") in ("snip", "grasp"):
            kw["batches"] = self._scoring_batches()
        if kw.get("init") == "synflow":
            kw["input_shape"] = self.input_shape
        return make(self.model, self.optimizer, **length, **kw)

    def _build_recipe(self) -> ToST | None:
        """``sparsetrain.tost`` with the recipe section's switches, or None when every switch is off."""
        rc = self.cfg.recipe
        if not rc.components():
            return None
        return tost(
            self.model,
            self.optimizer,
            steps_per_epoch=self.steps_per_epoch,
            epochs=self.cfg.optim.epochs,
            sparsifier=self.method,
            teacher=load_run_model(rc.teacher, self.device) if rc.teacher else None,
            input_shape=self.input_shape,
            channels_last=self.channels_last,
            **rc.tost_kwargs(),
            batches=self._scoring_batches(count=1) if rc.rescale_init == "gradinit" else None,
        )

    def _setup_execution(self) -> None:
        """The method's layers run as the config asks, through the plan a user gets from a factory's ``execution=``;
        a resumed run applies the plan it saved instead of timing again. Last of the model changes: the recipe's
        rescaling writes dense weights, which compact layers no longer hold."""
        sc, saved = self.cfg.sparsity, self._saved_plan()
        self.method.use_execution(dataclasses.replace(sc.execution_options(), execution=saved or sc.backend))
        if self.method.plan is None:  # auto: time on a training batch drawn apart from the training order
            self.method.choose_execution(self._scoring_batches(count=1)[0][0])
        if self.method.plan.layout is not None:  # batches come in the plan's layout (no copy in the model's hook)
            self.channels_last = self.method.plan.layout == "channels_last"
            for loader in (self.train_loader, self.val_loader, self.test_loader):
                if loader is not None:
                    loader.channels_last = self.channels_last

    def _setup_parallel(self) -> None:
        cfg, de = self.cfg, self.cfg.sparsity.data_efficiency
        self.forgetting = (
            ForgettingTracker(len(self.train_set), de.remove_epoch, de.remove_fraction, cfg.run.seed)
            if de.enabled
            else None
        )
        self.net = self.model
        if self.sharded:
            loose = [n for n, lp in self.method.plan.layers.items() if not lp.compact]
            if loose:
                raise ConfigError(
                    f"run.parallel=fsdp with backend {cfg.sparsity.backend!r}: layers {loose[:4]} were not "
                    "made compact (their kernels need the whole mask); use a backend that compacts them "
                    "(condensed for Linear, direct for Conv2d) or sparsity.backend=masked"
                )
            shard_model(self.model)  # FSDP2 replaces every parameter by its shard: a new optimizer, the method follows
            self.optimizer = build_optimizer(self.model, cfg.optim)
            self.method.rebind(self.optimizer)
        elif self.dist.enabled:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.progress = Progress()

    # ------------------------------------------------------------------ training
    def fit(self) -> dict:
        """Train to the configured number of epochs (resuming from the run directory if a checkpoint is there)."""
        with self.out.session():  # a writable folder with no links outside it, and this run the only one in it
            if (self.out / CHECKPOINT).exists():
                self.load_state_dict(load_checkpoint(self.out / CHECKPOINT, self.device))
                self.out.resumed(self.cfg, self.progress.epoch, changed=bool(getattr(self, "_changes", None)))
                if self.is_main and self.progress.epoch >= self.cfg.optim.epochs:
                    print(
                        f"{self.cfg.run.out_dir}: this run already finished ({self.progress.epoch} of "
                        f"{self.cfg.optim.epochs} epochs); nothing trained, its summary again. To train on: "
                        "--resume-with-changes optim.epochs=N; to start over: another run.out_dir",
                        file=sys.stderr,
                    )
            else:
                self.out.start(self.cfg)
                self.task.start(self.out)
            if self.is_main and self.cfg.run.progress:  # the thread count decides the speed on a shared CPU: say it
                tqdm.write(
                    f"training on {self.device} with {torch.get_num_threads()} thread{'s' * (torch.get_num_threads() != 1)} "
                    "(run.threads)"
                    + (f", OMP_WAIT_POLICY={policy}" if (policy := os.environ.get("OMP_WAIT_POLICY")) else ""),
                    file=sys.stderr,
                )
            while self.progress.epoch < self.cfg.optim.epochs:
                self.end_epoch(self.train_epoch())
            return self.finish()

    def train_epoch(self) -> dict[str, float]:
        """Run the rest of the current epoch (all of it, or what is left after a resume)."""
        # long: the training loop read top to bottom; checkpoints, progress and accounting are calls
        cfg, every, every_s, prog = (
            self.cfg,
            self.cfg.run.checkpoint_every_steps,
            self.cfg.run.checkpoint_every_seconds,
            self.progress,
        )
        epoch = prog.epoch
        if self.train_loader.epoch != epoch or self.train_loader.position == 0:
            self.train_loader.start_epoch(epoch)
            prog.loss_sum, prog.correct, prog.seen = torch.zeros((), dtype=torch.float64), 0, 0
        self.net.train()
        t0 = last_save = time.perf_counter()
        loss_sum, correct = prog.loss_sum.to(self.device), torch.tensor(prog.correct, device=self.device)
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=self.train_loader.position,
            desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
            disable=not (cfg.run.progress and self.is_main),
            leave=False,
            mininterval=1.0,
            dynamic_ncols=True,
        )
        steps_now = len(self.train_loader)
        for x, y, idx in self.train_loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # the schedule runs on epochs: with fewer examples (data efficiency) each step covers more of it
            virtual = (
                epoch * self.steps_per_epoch + (self.train_loader.position - 1) * self.steps_per_epoch // steps_now
            )
            set_lr(self.optimizer, cfg.optim.lr, lr_factor(cfg.optim, virtual, self.total_steps, self.steps_per_epoch))
            self.accounting.refresh()  # the densities this step's passes run at (last step's updates included)
            out = self.net(x)
            loss = self.recipe.loss(out, y, x, self.criterion) if self.recipe else self.criterion(out, y)
            if not torch.isfinite(loss.detach()):
                bar.close()
                raise TrainingError(
                    f"the training loss is {loss.item()} at step {prog.step + 1} (epoch {epoch + 1}, learning rate "
                    f"{self.optimizer.param_groups[0]['lr']:.4g}): stopped before the weights changed; the checkpoint of "
                    f"{self.out.path} holds the last good state. Lower optim.lr (or check the data) and run again to resume"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            samples = len(y) * self.dist.world_size
            extra = self.recipe.extra_flops(samples) if self.recipe else 0.0  # the ghost skips of this step
            self.optimizer.step()  # the method's and the recipe's work (and step hooks such as rewinding) in here
            prog.step += 1
            self.accounting.step(samples, extra)
            with torch.no_grad():
                hits = out.argmax(-1) == y  # per example, or per position for a language model
                loss_sum += loss.detach().double() * y.numel()
                correct += hits.sum()
            if self.forgetting:
                self.forgetting.record(idx, hits)
            prog.seen += y.numel()  # targets: examples, or tokens
            bar.update(1)
            now = time.perf_counter()
            due = (every and prog.step % every == 0) or (every_s and now - last_save >= every_s)
            if due and self.train_loader.position < self.steps_per_epoch:  # the epoch's end saves anyway
                prog.elapsed += now - t0
                prog.loss_sum, prog.correct = loss_sum.detach().cpu(), int(correct)
                self.save()
                t0 = last_save = time.perf_counter()
        bar.close()
        prog.elapsed += time.perf_counter() - t0
        prog.loss_sum, prog.correct = loss_sum.detach().cpu(), int(correct)
        return {
            "train_loss": float(loss_sum) / prog.seen if prog.seen else math.nan,
            "train_acc": 100.0 * int(correct) / prog.seen if prog.seen else math.nan,
        }

    def _scoring_batches(self, count: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches for data-driven choices (SNIP, GraSP, auto's timing), drawn apart from the training order."""
        loader = BatchLoader(
            self.train_set,
            self.train_loader.info,
            self.cfg.optim.batch_size,
            train=True,
            seed=self.cfg.run.seed + 1,
            channels_last=self.channels_last,
        )
        out = []
        for x, y, _ in loader:
            out.append((x.to(self.device), y.to(self.device)))
            if len(out) == (count or self.cfg.sparsity.init_batches):
                break
        return out

    def end_epoch(self, train_stats: dict[str, float]) -> dict:
        """Close an epoch: data-efficiency updates, evaluation, one metrics record, checkpoint (the method's epoch-end
        work, MEST's mutation or SWAT-M's budgets, ran inside the epoch's last step)."""
        self.progress.epoch += 1
        if self.forgetting and (keep := self.forgetting.end_epoch(self.progress.epoch)) is not None:
            self.train_loader.set_active(keep)
            self.method.steps_per_epoch = len(self.train_loader)  # epoch-based schedules stay on epochs
            self.out.write_json("removed_examples.json", self.forgetting.removed.tolist())
        record = {
            "epoch": self.progress.epoch,
            "step": self.progress.step,
            "lr": self.optimizer.param_groups[0]["lr"],
            **train_stats,
        }
        eval_loss = self.criterion if self._explicit_loss else None  # a loss of the user's; else plain cross-entropy
        record.update(self.task.eval_figures(evaluate(self.model, self.test_loader, self.device, eval_loss)))
        if self.val_loader is not None:
            val = evaluate(self.model, self.val_loader, self.device, eval_loss)
            record.update(val_loss=val["loss"], val_acc=val["acc"])
        if bad := [
            k for k in ("test_loss", "val_loss") if not math.isfinite(record.get(k, 0.0))
        ]:  # diverged at the end
            raise TrainingError(
                f"the {bad[0].replace('_', ' ')} is {record[bad[0]]} after step {self.progress.step} (epoch "
                f"{self.progress.epoch}): the weights diverged; the checkpoint of {self.out.path} holds the "
                "last good state. Lower optim.lr (or check the data) and run again to resume"
            )
        record.update(
            sparsity=self.method.sparsity(),
            train_flops_rel=self.accounting.relative(self.progress.epoch),
            wall_s=round(self.progress.elapsed, 2),
        )
        self.out.log(record, self.method)
        if self.is_main and self.cfg.run.progress:
            tqdm.write(
                f"epoch {record['epoch']}: loss {record['train_loss']:.4f}  {self.task.shown(record)}  "
                f"({record['wall_s']:.0f} s since the start)"
            )
        self.save()
        return record
