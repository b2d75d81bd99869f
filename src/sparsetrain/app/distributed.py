"""Data-parallel and sharded set-up from the environment that ``torchrun`` provides (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["DistInfo", "init_distributed", "is_main", "barrier", "shutdown", "leave", "shard_model"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a data-parallel job (rank 0 of 1 when alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group described by RANK/WORLD_SIZE/LOCAL_RANK, if any; single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def is_main() -> bool:
    """True on rank 0 (or without a process group)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> bool:
    """Wait for every rank, then destroy the process group (a no-op without one): a rank that leaves while
    another still talks to it aborts that one. True if there was a group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        return True
    return False


def leave(code: int = 0) -> None:
    """End a finished rank at once, without the interpreter's teardown: there gloo's threads now and then abort a
    rank whose work is done and saved (seen in about 1 of 10 two-rank runs after a sharded checkpoint), which
    would turn a good run's exit status into a failure."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """The device to train on: ``auto`` takes CUDA, then Apple MPS, then the CPU."""
    if requested == "auto":
        if torch.cuda.is_available():
            requested = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            requested = "mps"
        else:
            requested = "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was requested but CUDA is not available; use run.device=auto or cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(requested)


def shard_model(model: nn.Module) -> nn.Module:
    """Shard ``model`` with FSDP2 (``fully_shard``) for every rank of the process group: each block (a child of
    an ``nn.Sequential`` or ``nn.ModuleList`` whose children are blocks with parameters, such as a transformer's
    layers or a ResNet stage's residual blocks) is its own unit, the rest goes with the root.

    Single Conv/Linear layers are never units of their own, so methods that change a layer's class (SWAT) can
    still do so after sharding, and the forward pass of every unit sees its layers' whole weights. Build the
    optimizer and then the sparsifier afterwards, from the sharded parameters."""
    from torch.distributed.fsdp import fully_shard

    for container in [m for m in model.modules() if isinstance(m, (nn.Sequential, nn.ModuleList))]:
        children = list(container.children())
        if children and all(list(c.children()) and any(True for _ in c.parameters()) for c in children):
            for child in children:
                fully_shard(child)
    fully_shard(model)
    return model
