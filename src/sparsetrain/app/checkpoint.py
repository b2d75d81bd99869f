"""Atomic checkpoints: written to a temporary file and renamed, loaded with ``weights_only=True``.

A crash (or SIGKILL) while writing leaves the previous checkpoint untouched; a damaged
file is reported as such, never half-loaded.

Sharded runs (FSDP2) save with ``torch.distributed.checkpoint`` instead (:func:`save_sharded`): every rank
writes its own shards of the weights, the optimizer state and the masks into one directory, which loads
into any number of ranks, one unsharded process included (:func:`load_sharded`).
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = ["CheckpointError", "write_atomic", "save_checkpoint", "load_checkpoint", "save_sharded", "load_sharded"]


class CheckpointError(RuntimeError):
    """A checkpoint could not be read (corrupted, truncated, or not a sparsetrain checkpoint)."""


def _umask_mode() -> int:
    """The mode a new file takes under the user's umask (read without changing it for good)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


class _Recorded:
    """A binary file that remembers the ``OSError`` its ``write`` raised (a full disk), for writers that turn it into
    an error of their own (``torch.save``'s zip writer)."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def write_atomic(path: str | os.PathLike, write) -> None:
    """Create ``path`` through a new temporary file in its folder, renamed over it: never written through an existing
    file or link (a link at ``path`` is replaced, its target untouched), never left half-written, with the mode the
    user's umask gives. ``write(f)`` fills the binary file ``f``. A full disk raises ``OSError`` naming ``path``,
    and whatever ``path`` held before stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            out = _Recorded(f)
            try:
                write(out)
            except RuntimeError:  # torch.save's zip writer reports a failed write as "unexpected pos ..."
                if out.error is not None:
                    raise out.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(
                errno.ENOSPC,
                f"no space left on the device while writing {path}; what it held before is "
                "intact: free some space and run the same command again to resume",
            ) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically (:func:`write_atomic`): a crash or a full disk leaves the previous
    checkpoint whole."""
    write_atomic(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """Read a checkpoint with the safe (weights-only) unpickler; raise CheckpointError if it is damaged. ``mmap``
    maps the tensors instead of reading them (to look at small entries of a large checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises several types for truncated zip / bad pickle
        text = str(e)
        if isinstance(e, pickle.UnpicklingError) and "GLOBAL" in text:  # a payload of code, not damage
            raise CheckpointError(
                f"{path} holds objects other than tensors and plain data (code could run if it were "
                "unpickled), so it was not loaded: it is not a checkpoint sparsetrain wrote"
            ) from None
        # torch's own advice here is to load unsafely: not given, a damaged file is damaged
        detail = (
            "its contents do not unpickle" if "Weights only load failed" in text else (text.splitlines() or [""])[0]
        )
        raise CheckpointError(
            f"checkpoint {path} is corrupted or truncated and was not loaded ({type(e).__name__}: "
            f"{detail}). Delete it to start over, or restore a copy."
        ) from None
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{path} is not a sparsetrain checkpoint")
    return state


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _states(model, optimizer, sparsifier) -> dict:
    """Model and optimizer state by parameter name (sharded where the model is) and the method's state."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    with sparsifier.paused():  # a fresh optimizer gets its state by a zero step: not one of the method's steps
        model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state, "method": sparsifier.state_dict()}


def save_sharded(path: str | os.PathLike, model, optimizer, sparsifier) -> None:
    """Save model, optimizer and method (masks included) with ``torch.distributed.checkpoint``: every rank writes
    its shards into the directory ``path``. Written beside it and renamed once every rank has finished, so an
    interrupted save leaves the previous checkpoint whole. Every rank calls this."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    main = not _distributed() or dist.get_rank() == 0
    if main and tmp.exists():
        shutil.rmtree(tmp)
    if _distributed():
        dist.barrier()
    with warnings.catch_warnings():  # one process alone is a supported case, not a warning
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(_states(model, optimizer, sparsifier), checkpoint_id=str(tmp))
    if _distributed():
        dist.barrier()
    if main:
        old = path.with_name(path.name + ".old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    if _distributed():
        dist.barrier()


def load_sharded(path: str | os.PathLike, model, optimizer, sparsifier) -> None:
    """Load a :func:`save_sharded` directory into ``model``, ``optimizer`` and ``sparsifier``, built as at the start
    of the run, sharded or not and on any number of ranks: ``torch.distributed.checkpoint`` reads what each rank
    holds. Every rank calls this."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    if not (path / ".metadata").exists():
        raise CheckpointError(f"{path} is not a sharded checkpoint (no .metadata in it)")
    state = _states(model, optimizer, sparsifier)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path))
    except Exception as e:  # a missing key, a shape that differs: the checkpoint is of another model or method
        raise CheckpointError(
            f"{path} does not fit this model, optimizer and method ({type(e).__name__}: {str(e)[:300]})"
        ) from None
    sparsifier.load_state_dict(state["method"])  # first: masks, and the layouts that depend on them
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
