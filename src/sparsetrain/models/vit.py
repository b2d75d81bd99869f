"""A small Vision Transformer for 32x32 images (CIFAR-10): patches, a class token, pre-LN blocks, a linear head.

The patch embedding is a Linear over flattened patches, so it is the model's first Linear layer (``dense_layers:
[first, last]``, the default, keeps it and the head dense, as the sparse-transformer literature does); every
block is the GPT's block without the causal mask, so each of its four matrices is an ``nn.Linear`` that every
method and backend of the library handles.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .gpt import Block, _channels

__all__ = ["ViT", "vit"]


class ViT(nn.Module):
    """Images ``[batch, channels, H, W]`` to class logits, through ``patch x patch`` patches."""

    def __init__(
        self,
        num_classes: int = 10,
        image: int = 32,
        patch: int = 4,
        channels: int = 3,
        width: int = 128,
        depth: int = 6,
        heads: int = 4,
    ):
        super().__init__()
        if image % patch:
            raise ValueError(f"image size {image} is not a multiple of the patch size {patch}")
        self.patch = patch
        self.embed = nn.Linear(channels * patch * patch, width)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, width) * 0.02)
        self.blocks = nn.Sequential(*[Block(width, heads, causal=False) for _ in range(depth)])
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch
        if h % p or w % p or (h // p) * (w // p) + 1 != self.pos.shape[1]:
            raise ValueError(
                f"image of {h}x{w} does not give the {self.pos.shape[1] - 1} patches the model was built for"
            )
        patches = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, (h // p) * (w // p), c * p * p)
        z = torch.cat([self.cls.expand(b, -1, -1), self.embed(patches)], dim=1) + self.pos
        return self.head(self.ln_f(self.blocks(z))[:, 0])


def vit(num_classes: int = 10, width: float = 1.0, depth: int = 6, heads: int = 4, patch: int = 4) -> ViT:
    """The zoo's ViT for CIFAR-size images: ``width`` multiplies 128 (the channels must divide by ``heads``)."""
    return ViT(num_classes, 32, patch, 3, _channels(width, heads), depth, heads)
