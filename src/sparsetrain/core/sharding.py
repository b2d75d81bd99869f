"""Sharded weights (FSDP2's ``fully_shard``): a tensor's local rows, and exact decisions over the whole tensor.

Under ``fully_shard`` every parameter is a DTensor split along dim 0: rank r holds a contiguous block of rows.
Masks live the same way (a DTensor with the weight's placements), and every decision a method makes on a
layer, which units to keep, prune or grow, is taken so that the chosen set equals, bit for bit, the set one
process would choose from the whole tensor, without gathering it:

* *the k best units* (:func:`top_k`): the k largest scores, and among scores equal to the k-th the lowest
  flat indices. One process finds the k-th value with ``torch.topk``; sharded ranks find it by a search over
  the order-preserving integer keys of the float32 scores with all-reduced counts (a few rounds of 15
  thresholds each), then split the boundary ties in rank order. Both give the same set.
* *random draws* (:meth:`Part.rows`): every rank draws the whole layer's random numbers from the same
  generator and keeps its rows, so random growth lands where one process would put it.
* *counts* (:meth:`Part.sum`, :meth:`Part.min`): all-reduced.

Rules that stay within an output row (constant fan-in, N:M along the input) need no communication. A unit
that spans ranks (``channel_in``; ``block_RxC`` where a shard boundary cuts a block) is refused with the
reason (:meth:`Part.check_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # a PyTorch built without distributed support has no sharded tensors
    _DTensor = ()

__all__ = ["Part", "is_sharded", "local", "whole", "sum_over_ranks", "top_k", "sortable_keys"]


def is_sharded(t) -> bool:
    """True for a DTensor (a parameter, gradient, optimizer state or mask under FSDP2)."""
    return isinstance(t, _DTensor)


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (gathered: every rank calls this alike), else ``t`` itself."""
    return t.full_tensor() if is_sharded(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (``t`` itself when it is an ordinary tensor)."""
    return t.to_local() if is_sharded(t) else t


def sum_over_ranks(value: int | float, like: torch.Tensor) -> int | float:
    """``value``, computed on this rank's part of ``like``, summed over the ranks ``like`` is sharded on."""
    part = Part.of(like)
    return part.sum(value) if part is not None else value


@dataclass(frozen=True)
class Part:
    """Where this rank's rows sit in a tensor split along dim 0: rows ``[start, start + rows)`` of ``shape[0]``."""

    start: int
    rows: int
    shape: tuple[int, ...]
    mesh: object
    placements: tuple

    @classmethod
    def of(cls, t) -> "Part | None":
        """The part ``t`` holds, or None for an ordinary (whole) tensor. Only FSDP2's layout (one mesh dimension,
        ``Shard(0)``) is understood; anything else is refused rather than silently treated as whole."""
        if not is_sharded(t):
            return None
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        placements = tuple(t.placements)
        if all(isinstance(p, Replicate) for p in placements):
            return None
        if t.device_mesh.ndim != 1 or placements != (Shard(0),):
            raise ValueError(
                f"sparse weights must be sharded along dim 0 over one mesh dimension (FSDP2's default); "
                f"got placements {placements} on a {t.device_mesh.ndim}-d mesh"
            )
        local_shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, placements)
        return cls(int(offset[0]), int(local_shape[0]), tuple(t.shape), t.device_mesh, placements)

    @property
    def group(self):
        """The process group the rows are spread over."""
        return self.mesh.get_group()

    def wrap(self, local_t: torch.Tensor):
        """A DTensor with this part's placements around ``local_t`` (this rank's rows of a tensor shaped like the whole)."""
        from torch.distributed.tensor import DTensor

        shape = (self.shape[0], *local_t.shape[1:])
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(
            local_t, self.mesh, self.placements, run_check=False, shape=torch.Size(shape), stride=stride
        )

    def rows_of(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a whole tensor (every rank holds the same one, e.g. a random draw)."""
        return whole[self.start : self.start + self.rows]

    def sum(self, value: int | float) -> int | float:
        """``value`` summed over the ranks."""
        t = torch.tensor([value], dtype=torch.float64 if isinstance(value, float) else torch.int64)
        dist.all_reduce(t, group=self.group)
        return t.item()

    def min(self, value: int) -> int:
        """The smallest ``value`` over the ranks."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def check_rows(self, rows_per_unit: int | None, scheme: str, layer: str) -> None:
        """Refuse a scheme whose units would span two ranks' rows."""
        if rows_per_unit is None:
            raise ValueError(
                f"{layer}: scheme {scheme} groups weights across output rows, which FSDP shards over ranks, "
                "so a unit would span ranks; use a scheme whose units lie within rows (unstructured, "
                "channel_out, kernel, pattern, fan_in, nm_N:M) or train unsharded"
            )
        end = self.start + self.rows
        if self.start % rows_per_unit or (end % rows_per_unit and end != self.shape[0]):
            raise ValueError(
                f"{layer}: scheme {scheme} keeps blocks of {rows_per_unit} rows, but this rank's shard holds "
                f"rows {self.start}..{end - 1}, which cuts a block; use a block height that divides each "
                f"rank's rows ({self.rows}) or another scheme"
            )


def sortable_keys(scores: torch.Tensor) -> torch.Tensor:
    """Int64 keys that order like the float32 scores (-0.0 equal to +0.0, NaN lowest of all)."""
    s = scores.detach().float().reshape(-1)
    s = (s + 0.0).nan_to_num_(nan=-float("inf"))  # + 0.0 folds -0.0 into +0.0 (a fresh tensor, changed in place)
    bits = s.view(torch.int32)
    # a negative float's bits b (sign set, magnitude m) become -m - 1, which is b ^ 0x7FFFFFFF in 32-bit two's
    # complement: one shifted copy as the only temporary (the largest layer's scores are tens of MB)
    return bits.bitwise_xor_((bits >> 31).bitwise_and_(0x7FFFFFFF)).to(torch.int64)


def top_k(scores: torch.Tensor, k: int, part: Part | None = None, largest: bool = True) -> torch.Tensor:
    """Mark the ``k`` largest (``largest=False``: smallest) of ``scores``, a 1-D tensor of this rank's units in
    order; among scores equal to the k-th, the lowest indices win (in rank order when sharded). ``k`` counts
    over all ranks."""
    keys = sortable_keys(scores)
    if not largest:
        keys = -keys - 1
    n_local = keys.numel()
    if part is None:
        if k >= n_local:
            return torch.ones(n_local, dtype=torch.bool, device=scores.device)
        if k <= 0:
            return torch.zeros(n_local, dtype=torch.bool, device=scores.device)
        kth = torch.topk(keys, k, sorted=False).values.min()
        above = keys > kth
        need = k - int(above.sum())
    else:
        if k <= 0:
            return torch.zeros(n_local, dtype=torch.bool, device=scores.device)
        kth = _kth_largest(keys, k, part)
        if kth is None:
            return torch.ones(n_local, dtype=torch.bool, device=scores.device)
        above = keys > kth
        need = k - part.sum(int(above.sum()))
    ties = keys == kth
    if part is not None:
        # the boundary ties go to the lowest global indices: ranks with earlier rows first
        counts = [torch.zeros(2, dtype=torch.int64) for _ in range(dist.get_world_size(part.group))]
        dist.all_gather(counts, torch.tensor([part.start, int(ties.sum())]), group=part.group)
        need -= sum(int(c[1]) for c in counts if int(c[0]) < part.start)
    take = ties & (torch.cumsum(ties, 0) <= max(need, 0))
    return above | take


def _kth_largest(keys: torch.Tensor, k: int, part: Part) -> torch.Tensor | None:
    """The k-th largest key over every rank (None when there are at most k keys in all), by narrowing
    [lo, hi] with all-reduced counts of keys >= 15 thresholds a round."""
    group = part.group
    n = torch.tensor([keys.numel()], dtype=torch.int64)
    dist.all_reduce(n, group=group)
    if k >= int(n):
        return None
    big = 2**40
    ends = torch.tensor([-(int(keys.min()) if keys.numel() else big), int(keys.max()) if keys.numel() else -big])
    dist.all_reduce(ends, op=dist.ReduceOp.MAX, group=group)
    lo, hi = -int(ends[0]), int(ends[1])  # count(>= lo) = n >= k; the answer lies in [lo, hi]
    ordered = keys.sort().values
    while lo < hi:
        cands = torch.unique(
            torch.linspace(lo + 1, hi, steps=min(15, hi - lo), dtype=torch.float64).round().to(torch.int64)
        )
        counts = (keys.numel() - torch.searchsorted(ordered, cands, side="left")).to(torch.int64)
        dist.all_reduce(counts, group=group)
        reach = cands[counts >= k]
        miss = cands[counts < k]
        if reach.numel():
            lo = int(reach.max())
        if miss.numel():
            hi = int(miss.min()) - 1
    return torch.tensor(lo, dtype=torch.int64)
