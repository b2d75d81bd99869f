"""``semi_structured``: 2:4 masks on Linear layers with PyTorch's semi-structured sparse tensors.

Sparse tensor cores: CUDA GPUs of compute capability 8.0 and newer. W_s is compressed once per step (the weights
change every step) and used for the forward product; the input gradient uses W_s dense and the weight gradient
is masked. Convolutions stay masked dense under it. Refused with a clear message where no such GPU exists.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .registry import Backend, register

__all__ = ["SemiStructured", "check_two_four", "semi_structured_available"]


def check_two_four(mask: torch.Tensor, name: str = "mask") -> None:
    """Refuse a mask that keeps more than 2 of any 4 consecutive weights along the input dimension."""
    if mask.shape[-1] % 4:
        raise ValueError(
            f"{name}: 2:4 sparsity needs the input dimension to be a multiple of 4, got {tuple(mask.shape)}"
        )
    worst = int(mask.reshape(-1, 4).sum(1).max()) if mask.numel() else 0
    if worst > 2:
        raise ValueError(
            f"{name}: not 2:4 sparse (a group of 4 input weights keeps {worst}); use sparsity.scheme=nm_2:4"
        )


def semi_structured_available(device: torch.device | str | None = None) -> str | None:
    """None if 2:4 semi-structured tensors can run here, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA GPU (2:4 semi-structured sparsity runs on sparse tensor cores, compute capability 8.0+)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"the GPU's compute capability is {major}.{minor}; 2:4 semi-structured sparsity needs 8.0 or newer"
    return None


class _SemiStructuredLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mask):
        w_s = weight * mask
        packed = torch.sparse.to_sparse_semi_structured(w_s.detach())
        x2 = x.reshape(-1, x.shape[-1])
        out = F.linear(x2, packed, bias)
        ctx.save_for_backward(x, w_s, mask)
        ctx.has_bias = bias is not None
        return out.reshape(*x.shape[:-1], -1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, w_s, mask = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        gx = (g2 @ w_s).reshape(x.shape) if ctx.needs_input_grad[0] else None
        gw = (g2.t() @ x.reshape(-1, x.shape[-1])) * mask if ctx.needs_input_grad[1] else None
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


@register
class SemiStructured(Backend):
    """2:4 sparse tensor cores for Linear layers (CUDA, compute capability 8.0+)."""

    name = "semi_structured"
    rank = 50
    summary = "2:4 Linear layers on sparse tensor cores (CUDA GPUs of compute capability 8.0+)"
    layer_types = (nn.Linear,)
    schemes = ("nm_2:4",)
    schemes_doc = "2:4 masks"
    devices = ("cuda",)

    def prepare(self, mask: torch.Tensor, name: str, device: torch.device) -> None:
        why = (
            semi_structured_available(device)
            if device.type == "cuda"
            else f"the model is on {device.type}, not a CUDA GPU"
        )
        if why:
            raise ValueError(f"backend 'semi_structured' cannot run here: {why}")
        if mask.dim() == 2:
            check_two_four(mask, name)

    def run_linear(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return _SemiStructuredLinearFn.apply(x, layer.weight, layer.bias, layer.maskset.masks[layer.mask_name])
