"""Back to plain layers: every swapped, compact or channel-cut layer of a model turned into the ``torch.nn`` layer
it replaced, with its dense weight (zeros where masked), so that an exported model needs nothing of ours."""

from __future__ import annotations

import torch
import torch.nn as nn

from .channel_pairs import ChannelBatchNorm2d, InputChannelLinear
from .compact import is_compact
from .layers import _SparseExec

__all__ = ["restore_plain"]

_EXEC_ATTRS = (
    "maskset",
    "mask_name",
    "backend",
    "ran",
    "_structures",
    "_version_seen",
    "_read",
    "rebuilds",
    "timings",
    "step_timings",
    "compact",
    "source",
    "shrink_out",
    "producer",
)


@torch.no_grad()
def restore_plain(model: nn.Module) -> nn.Module:
    """Turn the layers :func:`~.layers.apply_backend`, compaction and channel pruning on both sides made back into
    plain ``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm2d`` layers (a Hugging Face ``Conv1D`` to its own class), in
    place; returns ``model``."""
    for m in model.modules():
        if is_compact(m):
            dense = m.weight.detach().clone(memory_format=torch.contiguous_format)
            del m._parameters["values"]
            m.__class__ = getattr(type(m), "plain_class", None) or (
                nn.Conv2d if isinstance(m, nn.Conv2d) else nn.Linear
            )
            m.register_parameter("weight", nn.Parameter(dense))
        elif isinstance(m, (_SparseExec, InputChannelLinear)):  # a Conv1D goes back to its own class
            m.__class__ = getattr(type(m), "plain_class", None) or (
                nn.Conv2d if isinstance(m, nn.Conv2d) else nn.Linear
            )
        elif isinstance(m, ChannelBatchNorm2d):
            m.__class__ = nn.BatchNorm2d
        else:
            continue
        for attr in _EXEC_ATTRS:
            m.__dict__.pop(attr, None)
    return model
