"""The training engine: one loop for dense and sparse training, resumable at any step.

The Trainer is a client of the public API: it builds the method with the same factory a user
calls (``sparsetrain.METHODS[cfg.sparsity.method]``, or a factory given from Python) and the
ToST recipe with ``sparsetrain.tost``, and drives them through their one lifecycle
(:mod:`sparsetrain.methods.base`): their work happens inside ``optimizer.step()``.

Everything that decides what happens next is in the checkpoint: model, optimizer, method
state (masks, clock), recipe state, data-efficiency statistics, RNG state, data position and
accounting (the learning rate is a function of progress). A run killed at any point and
restarted in the same directory continues exactly as if it had not stopped.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..accounting import FlopMeter, measure_layer_costs, peak_memory_bytes, saved_tensor_bytes
from ..config import Config, ConfigError, load_config
from ..data import DATASETS, TEXT_DATASETS, BatchLoader, load_dataset, split_validation
from ..execution.backends import TIMING_SHARE, apply_backend, choose_now, settle_layout
from ..execution.swat_layers import swat_backend
from ..execution.channel_pairs import shrink_both_sides
from ..execution.compact import compact_layers
from ..methods import METHODS, Sparsifier
from ..models import build_configured
from ..recipes import ForgettingTracker, ToST
from ..recipes.tost import tost
from ..sharding import whole
from ..text import load_text
from .checkpoint import CheckpointError, load_checkpoint, load_sharded, save_checkpoint, save_sharded
from .distributed import DistInfo, barrier, init_distributed, pick_device, shard_model
from .optim import build_optimizer, lr_factor, set_lr

__all__ = ["Trainer", "TrainingError", "evaluate", "token_cross_entropy", "TokenCrossEntropy", "method_seed", "load_run_model", "CHECKPOINT", "FINAL_MODEL"]

CHECKPOINT = "checkpoint.pt"
SHARDED_CHECKPOINT = "checkpoint.dcp"  # beside CHECKPOINT under run.parallel=fsdp: model, optimizer, method, by shard
FINAL_MODEL = "model.pt"
CHECKPOINT_FORMAT = 2
MethodFactory = Callable[..., Sparsifier]
# config keys a resume may change freely (how the run is watched and where things are, not what it computes)
_HARMLESS = ("run.progress", "run.threads", "run.device", "run.eval_batch_size", "run.checkpoint_every_steps",
             "run.checkpoint_every_seconds", "run.out_dir", "run.resume_with_changes", "data.data_dir",
             "data.cache_dir", "data.download")
# and those it may change with run.resume_with_changes (the schedule of the rest of the run, recorded)
_SAFE_TO_CHANGE = ("optim.epochs", "optim.lr", "optim.schedule", "optim.warmup_epochs", "optim.milestones",
                    "optim.gamma", "optim.weight_decay")


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message names the step and what to change."""


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_changes(saved: dict, now: dict) -> dict[str, tuple]:
    """``{key: (saved value, value now)}`` for every config key that differs, harmless ones left out. A key the
    saved run did not know (added by a later version) is no change while it holds its default: the run computes
    what it computed."""
    a, b = _flat(saved), _flat(now)
    defaults = _flat(Config().model_dump(mode="json"))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not k.startswith(_HARMLESS)
            and not (k not in a and k in defaults and b.get(k) == defaults[k])}


def data_fingerprint(*datasets) -> str:
    """A short hash of the training data: sizes, labels and image bytes of arrays; sizes of other datasets."""
    h = hashlib.sha1()
    for d in datasets:
        h.update(str(len(d)).encode())
        if hasattr(d, "images"):
            h.update(d.labels.numpy().tobytes())
            h.update(d.images.numpy().tobytes())
    return h.hexdigest()[:16]


