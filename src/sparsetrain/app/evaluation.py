"""Evaluation and the default loss: mean loss and accuracy over a loader, for one label per example (images) or
one per position (a language model's next tokens)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.images import BatchLoader

__all__ = ["evaluate", "token_cross_entropy", "TokenCrossEntropy"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: BatchLoader,
    device: torch.device,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Mean loss (``loss_fn``, default cross-entropy; per target) and accuracy (percent of targets) of ``model``
    over ``loader``. Targets are one label per example, or one per position for language models."""
    was_training = model.training
    model.eval()
    loader.start_epoch(0)
    loss_sum, correct, n = 0.0, 0, 0
    for x, y, _ in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss = token_cross_entropy(out, y) if loss_fn is None else loss_fn(out, y)
        loss_sum += loss.item() * y.numel()
        correct += (out.argmax(-1) == y).sum().item()
        n += y.numel()
    model.train(was_training)
    return {"loss": loss_sum / max(n, 1), "acc": 100.0 * correct / max(n, 1)}


def token_cross_entropy(out: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of scores ``[N, C]`` against ``[N]``, or ``[N, T, C]`` against ``[N, T]`` (next tokens)."""
    return F.cross_entropy(out.flatten(0, -2), y.flatten(), label_smoothing=label_smoothing)


class TokenCrossEntropy(nn.Module):
    """:func:`token_cross_entropy` as a module (the Trainer's default loss, for images and text alike)."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return token_cross_entropy(out, y, self.label_smoothing)
