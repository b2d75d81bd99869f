"""The run directory: what a run writes (configuration, metrics records, checkpoints, the final model and summary)
and how it is prepared, trimmed on resume, and read back (:func:`load_run_model`)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from ..data.images import DATASETS
from ..models import build_configured
from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config, ConfigError, load_config

__all__ = ["RunDirectory", "CHECKPOINT", "SHARDED_CHECKPOINT", "FINAL_MODEL", "CHECKPOINT_FORMAT", "strict_json",
           "load_run_model"]

CHECKPOINT = "checkpoint.pt"
SHARDED_CHECKPOINT = "checkpoint.dcp"  # beside CHECKPOINT under run.parallel=fsdp: model, optimizer, method, by shard
FINAL_MODEL = "model.pt"
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
    """``run.out_dir``: only the main process (``is_main``) writes; every method says what it writes."""

    def __init__(self, path: str | Path, is_main: bool = True):
        self.path, self.is_main = Path(path), is_main

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def prepare(self) -> None:
        """The directory exists and is writable, or a ConfigError names run.out_dir and why not."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"run.out_dir={self.path} is a file, not a directory")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.path, prefix=".write-test-"):  # unique per process (ranks share it)
                pass
        except OSError as e:
            raise ConfigError(f"run.out_dir={self.path} cannot be written ({e.strerror or e})") from None

    def start(self, cfg: Config) -> None:
        """A new run: its configuration, and no metrics of an earlier one."""
        if self.is_main:
            (self.path / "config.yaml").write_text(cfg.to_yaml())
            (self.path / METRICS).unlink(missing_ok=True)

    def resumed(self, cfg: Config, epoch: int, changed: bool) -> None:
        """A resumed run: drop records logged after the checkpoint was taken; with changes, the directory describes
        the run as it goes on."""
        if self.is_main:
            kept = [ln for ln in _records(self.path / METRICS) if json.loads(ln)["epoch"] <= epoch]
            (self.path / METRICS).write_text("".join(ln + "\n" for ln in kept))
            if changed:
                (self.path / "config.yaml").write_text(cfg.to_yaml())

    def write_json(self, name: str, obj) -> None:
        """Write ``obj`` as the JSON file ``name``."""
        if self.is_main:
            (self.path / name).write_text(json.dumps(strict_json(obj)))

    def log(self, record: dict) -> None:
        """Append one metrics record (strict JSON)."""
        if self.is_main:
            with open(self.path / METRICS, "a") as f:
                f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")

    def last_record(self) -> dict:
        """The last complete metrics record, or {}."""
        lines = _records(self.path / METRICS)
        return json.loads(lines[-1]) if lines else {}

    def finish(self, weights: dict, summary: dict) -> None:
        """The final model (plain architecture's weights) and ``final.json``."""
        if self.is_main:
            save_checkpoint({"format": CHECKPOINT_FORMAT, "model": weights}, self.path / FINAL_MODEL)
            (self.path / "final.json").write_text(json.dumps(strict_json(summary), indent=2, allow_nan=False))


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
