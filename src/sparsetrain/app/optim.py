"""The optimizer by name (SGD with momentum, AdamW) and the per-step learning-rate schedules (warm-up, cosine, step, one-cycle)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import OptimConfig

__all__ = ["build_optimizer", "lr_factor", "set_lr"]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov by default) or AdamW, by ``cfg.name``; with ``no_decay_bn_bias`` the 1-D parameters
    (BN, biases) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.no_decay_bn_bias:
        groups = [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]
    else:
        groups = [{"params": params, "weight_decay": cfg.weight_decay}]
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


def lr_factor(cfg: OptimConfig, step: int, total: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total`` steps.

    Warm-up is linear over ``warmup_steps`` (else ``warmup_epochs``). After it: ``cosine`` decays to
    ``min_lr_ratio`` (0 by default);
    ``step`` multiplies by ``gamma`` at each milestone (fractions of training);
    ``onecycle`` rises from lr/25 over the warm-up (30% of training if none is set)
    and anneals with a cosine to lr/1e4; ``constant`` holds.
    """
    warm = cfg.warmup_steps or int(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "onecycle":
        warm = warm or int(0.3 * total)
        if step < warm:
            return 1 / 25 + (1 - 1 / 25) * step / max(warm, 1)
        t = (step - warm) / max(total - warm, 1)
        return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * t))
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "cosine":
        floor = cfg.min_lr_ratio
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))
    if cfg.schedule == "step":
        return cfg.gamma ** sum(step >= m * total for m in cfg.milestones)
    return 1.0


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> None:
    """Set every group's learning rate to ``base_lr * factor`` (the schedule is a function of progress,
    so it needs no state of its own in checkpoints)."""
    for group in optimizer.param_groups:
        group["lr"] = base_lr * factor
