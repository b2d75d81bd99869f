"""The run directory: what a run writes (configuration, metrics records, checkpoints, the final model and summary)
and how it is prepared, trimmed on resume, and read back (:func:`load_run_model`)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from filelock import FileLock, Timeout

from ..data.images import DATASETS
from ..models import build_configured
from .artifact import save_sparse
from .checkpoint import load_checkpoint, save_checkpoint, write_atomic
from .config import Config, ConfigError, load_config

__all__ = [
    "RunDirectory",
    "CHECKPOINT",
    "SHARDED_CHECKPOINT",
    "FINAL_MODEL",
    "CHECKPOINT_FORMAT",
    "strict_json",
    "load_run_model",
]

CHECKPOINT = "checkpoint.pt"
SHARDED_CHECKPOINT = "checkpoint.dcp"  # beside CHECKPOINT under run.parallel=fsdp: model, optimizer, method, by shard
FINAL_MODEL = "model.pt"
FINAL_SPARSE_MODEL = "model.sparse.safetensors"  # the same weights, each sparse one as kept values and a bitmask
CHECKPOINT_FORMAT = 2
METRICS = "metrics.jsonl"


def strict_json(obj):
    """``obj`` with non-finite floats as None, so the JSON written is strict (no NaN literals)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


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


class RunDirectory:
    """``run.out_dir``: only the main process (``is_main``) writes; every method says what it writes.

    Every file is created by :func:`~sparsetrain.app.checkpoint.write_atomic` (a temporary file renamed into place,
    so never written through a link), a folder holding links that lead outside it is refused, and one lock per
    folder (:meth:`lock`) keeps a second run out while the first holds it."""

    def __init__(self, path: str | Path, is_main: bool = True, tensorboard: bool = False):
        self.path, self.is_main, self.tensorboard = Path(path), is_main, tensorboard
        self._lock: FileLock | None = None
        self._writer = None

    def write_text(self, name: str, text: str) -> None:
        """Create the file ``name`` holding ``text`` (atomically; never through a link)."""
        write_atomic(self.path / name, lambda f: f.write(text.encode()))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def prepare(self) -> None:
        """The directory exists, is writable, holds no link leading outside it, and is this run's alone (:meth:`lock`);
        or a ConfigError names run.out_dir and why not."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"run.out_dir={self.path} is a file, not a directory")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(
                dir=self.path, prefix=".write-test-"
            ):  # unique per process (ranks share it)
                pass
        except OSError as e:
            raise ConfigError(f"run.out_dir={self.path} cannot be written ({e.strerror or e})") from None
        here = self.path.resolve()
        outside = sorted(
            p.name for p in self.path.iterdir() if p.is_symlink() and here not in Path(os.path.realpath(p)).parents
        )
        if outside:
            raise ConfigError(
                f"run.out_dir={self.path} holds links that lead outside it ({', '.join(outside[:5])}); a run "
                "writes only its own files: remove the links, or choose another run.out_dir"
            )
        self.lock()
        if self.tensorboard and self.is_main:
            self._check_tensorboard_folder()

    def _check_tensorboard_folder(self) -> None:
        """``<out_dir>/tensorboard`` can be written, checked before the run trains (TensorBoard's writer would
        otherwise fail at the first epoch's end, or lose its events in a background thread)."""
        folder = self.path / "tensorboard"
        try:
            if folder.exists() and not folder.is_dir():
                raise NotADirectoryError(0, "a file, not a folder")
            folder.mkdir(exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
                pass
        except OSError as e:
            raise ConfigError(
                f"run.tensorboard=true: {folder} cannot be written ({e.strerror or e}); free that path, or set "
                "run.tensorboard=false"
            ) from None

    def lock(self) -> None:
        """Hold this folder's lock for the life of the process (the main process only): a second run on the same
        folder stops at once with a ConfigError naming the holder's process id. The lock is the kernel's, so a
        killed run leaves none behind."""
        if not self.is_main or self._lock is not None:
            return
        lock = FileLock(str(self.path / ".lock"), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            holder = (self.path / ".lock.pid").read_text().strip() if (self.path / ".lock.pid").exists() else "unknown"
            raise ConfigError(
                f"run.out_dir={self.path} is in use by another run (process {holder}); wait for it to "
                "end, or choose another run.out_dir"
            ) from None
        self._lock = lock
        self.write_text(".lock.pid", str(os.getpid()))

    def unlock(self) -> None:
        """Let go of the folder's lock (another run may use the folder from now on); close the TensorBoard writer."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._lock is not None:
            (self.path / ".lock.pid").unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    @contextlib.contextmanager
    def session(self):
        """The folder prepared and locked (:meth:`prepare`) for the block, and unlocked after it, however it ends."""
        self.prepare()
        try:
            yield self
        finally:
            self.unlock()

    def start(self, cfg: Config) -> None:
        """A new run: its configuration, and no metrics of an earlier one."""
        if self.is_main:
            self.write_text("config.yaml", cfg.to_yaml())
            (self.path / METRICS).unlink(missing_ok=True)

    def resumed(self, cfg: Config, epoch: int, changed: bool) -> None:
        """A resumed run: drop records logged after the checkpoint was taken; with changes, the directory describes
        the run as it goes on."""
        if self.is_main:
            kept = [ln for ln in _records(self.path / METRICS) if json.loads(ln)["epoch"] <= epoch]
            self.write_text(METRICS, "".join(ln + "\n" for ln in kept))
            if changed:
                self.write_text("config.yaml", cfg.to_yaml())

    def write_json(self, name: str, obj) -> None:
        """Write ``obj`` as the JSON file ``name``."""
        if self.is_main:
            self.write_text(name, json.dumps(strict_json(obj)))

    def writer(self):
        """The TensorBoard ``SummaryWriter`` of ``<out_dir>/tensorboard`` (main process, ``run.tensorboard``), else None."""
        if not (self.tensorboard and self.is_main):
            return None
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "run.tensorboard=true needs the tensorboard package: pip install "
                    '"sparsetrain[tensorboard]" (or run.tensorboard=false)'
                ) from None
            self._writer = SummaryWriter(str(self.path / "tensorboard"))
        return self._writer

    def log(self, record: dict, method=None) -> None:
        """Append one metrics record (strict JSON); with ``run.tensorboard`` its figures, and the ``method``'s
        per-layer sparsity (:meth:`~sparsetrain.methods.base.Sparsifier.log_to`), go to TensorBoard too."""
        if (writer := self.writer()) is not None:
            step = int(record.get("step", 0))
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step") and math.isfinite(value):
                    writer.add_scalar(f"train/{key}", value, step)
            if record.get("wall_s") and step:  # mean seconds per step so far
                writer.add_scalar("train/step_s", record["wall_s"] / step, step)
            if method is not None:
                method.log_to(writer, step)
            writer.flush()
        if self.is_main:
            if (self.path / METRICS).is_symlink():  # appending would write through it
                raise ConfigError(
                    f"{self.path / METRICS} became a link during the run; the run writes only its own files"
                )
            with open(self.path / METRICS, "a") as f:
                f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")

    def last_record(self) -> dict:
        """The last complete metrics record, or {}."""
        lines = _records(self.path / METRICS)
        return json.loads(lines[-1]) if lines else {}

    def finish(self, weights: dict, summary: dict) -> None:
        """The final model (plain architecture's weights), its sparse sibling (:func:`~sparsetrain.save_sparse`:
        kept values and bitmasks, no pickle) and ``final.json``."""
        if self.is_main:
            save_checkpoint({"format": CHECKPOINT_FORMAT, "model": weights}, self.path / FINAL_MODEL)
            save_sparse(weights, self.path / FINAL_SPARSE_MODEL)
            self.write_text("final.json", json.dumps(strict_json(summary), indent=2, allow_nan=False))


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
