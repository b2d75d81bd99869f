"""Channel pruning that shrinks both sides: a removed filter leaves its BatchNorm channel and the next layer's inputs.

Under the ``channel`` backend alone a layer computes only its kept filters and re-expands its output to full
width (a removed channel carries its bias, which BatchNorm turns into the constant ``beta``), so the next
layer still reads every input channel. With :func:`shrink_both_sides` a producer convolution whose output
goes, through one BatchNorm and any channel-wise steps (ReLU, pooling, dropout, flatten), to one consumer
(a convolution or a Linear layer) hands over only its kept channels: the BatchNorm normalises those
(its ``gamma``, ``beta`` and running statistics at the kept indices; the others untouched), and the consumer
reads only the matching input channels of its weight. Every layer of such a chain is a smaller dense
product, with no re-expansion.

Definition: this computes exactly the masked-dense network in which a removed filter's BatchNorm channel is
removed too (``gamma`` and ``beta`` zero, the filter's bias zero), so that the channel carries exactly
zero; it differs from plain masked dense only there (where the channel would carry ReLU(``beta``)). The
chains are found once by tracing the model (``torch.fx``); a producer whose output also feeds a residual
add or a second consumer keeps the one-sided form. Static masks only (``static``, ``lottery``): a grown
channel would come back with the BatchNorm statistics it had when it was removed.

With ``compact_state`` each such convolution stores only its kept block, [kept filters, input channels it
reads, kh, kw] (:class:`~sparsetrain.execution.compact.CompactChannelConv2d`), so its gradient and optimizer state shrink alike; weights
that would read a removed channel are not stored (they multiply zeros). State dicts carry the dense weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core.masks import dense_from_values
from .channel import expand_channels
from .layers import SparseConv2d

__all__ = ["shrink_both_sides", "ChannelBatchNorm2d", "ChannelBlock"]

# steps that act on each channel alone (or only flatten it), through which kept channels pass unchanged
_PASS_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Dropout,
    nn.Identity,
    nn.Flatten,
)
_PASS_FUNCTIONS = (F.relu, torch.relu, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, torch.flatten, F.dropout)
_PASS_METHODS = ("relu", "flatten", "view", "reshape")


class ChannelBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d that normalises only the channels its producer keeps when handed fewer than all of them
    (its parameters and running statistics at those indices; made by :func:`shrink_both_sides`)."""

    producer: SparseConv2d

    def affine_for(self, x: torch.Tensor) -> tuple:
        """The (weight, bias) this layer applies to ``x``: its own, or its kept channels' when handed fewer."""
        if x.shape[1] == self.num_features or not self.affine:
            return self.weight, self.bias
        kept = self.producer.structure("channel")
        return self.weight[kept], self.bias[kept]

    def forward(self, x):
        if x.shape[1] == self.num_features:
            return super().forward(x)
        kept = self.producer.structure("channel")
        mean, var = self.running_mean[kept], self.running_var[kept]
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average
                momentum = 1.0 / float(self.num_batches_tracked)
        out = F.batch_norm(
            x, mean, var, *self.affine_for(x), self.training or not self.track_running_stats, momentum, self.eps
        )
        if self.training and self.track_running_stats:  # the kept channels' statistics go back into the buffers
            self.running_mean.index_copy_(0, kept, mean)
            self.running_var.index_copy_(0, kept, var)
        return out


class _InputChannels:
    """A consumer layer that reads only the input channels its producer keeps."""

    source: SparseConv2d

    def _kept_inputs(self, x: torch.Tensor, channels: int) -> torch.Tensor | None:
        """Indices into the weight's input dimension for ``x``, or None when ``x`` holds every input channel."""
        kept = self.source.structure("channel")
        if x.shape[1] == channels:
            return None
        per_channel = x.shape[1] // kept.numel()  # a Linear after flatten reads h * w features a channel
        if per_channel == 1:
            return kept
        return (kept[:, None] * per_channel + torch.arange(per_channel, device=kept.device)).reshape(-1)


class InputChannelConv2d(_InputChannels, SparseConv2d):
    """A convolution whose input holds only its producer's kept channels (made by :func:`shrink_both_sides`)."""

    def _run(self, x):
        cols = self._kept_inputs(x, self.in_channels)
        if cols is None:
            return super()._run(x)
        weight = self.weight.index_select(1, cols)
        if self.backend == "channel":
            rows = self.structure("channel")
            weight = weight.index_select(0, rows)
            bias = None if self.bias is None else self.bias.index_select(0, rows)
            small = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
            return small if getattr(self, "shrink_out", False) else _expand(small, rows, self.out_channels, self.bias)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class InputChannelLinear(_InputChannels, nn.Linear):
    """A Linear layer whose input holds only its producer's kept channels (made by :func:`shrink_both_sides`)."""

    def forward(self, x):
        cols = self._kept_inputs(x, self.in_features)
        return super().forward(x) if cols is None else F.linear(x, self.weight.index_select(1, cols), self.bias)


