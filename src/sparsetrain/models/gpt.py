"""A decoder-only GPT (pre-LayerNorm, causal self-attention, GELU MLP, learned positions), for character models.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (causal). Every matrix of a
block is an ``nn.Linear`` (query/key/value, output projection, the MLP's two), so every method of the
library applies to them; the token and position embeddings and the LayerNorms are no Linear layers,
and the output head is the last Linear (``dense_layers: [last]`` keeps it dense, as the literature does).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GPT", "Block", "gpt"]


class Block(nn.Module):
    """One pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x)); causal attention unless told otherwise."""

    def __init__(self, width: int, heads: int, causal: bool = True):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads, self.causal = heads, causal
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.fc = nn.Linear(width, 4 * width)
        self.act = nn.GELU()
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(self.act(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Token ids ``[batch, time]`` to next-token logits ``[batch, time, vocab]``."""

    def __init__(self, vocab_size: int, context: int = 64, width: int = 128, depth: int = 4, heads: int = 4):
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(depth)])
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)  # PyTorch's default initialisation throughout

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens is longer than the model's context of {self.context}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        return self.head(self.ln_f(self.blocks(x)))

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, new_tokens: int, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``idx`` followed by ``new_tokens`` tokens sampled one at a time (the last ``context`` tokens as input)."""
        was = self.training
        self.eval()
        for _ in range(new_tokens):
            logits = self(idx[:, -self.context :])[:, -1] / max(temperature, 1e-6)
            nxt = torch.multinomial(F.softmax(logits.float(), dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        self.train(was)
        return idx


def gpt(num_classes: int = 65, width: float = 1.0, context: int = 64, depth: int = 4, heads: int = 4) -> GPT:
    """The zoo's GPT: ``num_classes`` is the vocabulary, ``width`` multiplies 128 (4.0: width 512)."""
    return GPT(num_classes, context, _channels(width, heads), depth, heads)


def _channels(width: float, heads: int) -> int:
    """``128 * width`` channels, refused (with the nearest widths that work) unless whole and divisible by ``heads``."""
    channels = 128 * width
    if channels != int(channels) or int(channels) < heads or int(channels) % heads:
        step = heads / 128
        low, high = max(step, step * (channels // heads)), step * (channels // heads + 1)
        raise ValueError(
            f"model width {width:g} gives {channels:g} channels, which {heads} heads do not divide; use "
            f"width {low:g} or {high:g} (multiples of heads/128 = {step:g})"
        )
    return int(channels)
