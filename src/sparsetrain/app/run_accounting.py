"""What a run spends, as the Trainer counts it: FLOPs per step at the densities the method runs at (a step that
read the dense gradient, and the recipe's ghost skips, cost extra), relative to a dense run on the whole data."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..core.accounting import FlopMeter, measure_layer_costs, saved_tensor_bytes
from ..methods.base import Sparsifier

__all__ = ["RunAccounting", "saved_bytes_per_step"]


class RunAccounting:
    """The FLOP meter of a run, kept at the method's current densities."""

    def __init__(
        self,
        model: nn.Module,
        method: Sparsifier,
        input_shape: tuple[int, ...],
        device: torch.device,
        examples_per_epoch: int,
        epochs: int,
        example: torch.Tensor | None = None,
    ):
        self.method, self.examples_per_epoch, self.epochs = method, examples_per_epoch, epochs
        self.flops = FlopMeter(measure_layer_costs(model, input_shape, device, example=example))
        self._densities_at = -1
        self.refresh()

    def refresh(self, force: bool = False) -> None:
        """Tell the meter the densities in use when the method changed them (mask updates, SWAT refreshes)."""
        if force or self.method.version != self._densities_at:
            self.flops.set_densities(self.method.weight_density(), self.method.grad_density())
            self._densities_at = self.method.version

    def step(self, samples: int, extra: float = 0.0) -> None:
        """Count one optimizer step over ``samples`` examples (``extra`` FLOPs besides the layers')."""
        if self.method.took_dense_gradient:  # the full weight gradient instead of the masked one
            gd = self.method.grad_density() or {}
            extra += samples * sum(lc.weight_grad * (1 - gd.get(lc.name, 1.0)) for lc in self.flops.costs.layers)
        self.flops.step(samples, extra)

    def relative(self, epochs: int | None = None) -> float:
        """FLOPs spent relative to a dense run over the whole training set for ``epochs`` (default: all) epochs."""
        return self.flops.relative(self.examples_per_epoch * (self.epochs if epochs is None else epochs))

    def inference(self) -> tuple[float, float]:
        """Inference FLOPs per example at the method's densities, and relative to dense."""
        costs, wd = self.flops.costs, self.method.weight_density()
        dense = costs.forward_flops()
        return costs.forward_flops(wd), (costs.forward_flops(wd) / dense if dense else 1.0)

    def state_dict(self) -> dict:
        """The meter's counts (for checkpoints)."""
        return self.flops.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` and the densities of the restored method."""
        self.flops.load_state_dict(state)
        self.refresh(force=True)


def saved_bytes_per_step(model: nn.Module, criterion, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one training step (on a copy, so BatchNorm statistics stay put)."""
    net = copy.deepcopy(model).train()
    return saved_tensor_bytes(lambda: criterion(net(x), y).backward())