@dataclass(frozen=True)
class ChannelBlock:
    """The block of a convolution weight [Cout, Cin, KH, KW] that is stored: kept filters ``rows`` by the input
    channels ``cols`` the layer reads; ``flat_index`` places the block's entries (row-major) in the weight."""

    shape: tuple[int, int, int, int]
    rows: torch.Tensor
    cols: torch.Tensor
    flat_index: torch.Tensor

    @classmethod
    def make(cls, shape: tuple[int, ...], rows: torch.Tensor, cols: torch.Tensor) -> "ChannelBlock":
        cin, k = shape[1], shape[2] * shape[3]
        idx = ((rows[:, None, None] * cin + cols[None, :, None]) * k + torch.arange(k, device=rows.device)).reshape(-1)
        return cls(tuple(shape), rows, cols, idx)

    def dense(self, values: torch.Tensor) -> torch.Tensor:
        """The weight with the block's ``values`` in place and zeros elsewhere."""
        return dense_from_values(values, self.flat_index, self.shape)


def _expand(small, kept, width, bias):
    return expand_channels(small, kept, width, bias, 1)


@torch.no_grad()
def _remove_channels(producer: SparseConv2d, norm: nn.BatchNorm2d) -> None:
    """The definition's zeros: a removed filter's bias and its BatchNorm ``gamma`` and ``beta`` (they get no
    gradient from now on, so an exported masked-dense model computes what was trained)."""
    gone = torch.ones(producer.out_channels, dtype=torch.bool, device=producer.weight.device)
    gone[producer.structure("channel")] = False
    for t in (producer.bias, norm.weight, norm.bias):
        if t is not None:
            t.masked_fill_(gone, 0)


def passes_channels(node, modules) -> bool:
    """Whether the ``torch.fx`` node ``node`` hands each channel on by itself, a zero channel as zeros (ReLU-like
    activations, pooling, flattening, dropout): what may lie between a producer and the layer reading its channels."""
    return _passes(node, modules)


def _passes(node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _PASS_MODULES)
    if node.op == "call_function":
        return node.target in _PASS_FUNCTIONS
    return node.op == "call_method" and node.target in _PASS_METHODS


def shrink_both_sides(model: nn.Module, layers: dict[str, nn.Module]) -> list[tuple[str, str, str]]:
    """Make every ``channel``-backend convolution in ``layers`` (from :func:`~sparsetrain.execution.apply_backend`)
    whose output reaches one consumer through one BatchNorm and channel-wise steps hand over only its kept
    channels. Returns the chains made, as (producer, BatchNorm, consumer) module names; the others stay
    one-sided. Raises ValueError if the model cannot be traced."""

    class Tracer(torch.fx.Tracer):  # our swapped layers are leaves like the torch.nn ones they replace
        def is_leaf_module(self, m, qualname):
            return isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)) or super().is_leaf_module(m, qualname)

    try:
        graph = Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means: no chains known
        raise ValueError(
            f"channel pruning on both sides traces the model to find conv -> BatchNorm -> next layer chains, "
            f"and {type(model).__name__} cannot be traced ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    modules = dict(model.named_modules())
    producers = {
        n.rsplit(".", 1)[0] if "." in n else "": m
        for n, m in layers.items()
        if isinstance(m, SparseConv2d) and m.backend == "channel"
    }
    chains = []
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in producers or len(node.users) != 1:
            continue
        bn = next(iter(node.users))
        if bn.op != "call_module" or type(modules[bn.target]) is not nn.BatchNorm2d or len(bn.users) != 1:
            continue
        cur = next(iter(bn.users))
        while _passes(cur, modules) and len(cur.users) == 1:
            cur = next(iter(cur.users))
        if cur.op != "call_module":
            continue
        consumer = modules[cur.target]
        if type(consumer) in (SparseConv2d, nn.Conv2d) and consumer.groups == 1:
            if type(consumer) is nn.Conv2d:
                consumer.__class__ = SparseConv2d
                consumer._init_exec(producers[node.target].maskset, f"{cur.target}.weight", "masked")
            consumer.__class__ = InputChannelConv2d
        elif type(consumer) is nn.Linear:
            consumer.__class__ = InputChannelLinear
        else:
            continue
        # references, not submodules: registered, the producer's weights would appear again in the state dict
        # under every layer that reads it (VGG-16's chain of them made a state dict 8x the model's)
        object.__setattr__(consumer, "source", producers[node.target])
        producers[node.target].shrink_out = True
        norm = modules[bn.target]
        norm.__class__ = ChannelBatchNorm2d
        object.__setattr__(norm, "producer", producers[node.target])
        _remove_channels(producers[node.target], norm)
        chains.append((node.target, bn.target, cur.target))
    return chains
