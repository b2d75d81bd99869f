"""Compressed tensors in memory order: bit-packing of boolean masks and flat views of (channels-last) tensors.

Shared by SWAT's compressed layer inputs and the bit-packed ReLU, so neither imports the other.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["pack_bits", "unpack_bits", "flat_view", "unflat"]

_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16, torch.uint8, torch.bool, torch.int32, torch.int64)


def numpy_ok(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor (in memory order) as uint8 bytes, eight positions per byte, little-endian bit order."""
    flat = mask.reshape(-1)
    if numpy_ok(flat):  # numpy's packbits is vectorised; torch has no equivalent
        return torch.from_numpy(np.packbits(flat.numpy(), bitorder="little"))
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = (2 ** torch.arange(8, device=flat.device)).to(torch.uint8)
    return (flat.view(-1, 8).to(torch.uint8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` positions as booleans."""
    if packed.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(packed.numpy(), count=numel, bitorder="little").view(bool))
    bits = (packed[:, None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return bits.reshape(-1)[:numel].bool()


def flat_view(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``x`` as a 1-D tensor in memory order (no copy for contiguous and channels-last tensors)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(-1), True
    return x.reshape(-1), False


def unflat(flat: torch.Tensor, shape: tuple[int, ...], channels_last: bool) -> torch.Tensor:
    """Inverse of :func:`flat_view`: the logical ``shape`` over ``flat``'s memory."""
    if channels_last:
        n, c, h, w = shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(shape)