def strict_json(obj):
    """``obj`` with non-finite floats as None, so the JSON written is strict (no NaN literals)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def method_seed(run_seed: int) -> int:
    """The ``seed`` the Trainer gives a method's factory for a run seeded ``run_seed`` (apart from the
    model's initialisation and the data order, which ``run_seed`` seeds directly)."""
    return run_seed + 7919


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, device: torch.device,
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """Mean loss (``loss_fn``, default cross-entropy; per target) and accuracy (percent of targets) of ``model``
    over ``loader``. Targets are one label per example, or one per position for language models."""
    was_training = model.training
    model.eval()
    loader.start_epoch(0)
    loss_sum, correct, n = 0.0, 0, 0
    for x, y, _ in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss = token_cross_entropy(out, y) if loss_fn is None else loss_fn(out, y)
        loss_sum += loss.item() * y.numel()
        correct += (out.argmax(-1) == y).sum().item()
        n += y.numel()
    model.train(was_training)
    return {"loss": loss_sum / max(n, 1), "acc": 100.0 * correct / max(n, 1)}


def token_cross_entropy(out: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of scores ``[N, C]`` against ``[N]``, or ``[N, T, C]`` against ``[N, T]`` (next tokens)."""
    return F.cross_entropy(out.flatten(0, -2), y.flatten(), label_smoothing=label_smoothing)


class TokenCrossEntropy(nn.Module):
    """:func:`token_cross_entropy` as a module (the Trainer's default loss, for images and text alike)."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return token_cross_entropy(out, y, self.label_smoothing)


@dataclass
class _Progress:
    epoch: int = 0
    step: int = 0  # global optimizer steps taken
    elapsed: float = 0.0  # wall seconds of training so far, across resumes
    # the current epoch's running sums (checkpointed, so an epoch's loss and accuracy span a resume)
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    correct: int = 0
    seen: int = 0


class Trainer:
    """Train ``cfg``'s model (or a given ``model``) on its dataset, writing to ``cfg.run.out_dir``.

    From Python: ``datasets`` ({"train", "test"}: ArrayDatasets, the fast default, or any map-style
    ``torch.utils.data.Dataset`` of ``(input, label)`` items), ``model`` (any ``nn.Module``),
    ``loss_fn`` (``loss_fn(output, target)``; default cross-entropy with the configured label
    smoothing) and ``method`` (a factory ``method(model, optimizer, *, steps_per_epoch, epochs)``
    returning a sparsifier, e.g. ``functools.partial(sparsetrain.rigl, sparsity=0.9)``; default:
    the configured ``sparsity.method``) replace what the config would build.
    """

    def __init__(
        self,
        cfg: Config,
        model: nn.Module | None = None,
        datasets: dict | None = None,
        *,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        method: MethodFactory | None = None,
    ):
        if cfg.sparsity.method == "lottery" and method is None:
            raise ConfigError("method 'lottery' trains several rounds, each a run of its own: use "
                              "sparsetrain.train.lottery_ticket(cfg) or `sparsetrain train` (the CLI runs the rounds), "
                              "or pass method=partial(sparsetrain.lottery, ...) for one round")
        self.cfg = cfg
        self.out = Path(cfg.run.out_dir)
        self._explicit_loss = loss_fn is not None
        # The set-up order is part of the engine's meaning: each stage uses what the ones before made.
        self._setup_runtime()              # threads, device, process group, the global seed (model initialisation)
        self._setup_data(datasets)         # splits and resumable loaders; the length of an epoch
        self._setup_model(model, loss_fn)  # model on its device and layout, optimizer, loss
        self.method: Sparsifier = self._build_method(method)  # the same factory a user calls
        self._setup_accounting()           # FLOP costs of the model as the method made it, before execution swaps layers
        self._setup_execution()            # backends time layers on real batches (after the FLOP count's batch of 2)
        self.recipe: ToST | None = self._build_recipe()  # after the FLOP count: ghost skips are accounted apart
        self._setup_compact_state()        # last of the model changes: the recipe's rescaling writes dense weights
        self._setup_parallel()             # data efficiency, the DDP wrapper or FSDP2 sharding, progress
        self.snapshot: tuple[int, Path] | None = None  # (step, file): save the weights once at that step (lottery rewinding)

    def _setup_runtime(self) -> None:
        cfg = self.cfg
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.device = pick_device(cfg.run.device)
        self.dist: DistInfo = init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = pick_device("cuda", self.dist.local_rank)
        torch.manual_seed(cfg.run.seed)
        self.is_main = self.dist.rank == 0

    def _setup_model(self, model: nn.Module | None, loss_fn) -> None:
        cfg = self.cfg
        self.model = model if model is not None else build_configured(cfg.model, self.info.num_classes, cfg.data.context)
        self.model.to(self.device)
        if cfg.model.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.sharded = cfg.run.parallel == "fsdp"  # sharded last, in _setup_parallel, once compact layers exist
        if self.sharded and not self.dist.enabled:
            raise ConfigError("run.parallel=fsdp shards the model over the processes torchrun starts: run "
                              "`torchrun --nproc_per_node N -m sparsetrain.cli train ...` with N >= 2")
        self.optimizer = build_optimizer(self.model, cfg.optim)
        smoothing = cfg.recipe.label_smoothing if cfg.recipe.label_smoothing is not None else cfg.optim.label_smoothing
        self.criterion = loss_fn if loss_fn is not None else TokenCrossEntropy(label_smoothing=smoothing)

    def _setup_accounting(self) -> None:
        try:
            example = torch.stack([torch.as_tensor(self.train_set[i][0]) for i in range(2)]) if self.vocab is not None else None
            costs = measure_layer_costs(self.model, self.input_shape, self.device, example=example)
        except RuntimeError as e:  # the first forward pass: a model that does not take the data's input
            raise ConfigError(f"model {self.cfg.model.name!r} does not take {self.cfg.data.dataset}'s input of shape "
                              f"{self.input_shape}: {str(e).splitlines()[0]}") from None
        self.flops = FlopMeter(costs)
        self.flops.set_densities(self.method.weight_density(), self.method.grad_density())
        self._densities_at = self.method.version

    def _setup_execution(self) -> None:
        backend = self.cfg.sparsity.backend
        if self.cfg.sparsity.method == "swat":  # SWAT's convolutions take the direct kernels themselves
            self.backend_layers = swat_backend(self.model, backend)
        else:
            self.backend_layers = apply_backend(self.model, self.method.maskset, backend) if backend != "masked" else {}
        if self.cfg.sparsity.channel_both_sides:
            shrink_both_sides(self.model, self.backend_layers)
        if backend == "auto" and self.backend_layers and self.vocab is None:
            # per-layer choices ignore the layout between layers: check the whole step against masked channels-last
            x, y = self._scoring_batches(count=1)[0]
            x, y = x[:max(1, len(x) // TIMING_SHARE)], y[:max(1, len(y) // TIMING_SHARE)]
            fmt = settle_layout(self.model, self.backend_layers,
                                lambda f: self.criterion(self.model(x.contiguous(memory_format=f)), y))
            self._set_layout(fmt == torch.channels_last)
        elif backend == "auto" and self.cfg.sparsity.compact_state:  # text: the layers choose now, before compaction
            x, y = self._scoring_batches(count=1)[0]
            choose_now(self.model, lambda: self.criterion(self.model(x), y))

    def _set_layout(self, channels_last: bool) -> None:
        """Run the model, and feed it batches, channels-last or NCHW (``auto``'s layout, kept on resume)."""
        self.channels_last = channels_last
        self.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        for loader in (self.train_loader, self.val_loader, self.test_loader):
            if loader is not None:
                loader.channels_last = channels_last

    def _setup_compact_state(self) -> None:
        if self.cfg.sparsity.compact_state:
            compact_layers(self.backend_layers, self.method.maskset, self.optimizer)

    def _setup_parallel(self) -> None:
        cfg = self.cfg
        de = cfg.sparsity.data_efficiency
        self.forgetting = ForgettingTracker(len(self.train_set), de.remove_epoch, de.remove_fraction, cfg.run.seed) if de.enabled else None
        self.net = self.model
        if self.sharded:
            loose = [n for n, m in self.backend_layers.items() if not hasattr(m, "values")]
            if loose:
                raise ConfigError(f"run.parallel=fsdp with backend {cfg.sparsity.backend!r}: layers {loose[:4]} were not "
                                  "made compact (their kernels need the whole mask); use a backend that compacts them "
                                  "(condensed for Linear, direct for Conv2d) or sparsity.backend=masked")
            # FSDP2 replaces every parameter by its shard: the optimizer is built anew and the method follows
            shard_model(self.model)
            self.optimizer = build_optimizer(self.model, cfg.optim)
            self.method.rebind(self.optimizer)
        elif self.dist.enabled:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.progress = _Progress()

    def _setup_data(self, datasets: dict | None) -> None:
        cfg = self.cfg
        self.info = DATASETS[cfg.data.dataset]
        self.vocab = None
        if datasets is None and cfg.data.dataset in TEXT_DATASETS:
            if cfg.data.data_dir is None:
                raise ConfigError("dataset 'text' reads a UTF-8 file: pass it with --data-dir (data.data_dir)")
            splits, self.vocab = load_text(cfg.data.data_dir, cfg.data.context, cfg.data.val_fraction or 0.1,
                                           cfg.data.stride, cfg.run.seed)
            self.info = replace(self.info, num_classes=len(self.vocab), image_shape=(cfg.data.context,))
        else:
            splits = datasets or load_dataset(cfg.data.dataset, cfg.data.data_dir, download=cfg.data.download,
                                              cache_dir=cfg.data.cache_dir)
        missing = {"train", "test"} - set(splits)
        if missing:
            raise ValueError(f"datasets must hold 'train' and 'test' splits; missing {sorted(missing)}")
        train = splits["train"]
        self.val_loader = None
        cl = self.channels_last = cfg.model.channels_last
        if cfg.data.val_fraction > 0 and self.vocab is None:  # text holds out the file's tail as its "test" split
            train, val = split_validation(train, cfg.data.val_fraction, cfg.run.seed)
            self.val_loader = BatchLoader(val, self.info, cfg.run.eval_batch_size, train=False, channels_last=cl)
        self.train_set = train
        self.train_loader = BatchLoader(
            train, self.info if cfg.data.augment else _no_augment(self.info), cfg.optim.batch_size, train=True,
            seed=cfg.run.seed, rank=self.dist.rank, world_size=self.dist.world_size, channels_last=cl,
        )
        self.test_loader = BatchLoader(splits["test"], self.info, cfg.run.eval_batch_size, train=False, channels_last=cl)
        self.input_shape = tuple(train.images.shape[1:]) if hasattr(train, "images") else tuple(torch.as_tensor(train[0][0]).shape)
        if len(self.train_loader) == 0:
            raise ConfigError(f"no training batch: {len(train)} training examples after data.val_fraction="
                              f"{cfg.data.val_fraction}; lower data.val_fraction or use more data")
        self.steps_per_epoch = len(self.train_loader)  # on the full training set; the LR schedule counts in these
        self.total_steps = cfg.optim.epochs * self.steps_per_epoch

    def _build_method(self, factory: MethodFactory | None) -> Sparsifier:
        """The configured method through its factory (or the given one), with the length of training."""
        sc = self.cfg.sparsity
        length = {"steps_per_epoch": self.steps_per_epoch, "epochs": self.cfg.optim.epochs}
        if factory is not None:
            return factory(self.model, self.optimizer, **length)
        make = METHODS[sc.method]
        kw = sc.method_kwargs()
        if "seed" in inspect.signature(make).parameters:
            kw["seed"] = method_seed(self.cfg.run.seed)
        if kw.get("init") in ("snip", "grasp"):
            kw["batches"] = self._scoring_batches()
        if kw.get("init") == "synflow":
            if self.vocab is not None:
                raise ConfigError("sparsity.init=synflow scores weights with an all-ones input, which a model of token "
                                  "ids does not take; use random, magnitude, snip or grasp for text")
            kw["input_shape"] = self.input_shape
        return make(self.model, self.optimizer, **length, **kw)

    def _build_recipe(self) -> ToST | None:
        """``sparsetrain.tost`` with the recipe section's switches, or None when every switch is off."""
        rc = self.cfg.recipe
        if not rc.components():
            return None
        teacher = load_run_model(rc.teacher, self.device) if rc.teacher else None
        return tost(
            self.model, self.optimizer, steps_per_epoch=self.steps_per_epoch, epochs=self.cfg.optim.epochs,
            sparsifier=self.method, ghost_soft=rc.ghost_soft, soft_activation=rc.soft_activation,
            soft_hold=rc.soft_hold, soft_blend_end=rc.soft_blend_end, ghost_skip=rc.ghost_skip, skip_end=rc.skip_end,
            rescale_init=rc.rescale_init, gradinit_steps=rc.gradinit_steps, label_smoothing=rc.label_smoothing or 0.0,
            teacher=teacher, teacher_weight=rc.teacher_weight, teacher_temperature=rc.teacher_temperature,
            batches=self._scoring_batches(count=1) if rc.rescale_init == "gradinit" else None,
            input_shape=self.input_shape, channels_last=self.channels_last,
        )

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Everything a resumed run needs: model, optimizer, method, recipe, data position, RNG, accounting."""
        sharded = self.sharded  # then model, optimizer and method go to SHARDED_CHECKPOINT, by shard
        return {
            "format": CHECKPOINT_FORMAT,
            "sharded": sharded,
            "model": {} if sharded else self.model.state_dict(),
            "optimizer": {} if sharded else self.optimizer.state_dict(),
            "forgetting": self.forgetting.state_dict() if self.forgetting else {},
            "recipe": self.recipe.state_dict() if self.recipe else {},
            "method": {} if sharded else self.method.state_dict(),
            "loader": self.train_loader.state_dict(),
            "flops": self.flops.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "progress": {"epoch": self.progress.epoch, "step": self.progress.step, "elapsed": self.progress.elapsed,
                         "loss_sum": self.progress.loss_sum.cpu(), "correct": self.progress.correct, "seen": self.progress.seen},
            "fingerprint": self._fingerprint(),
            "backend_choices": {n: m.backend for n, m in self.backend_layers.items()},
            "channels_last": self.channels_last,
        }

    def _fingerprint(self) -> dict:
        """What the run computes: the resolved config and the training data (a resume must match them)."""
        if not hasattr(self, "_data_fp"):
            self._data_fp = data_fingerprint(self.train_set, self.test_loader.dataset)
        return {"config": self.cfg.model_dump(mode="json"), "data": self._data_fp, "changes": getattr(self, "_changes", [])}

    def _check_fingerprint(self, saved: dict) -> None:
        """Refuse to resume under another config or other data, naming what changed; with
        ``run.resume_with_changes`` accept changes to the rest of the schedule, and record them."""
        if saved["data"] != self._fingerprint()["data"]:
            raise CheckpointError(f"{self.out}: the training data differ from those the run started on "
                                  f"(fingerprint {saved['data']} then, {self._data_fp} now); start a new run directory")
        changes = config_changes(saved["config"], self.cfg.model_dump(mode="json"))
        diff = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
        unsafe = [k for k in changes if not k.startswith(_SAFE_TO_CHANGE)]
        if changes and (unsafe or not self.cfg.run.resume_with_changes):
            hint = (f"these cannot change within a run: {', '.join(unsafe)}; start a new run directory" if unsafe else
                    "to continue with them anyway, set run.resume_with_changes=true (sparsetrain train --resume-with-changes)")
            raise CheckpointError(f"{self.out} holds a run with another configuration ({diff}); {hint}")
        self._changes = list(saved.get("changes", [])) + ([{"step": self.progress.step, "changes": diff}] if changes else [])

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (method and recipe first, then the weights into their layout)."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"checkpoint format {state.get('format')!r} is not this version's ({CHECKPOINT_FORMAT}); "
                                  "start the run in a new directory")
        p = state["progress"]
        self.progress = _Progress(int(p["epoch"]), int(p["step"]), float(p["elapsed"]), p["loss_sum"].to(torch.float64),
                                  int(p["correct"]), int(p["seen"]))
        self._check_fingerprint(state["fingerprint"])
        for n, choice in state.get("backend_choices", {}).items():  # the run keeps the backends it chose
            if n in self.backend_layers:
                self.backend_layers[n].fix_backend(choice)
        if state.get("channels_last", self.channels_last) != self.channels_last:  # and the layout it chose
            self._set_layout(bool(state["channels_last"]))
        try:
            self._load_states(state)
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{self.out / CHECKPOINT} does not fit this model and method ({type(e).__name__}: "
                                  f"{str(e)[:300]}); start a new run directory") from None

    def _load_states(self, state: dict) -> None:
        # method and recipe first: layers that store only kept weights take the saved layout, and removed
        # ghost activations leave, before the weights load into the model
        if bool(state.get("sharded")) != self.sharded:
            raise ValueError(f"the checkpoint was written {'with' if state.get('sharded') else 'without'} run.parallel=fsdp; "
                             "resume it the same way, or load its model and optimizer with sparsetrain.train.checkpoint")
        if self.sharded:
            load_sharded(self.out / SHARDED_CHECKPOINT, self.model, self.optimizer, self.method)
        else:
            self.method.load_state_dict(state["method"])
        if self.recipe:
            self.recipe.load_state_dict(state["recipe"])
        if not self.sharded:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        if self.forgetting:
            self.forgetting.load_state_dict(state["forgetting"])
        self.train_loader.load_state_dict(state["loader"])
        self.flops.load_state_dict(state["flops"])
        self._refresh_densities(force=True)
        if self.forgetting and self.forgetting.removed.numel():
            self.method.steps_per_epoch = len(self.train_loader)
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])

    def save(self) -> None:
        """Write the checkpoint (rank 0; under FSDP every rank writes its shards first) and wait for every rank."""
        if self.sharded:
            save_sharded(self.out / SHARDED_CHECKPOINT, self.model, self.optimizer, self.method)
        if self.is_main:
            save_checkpoint(self.state_dict(), self.out / CHECKPOINT)
        barrier()

    def _log(self, record: dict) -> None:
        if self.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")

    # ------------------------------------------------------------------ training
    def fit(self) -> dict:
        """Train to the configured number of epochs (resuming from the run directory if a checkpoint is there)."""
        cfg = self.cfg
        self._prepare_run_directory()
        if (self.out / CHECKPOINT).exists():
            self.load_state_dict(load_checkpoint(self.out / CHECKPOINT, self.device))
            if self.is_main:  # drop records logged after the checkpoint was taken
                kept = [ln for ln in _records(self.out / "metrics.jsonl") if json.loads(ln)["epoch"] <= self.progress.epoch]
                (self.out / "metrics.jsonl").write_text("".join(ln + "\n" for ln in kept))
                if getattr(self, "_changes", None):  # resumed with changes: the directory describes the run as it goes on
                    (self.out / "config.yaml").write_text(cfg.to_yaml())
        elif self.is_main:
            (self.out / "config.yaml").write_text(cfg.to_yaml())
            if self.vocab is not None:
                self.vocab.save(self.out / "vocab.json")  # what `sparsetrain sample` decodes with
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
        while self.progress.epoch < cfg.optim.epochs:
            train_stats = self.train_epoch()
            self.end_epoch(train_stats)
        return self.finish()

    def _prepare_run_directory(self) -> None:
        """The run directory exists and is writable, or a ConfigError names run.out_dir and why not."""
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"run.out_dir={self.out} is a file, not a directory")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.out, prefix=".write-test-"):  # unique per process (ranks share it)
                pass
        except OSError as e:
            raise ConfigError(f"run.out_dir={self.out} cannot be written ({e.strerror or e})") from None

    def train_epoch(self) -> dict[str, float]:
        """Run the rest of the current epoch (all of it, or what is left after a resume)."""
        cfg, every, every_s = self.cfg, self.cfg.run.checkpoint_every_steps, self.cfg.run.checkpoint_every_seconds
        epoch = self.progress.epoch
        if self.train_loader.epoch != epoch or self.train_loader.position == 0:
            self.train_loader.start_epoch(epoch)
            self.progress.loss_sum, self.progress.correct, self.progress.seen = torch.zeros((), dtype=torch.float64), 0, 0
        self.net.train()
        t0 = last_save = time.perf_counter()
        loss_sum = self.progress.loss_sum.to(self.device)
        correct = torch.tensor(self.progress.correct, device=self.device)
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
            self._refresh_densities()  # the densities this step's passes run at (last step's updates included)
            out = self.net(x)
            loss = self.recipe.loss(out, y, x, self.criterion) if self.recipe else self.criterion(out, y)
            if not torch.isfinite(loss.detach()):
                bar.close()
                raise TrainingError(
                    f"the training loss is {loss.item()} at step {self.progress.step + 1} (epoch {epoch + 1}, learning rate "
                    f"{self.optimizer.param_groups[0]['lr']:.4g}): stopped before the weights changed; the checkpoint of "
                    f"{self.out} holds the last good state. Lower optim.lr (or check the data) and run again to resume")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            samples = len(y) * self.dist.world_size
            extra = self.recipe.extra_flops(samples) if self.recipe else 0.0  # the ghost skips of this step
            self.optimizer.step()  # the method's and the recipe's work happen in here (their step hooks)
            self.progress.step += 1
            if self.snapshot and self.progress.step == self.snapshot[0] and self.is_main:
                save_checkpoint({"format": CHECKPOINT_FORMAT, "model": self.model.state_dict()}, self.snapshot[1])
            if self.method.took_dense_gradient:
                extra += self._dense_gradient_flops(samples)
            self.flops.step(samples, extra)
            with torch.no_grad():
                hits = out.argmax(-1) == y  # per example, or per position for a language model
                loss_sum += loss.detach().double() * y.numel()
                correct += hits.sum()
            if self.forgetting:
                self.forgetting.record(idx, hits)
            self.progress.seen += y.numel()  # targets: examples, or tokens
            bar.update(1)
            now = time.perf_counter()
            due = (every and self.progress.step % every == 0) or (every_s and now - last_save >= every_s)
            if due and self.train_loader.position < self.steps_per_epoch:  # the epoch's end saves anyway
                self.progress.elapsed += now - t0
                self.progress.loss_sum, self.progress.correct = loss_sum.detach().cpu(), int(correct)
                self.save()
                t0 = last_save = time.perf_counter()
        bar.close()
        self.progress.elapsed += time.perf_counter() - t0
        seen = self.progress.seen
        self.progress.loss_sum, self.progress.correct = loss_sum.detach().cpu(), int(correct)
        return {
            "train_loss": (float(loss_sum) / seen) if seen else math.nan,
            "train_acc": (100.0 * int(correct) / seen) if seen else math.nan,
        }

    def _full_schedule_samples(self, epochs: int | None = None) -> int:
        """Examples a dense run on the whole training set sees in ``epochs`` (default: all) epochs."""
        return len(self.train_loader.dataset) * (self.cfg.optim.epochs if epochs is None else epochs)

    def _refresh_densities(self, force: bool = False) -> None:
        """Tell the FLOP meter the densities in use when the method changed them."""
        if force or self.method.version != self._densities_at:
            self.flops.set_densities(self.method.weight_density(), self.method.grad_density())
            self._densities_at = self.method.version

    def _dense_gradient_flops(self, samples: int) -> float:
        """Extra cost of a step that took the dense weight gradient instead of the masked one."""
        gd = self.method.grad_density() or {}
        return samples * sum(lc.weight_grad * (1 - gd.get(lc.name, 1.0)) for lc in self.flops.costs.layers)

    def _saved_bytes_per_step(self) -> int:
        """Bytes autograd keeps for backward in one training step (on a copy, so BN statistics stay put)."""
        x, y = self._scoring_batches(count=1)[0]
        net = copy.deepcopy(self.model).train()
        return saved_tensor_bytes(lambda: self.criterion(net(x), y).backward())

    def _scoring_batches(self, count: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches for data-driven mask scores (SNIP, GraSP), drawn apart from the training order."""
        loader = BatchLoader(self.train_set, self.train_loader.info, self.cfg.optim.batch_size, train=True, seed=self.cfg.run.seed + 1,
                             channels_last=self.channels_last)
        out = []
        for x, y, _ in loader:
            out.append((x.to(self.device), y.to(self.device)))
            if len(out) == (count or self.cfg.sparsity.init_batches):
                break
        return out

    def end_epoch(self, train_stats: dict[str, float]) -> dict:
        """Close an epoch: method and data-efficiency updates, evaluation, one metrics record, checkpoint."""
        self.progress.epoch += 1
        # the method's epoch-end work (MEST's mutation, SWAT-M's budgets) ran inside the epoch's last step
        if self.forgetting and (keep := self.forgetting.end_epoch(self.progress.epoch)) is not None:
            self.train_loader.set_active(keep)
            self.method.steps_per_epoch = len(self.train_loader)  # epoch-based schedules stay on epochs
            if self.is_main:
                (self.out / "removed_examples.json").write_text(json.dumps(self.forgetting.removed.tolist()))
        record = {"epoch": self.progress.epoch, "step": self.progress.step, "lr": self.optimizer.param_groups[0]["lr"], **train_stats}
        eval_loss = self.criterion if self._explicit_loss else None  # a loss of the user's; else plain cross-entropy
        test = evaluate(self.model, self.test_loader, self.device, eval_loss)
        if self.vocab is not None:  # text: the held-out tail validates; perplexity per character
            record.update(val_loss=test["loss"], val_acc=test["acc"], val_ppl=math.exp(min(test["loss"], 50.0)))
        else:
            record.update(test_loss=test["loss"], test_acc=test["acc"])
        if self.val_loader is not None:
            val = evaluate(self.model, self.val_loader, self.device, eval_loss)
            record.update(val_loss=val["loss"], val_acc=val["acc"])
        record.update(
            sparsity=self.method.sparsity(),
            train_flops_rel=self.flops.relative(self._full_schedule_samples(self.progress.epoch)), wall_s=round(self.progress.elapsed, 2),
        )
        self._log(record)
        if self.is_main and self.cfg.run.progress:
            shown = (f"val loss {record['val_loss']:.4f} (ppl {record['val_ppl']:.2f})" if self.vocab is not None
                     else f"test acc {record['test_acc']:.2f}%")
            tqdm.write(f"epoch {record['epoch']}: loss {record['train_loss']:.4f}  {shown}  ({record['wall_s']:.0f}s)")
        self.save()
        return record

    def finish(self) -> dict:
        """Write the final model and a summary (``final.json``) with per-layer sparsity and FLOPs."""
        costs = self.flops.costs
        dense_infer = costs.forward_flops()
        saved = None if self.sharded else self._saved_bytes_per_step()  # measured on a copy, which a sharded model has not
        wd = self.method.weight_density()
        summary = {
            "method": self.method.label,
            "model": self.cfg.model.name,
            "dataset": self.cfg.data.dataset,
            "epochs": self.cfg.optim.epochs,
            "seed": self.cfg.run.seed,
            "sparsity": self.method.sparsity(),
            "train_flops_rel": self.flops.relative(self._full_schedule_samples()),
            "infer_flops_rel": costs.forward_flops(wd) / dense_infer if dense_infer else 1.0,
            "train_flops": self.flops.spent["total"],
            "steps": self.progress.step,
            "steps_full_data": self.total_steps,
            "examples_removed": int(self.forgetting.removed.numel()) if self.forgetting else 0,
            "recipe": "+".join(self.recipe.components()) if self.recipe else None,
            "init_scales": (self.recipe.init_scales or None) if self.recipe else None,  # what rescaled initialisation multiplied each tensor by
            "resumed_with_changes": getattr(self, "_changes", None) or None,
            "backends": {n: m.ran or m.backend for n, m in self.backend_layers.items()} or None,  # what really ran
            **self.method.summary(),
            "infer_flops_per_sample": costs.forward_flops(wd),
            "wall_s": round(self.progress.elapsed, 2),
            "saved_bytes_per_step": saved,
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "layers": [
                {"name": ls.name, "shape": list(ls.shape), "numel": ls.numel, "nonzeros": ls.nonzeros, "density": ls.density}
                for ls in self.method.report()
            ],
        }
        last = _last_record(self.out / "metrics.jsonl")
        summary.update({k: last[k] for k in ("test_acc", "test_loss", "val_acc", "val_loss", "val_ppl", "train_loss") if k in last})
        weights = {k: whole(v) for k, v in self.method.export_state().items()}  # every rank gathers alike
        if self.is_main:
            save_checkpoint({"format": CHECKPOINT_FORMAT, "model": weights}, self.out / FINAL_MODEL)
            (self.out / "final.json").write_text(json.dumps(strict_json(summary), indent=2, allow_nan=False))
        barrier()
        return summary


def _records(path: Path) -> list[str]:
    """The complete records of a metrics file (a last line cut by a kill is left out)."""
    out = []
    for ln in path.read_text().splitlines() if path.exists() else []:
        try:
            json.loads(ln)
        except ValueError:
            continue
        out.append(ln)
    return out


def _last_record(path: Path) -> dict:
    lines = _records(path)
    return json.loads(lines[-1]) if lines else {}


def load_run_model(run_dir: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """A finished run's model (``config.yaml`` + ``model.pt``), frozen in eval mode (a ToST teacher)."""
    run = Path(run_dir)
    cfg = load_config(run / "config.yaml")
    model = build_configured(cfg.model, DATASETS[cfg.data.dataset].num_classes, cfg.data.context)
    model.load_state_dict(load_checkpoint(run / FINAL_MODEL)["model"])
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _no_augment(info):
    from dataclasses import replace

    return replace(info, crop_padding=0, flip=False)
