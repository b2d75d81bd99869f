"""Atomic checkpoints: written to a temporary file and renamed, loaded with ``weights_only=True``.

A crash (or SIGKILL) while writing leaves the previous checkpoint untouched; a damaged
file is reported as such, never half-loaded.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint"]


class CheckpointError(RuntimeError):
    """A checkpoint could not be read (corrupted, truncated, or not a sparsetrain checkpoint)."""


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically: temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with the safe (weights-only) unpickler; raise CheckpointError if it is damaged."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated zip / bad pickle
        raise CheckpointError(
            f"checkpoint {path} is corrupted or truncated and was not loaded ({type(e).__name__}: {e}). "
            "Delete it to start over, or restore a copy."
        ) from None
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{path} is not a sparsetrain checkpoint")
    return state
