"""The application: the engine (a client of the public method API), checkpoints, optimizers and schedules,
data-parallel set-up, and the lottery-ticket search over rounds. Imported on first use (the command line's help
needs none of it)."""

import importlib

_LAZY = {
    "Trainer": "trainer",
    "TrainingError": "persistence",
    "method_seed": "trainer",
    "evaluate": "evaluation",
    "lottery_ticket": "lottery",
    "load_run_model": "rundir",
    "CheckpointError": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
}

__all__ = [
    "Trainer",
    "TrainingError",
    "evaluate",
    "lottery_ticket",
    "load_run_model",
    "method_seed",
    "CheckpointError",
    "load_checkpoint",
    "save_checkpoint",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sparsetrain.app' has no attribute {name!r}")
