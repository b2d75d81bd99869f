"""The application: the engine (a client of the public method API), checkpoints, optimizers and schedules,
data-parallel set-up, and the lottery-ticket search over rounds."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .lottery import lottery_ticket
from .evaluation import evaluate
from .rundir import load_run_model
from .trainer import Trainer, TrainingError, method_seed

__all__ = ["Trainer", "TrainingError", "evaluate", "lottery_ticket", "load_run_model", "method_seed", "CheckpointError",
           "load_checkpoint", "save_checkpoint"]
