"""Training: the engine, checkpoints, optimizer and schedules, data-parallel set-up."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .trainer import Trainer, evaluate

__all__ = ["Trainer", "evaluate", "CheckpointError", "load_checkpoint", "save_checkpoint"]
