"""Sparse checkpoints: a trained sparse model saved small, as safetensors holding only the kept values and a bitmask
of their positions, and read back without running any code from the file.

    st.save_sparse(sp, "model.sparse.safetensors")        # a sparsifier (its masks) or a plain model (its zeros)
    state = st.load_sparse("model.sparse.safetensors")    # the dense state dict, zeros where nothing was kept
    st.load_sparse("model.sparse.safetensors", model)     # or loaded into a model of the same architecture

A sparse tensor ``name`` is stored as ``name::values`` (its kept entries, row-major order) and ``name::bits`` (one
bit a position, packed, NumPy's big-endian bit order); every other tensor as it is. The file's metadata says which
tensors are sparse, their shapes and dtypes, and the format's version. Reading checks every part (shapes, bit counts
against the values, the format) and refuses a file that is not one, in one line: safetensors holds tensors and a
JSON header only, so a file is never unpickled.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

__all__ = ["save_sparse", "load_sparse", "SparseCheckpointError", "FORMAT"]

FORMAT = "sparsetrain-sparse/1"
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


class SparseCheckpointError(ValueError):
    """A file that is not a sparse checkpoint this version reads, or one whose parts disagree."""


def _sparse_names(state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The tensors worth storing sparse, with their positions: the sparsifier's masked weights, or (a plain model or
    state dict) every floating tensor of two or more dimensions at least half zeros."""
    if masks is not None:  # kept entries that hold exactly zero are left out too: restored as zeros, lossless
        return {n: m.to("cpu", torch.bool) & (state[n].cpu() != 0) for n, m in masks.items() if n in state}
    return {
        n: t != 0
        for n, t in state.items()
        if t.is_floating_point() and t.dim() >= 2 and int((t != 0).sum()) * 2 <= t.numel()
    }


def save_sparse(model_or_sparsifier, path: str | os.PathLike) -> Path:
    """Write ``model_or_sparsifier``'s weights to ``path`` (safetensors) with each sparse weight as its kept values and
    a bitmask; returns the path. A sparsifier gives its masks and the weights it publishes (``export_state``); a
    plain model (``sp.remove()``'s, or any) or a state dict is stored sparse where at least half a weight is zeros. The file is
    written to a temporary name and renamed into place."""
    from safetensors.torch import save

    from .checkpoint import write_atomic  # (the one way the project writes files: atomic, never through links)

    sparsifier = model_or_sparsifier if hasattr(model_or_sparsifier, "maskset") else None
    if sparsifier is not None:
        state = {k: v.detach() for k, v in sparsifier.export_state().items()}
        masks = dict(sparsifier.maskset.masks) if sparsifier.maskset is not None else None
    elif isinstance(model_or_sparsifier, (nn.Module, dict)):
        given = model_or_sparsifier
        masks = None
        state = {k: v.detach() for k, v in (given.state_dict() if isinstance(given, nn.Module) else given).items()}
    else:
        raise TypeError(
            f"save_sparse takes a sparsifier, an nn.Module or a state dict, got {type(model_or_sparsifier).__name__}"
        )
    sparse = {n: p for n, p in _sparse_names(state, masks).items() if n in state and state[n].shape == p.shape}
    tensors: dict[str, torch.Tensor] = {}
    described = {}
    for name, t in state.items():
        t = t.to("cpu").contiguous()
        if name in sparse:
            keep = sparse[name].reshape(-1)
            tensors[f"{name}::values"] = t.reshape(-1)[keep].clone()
            tensors[f"{name}::bits"] = torch.from_numpy(np.packbits(keep.numpy()))
            described[name] = {"shape": list(t.shape), "dtype": str(t.dtype)}
        else:
            tensors[name] = t.clone()
    metadata = {"format": FORMAT, "sparse": json.dumps(described, sort_keys=True)}
    if sparsifier is not None:
        metadata["method"] = type(sparsifier).name
    target = Path(path)
    data = save(tensors, metadata=metadata)
    write_atomic(target, lambda f: f.write(data))
    return target


def load_sparse(path: str | os.PathLike, model: nn.Module | None = None):
    """The dense state dict :func:`save_sparse` wrote to ``path`` (zeros wherever nothing was kept), or, given
    ``model``, that state loaded into it (strictly: the same architecture) and the model returned. Refuses, with
    :class:`SparseCheckpointError` in one line, a file that is not a sparse checkpoint or whose parts disagree."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors parses a header and raw bytes only: anything else is not one of ours
        raise SparseCheckpointError(f"{path}: not a safetensors file ({type(e).__name__}: {e})") from None
    if metadata.get("format") != FORMAT:
        raise SparseCheckpointError(f"{path}: format {metadata.get('format')!r}, not {FORMAT!r}")
    try:
        described = json.loads(metadata["sparse"])
    except (KeyError, ValueError) as e:
        raise SparseCheckpointError(f"{path}: unreadable list of sparse tensors ({e})") from None
    state: dict[str, torch.Tensor] = {}
    parts = set()
    for name, d in described.items():
        state[name] = _dense(path, name, d, stored.get(f"{name}::values"), stored.get(f"{name}::bits"))
        parts |= {f"{name}::values", f"{name}::bits"}
    state.update({k: v for k, v in stored.items() if k not in parts})
    if model is None:
        return state
    model.load_state_dict(state, strict=True)
    return model


def _dense(path: Path, name: str, d, values: torch.Tensor | None, bits: torch.Tensor | None) -> torch.Tensor:
    """The dense tensor ``name`` from its stored parts, each checked against the metadata."""
    shape, dtype = (d.get("shape"), d.get("dtype")) if isinstance(d, dict) else (None, None)
    if not (isinstance(shape, list) and all(isinstance(v, int) and v >= 0 for v in shape)) or dtype not in _DTYPES:
        raise SparseCheckpointError(f"{path}: {name}: bad shape or dtype {shape!r}, {dtype!r}")
    if values is None or bits is None:
        raise SparseCheckpointError(f"{path}: {name}: its values or its bitmask is missing")
    n = math.prod(shape)
    if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != (n + 7) // 8:
        raise SparseCheckpointError(f"{path}: {name}: a bitmask of {bits.numel()} bytes for {n} positions")
    keep = torch.from_numpy(np.unpackbits(bits.numpy(), count=n).astype(bool))
    if values.dim() != 1 or values.numel() != int(keep.sum()) or str(values.dtype) != dtype:
        raise SparseCheckpointError(
            f"{path}: {name}: {values.numel()} values ({values.dtype}) for {int(keep.sum())} kept positions ({dtype})"
        )
    if bits.numel() * 8 > n and int(np.unpackbits(bits.numpy())[n:].sum()):
        raise SparseCheckpointError(f"{path}: {name}: bits set past its {n} positions")
    out = torch.zeros(n, dtype=_DTYPES[dtype])
    out[keep] = values
    return out.reshape(shape)
