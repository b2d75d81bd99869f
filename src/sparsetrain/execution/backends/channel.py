"""``channel``: masks of whole output channels run as smaller dense layers.

The layer runs over its kept filters (fewer output channels in forward, input gradient and weight gradient alike)
and its output is re-expanded to full width (a dropped channel carries only its bias, exactly as under masked
dense); the kept set is re-read when the mask changes. With ``channel_both_sides`` (static masks only) a removed
filter also leaves its BatchNorm channel and the next layer's inputs (:mod:`sparsetrain.execution.channel_pairs`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import Backend, register

__all__ = ["Channel", "kept_channels", "expand_channels"]


def kept_channels(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """Indices of the output channels a channel-structured mask keeps; refuses masks that cut inside a channel."""
    rows = mask.reshape(mask.shape[0], -1)
    kept, full = rows.any(1), rows.all(1)
    if not torch.equal(kept, full):
        raise ValueError(
            f"{name}: the mask keeps part of {int((kept & ~full).sum())} output channel(s); the channel "
            "backend needs whole channels (sparsity.scheme=channel_out)"
        )
    return kept.nonzero().squeeze(1)


def expand_channels(
    small: torch.Tensor, kept: torch.Tensor, width: int, bias: torch.Tensor | None, dim: int
) -> torch.Tensor:
    """``small``'s channels placed at ``kept`` in a tensor ``width`` channels wide along ``dim``; the rest hold the bias."""
    shape = list(small.shape)
    shape[dim] = width
    fmt = (
        torch.channels_last
        if small.dim() == 4 and not small.is_contiguous() and small.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )
    if bias is None:
        base = small.new_zeros(shape).contiguous(memory_format=fmt)
    else:
        view = [1] * len(shape)
        view[dim] = width
        base = bias.view(view).expand(shape).contiguous(memory_format=fmt)
    return base.index_copy(dim, kept, small)


@register
class Channel(Backend):
    """Kept output channels as a smaller dense layer, re-expanded (or, both sides, read by the next layer as is)."""

    name = "channel"
    rank = 40
    summary = "whole output channels: the layer runs smaller, dense, over its kept filters"
    schemes = ("channel_out",)
    schemes_doc = "masks of whole output channels"
    compact_fixed_masks = True
    both_sides = True
    shardable = False

    def prepare(self, mask: torch.Tensor, name: str, device: torch.device) -> None:
        kept_channels(mask, name)  # refuses masks that are not whole channels

    def build_structure(self, mask: torch.Tensor, name: str) -> torch.Tensor:
        return kept_channels(mask, name)

    def run_linear(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        kept = layer.structure(self.name)
        small = F.linear(
            x, layer.weight.index_select(0, kept), None if layer.bias is None else layer.bias.index_select(0, kept)
        )
        return expand_channels(small, kept, layer.out_features, layer.bias, small.dim() - 1)

    def run_conv(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        kept = layer.structure(self.name)
        small = F.conv2d(
            x,
            layer.weight.index_select(0, kept),
            None if layer.bias is None else layer.bias.index_select(0, kept),
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
        )
        if getattr(layer, "shrink_out", False):  # the next layers read the kept channels alone (channel_pairs.py)
            return small
        return expand_channels(small, kept, layer.out_channels, layer.bias, 1)
