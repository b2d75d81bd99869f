"""The shape of what is removed: unstructured, channels, kernels, blocks, kernel patterns, N:M.

A scheme groups a weight tensor into *units* (a weight, a filter, a kernel, an r x c
block, a group of M weights) and says which elements of a unit are kept when the unit
is on (all of them; for kernel patterns the best 4-of-9 pattern; for N:M the top N).
From a score tensor (higher = keep) and a density, :meth:`Scheme.mask` keeps the
best units: exactly round(density * numel / kept_per_unit) of them. Dynamic methods
prune and grow whole units with :meth:`Scheme.update`.

Names, as used in configs: ``unstructured``, ``channel_out``, ``channel_in``,
``kernel``, ``pattern``, ``block_RxC`` (e.g. ``block_4x1``, MEST's blocks of 4 output
rows in one input column), ``nm_N:M`` (e.g. ``nm_2:4``), ``fan_in`` (every output row keeps
the same number of inputs).

Under sharded training (FSDP2) a scheme sees each rank's rows of the weight: units that lie within rows are
chosen exactly as one process would choose them (:mod:`sparsetrain.core.sharding`); ``rows_per_unit`` says how
many output rows a unit spans (None: all of them, as for ``channel_in``, which cannot be sharded).
"""

from __future__ import annotations

import re

import torch

from .sharding import Part, local, top_k

__all__ = ["Scheme", "parse_scheme", "KERNEL_PATTERNS", "SCHEME_NAMES"]

SCHEME_NAMES = (
    "unstructured, channel_out, channel_in, kernel, pattern, block_RxC (e.g. block_4x1), nm_N:M (e.g. nm_2:4), fan_in"
)


def _patterns() -> torch.Tensor:
    """Eight 4-of-9 patterns of a 3x3 kernel, all keeping the centre (as in PatDNN/MEST):
    the centre with three of its four neighbours, and the centre with two neighbours and the corner between them."""
    up, down, left, right, centre = (0, 1), (2, 1), (1, 0), (1, 2), (1, 1)
    cells = [
        [centre, down, left, right],
        [centre, up, left, right],
        [centre, up, down, right],
        [centre, up, down, left],
        [centre, up, left, (0, 0)],
        [centre, up, right, (0, 2)],
        [centre, down, left, (2, 0)],
        [centre, down, right, (2, 2)],
    ]
    out = torch.zeros(len(cells), 9, dtype=torch.bool)
    for i, pattern in enumerate(cells):
        for r, c in pattern:
            out[i, 3 * r + c] = True
    return out


KERNEL_PATTERNS = _patterns()


class Scheme:
    """Unstructured: every weight is its own unit."""

    name = "unstructured"
    kept_per_unit = 1
    whole_units = False  # True: units are equal shares of the tensor, counted as such (channels, kernels, blocks)
    supports_update = True
    rows_per_unit: int | None = 1

    def check(self, shape: tuple[int, ...], layer: str = "") -> None:
        """Raise ValueError if this scheme cannot shape a tensor of ``shape``."""

    def split(self, t: torch.Tensor, layer: str = "") -> tuple[torch.Tensor, Part | None]:
        """This rank's rows of ``t`` and where they sit (None: ``t`` is whole), refusing units that would span ranks."""
        part = Part.of(t)
        if part is not None:
            part.check_rows(self.rows_per_unit, self.name, layer)
        return local(t), part

    def units_in(self, shape: tuple[int, ...]) -> int:
        """Removable units in a whole tensor of ``shape``."""
        return self.group(torch.empty(shape, device="meta")).shape[0]

    def active_units(self, mask: torch.Tensor) -> int:
        """Units with at least one kept weight, over all ranks."""
        m, part = self.split(mask)
        n = int(self.group(m).any(1).sum())
        return part.sum(n) if part else n

    def _draw(self, shape: tuple[int, ...], generator: torch.Generator, part: Part | None, device) -> torch.Tensor:
        """Uniform random numbers for every unit of the whole layer (one row each, ``shape[1:]`` wide), cut to this
        rank's units: sharded ranks draw what one process draws and keep their share."""
        whole = torch.rand(shape, generator=generator)
        if part is not None:  # units lie within rows: rows [a, b) hold units [a * units / rows, b * units / rows)
            units, rows = shape[0], part.shape[0]
            whole = whole[part.start * units // rows : (part.start + part.rows) * units // rows]
        return whole.to(device)

    def group(self, t: torch.Tensor) -> torch.Tensor:
        """The tensor as rows of units (one row per removable unit)."""
        return t.reshape(-1, 1)

    def ungroup(self, u: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Inverse of :meth:`group`: rows of units back to the tensor's shape."""
        return u.reshape(shape)

    def template(self, unit_scores: torch.Tensor) -> torch.Tensor:
        """Which elements of each unit are kept when the unit is on."""
        return torch.ones_like(unit_scores, dtype=torch.bool)

    def units_for(self, numel: int, density: float, n_units: int) -> int:
        """Units to keep for ``density`` of ``numel`` weights in ``n_units`` units."""
        want = density * n_units if self.whole_units else density * numel / self.kept_per_unit
        return max(0, min(n_units, round(want)))

    def mask(self, score: torch.Tensor, density: float, layer: str = "") -> torch.Tensor:
        """Keep the best units of ``score`` at ``density``; exact to one unit."""
        self.check(tuple(score.shape), layer)
        s, part = self.split(score, layer)
        u = self.group(s.detach().float())
        tmpl = self.template(u)
        k = self.units_for(score.numel(), density, self.units_in(tuple(score.shape)))
        keep = top_k((u * tmpl).sum(1), k, part)
        out = self.ungroup(tmpl & keep[:, None], tuple(s.shape))
        return part.wrap(out) if part else out

    def update(
        self,
        mask: torch.Tensor,
        prune_score: torch.Tensor,
        n_prune: int,
        n_grow: int,
        grow_score: torch.Tensor | None,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Drop the ``n_prune`` weakest active units, then turn on ``n_grow`` inactive ones.

        Growth takes the highest ``grow_score`` (RigL) or, with None, units uniformly at
        random (SET, MEST). Units pruned in this update are not grown again at once.
        Counts are in units and are clipped to what is available.
        """
        if not self.supports_update:
            raise ValueError(f"scheme {self.name} does not support prune-and-grow; use it with a static mask")
        m, part = self.split(mask)
        total = part.sum if part else int
        um = self.group(m)
        active = um.any(1)
        n_prune = min(n_prune, total(int(active.sum())))
        new_active = active.clone()
        if n_prune:
            s = (self.group(local(prune_score).detach().float()) * um).sum(1)
            s = torch.where(active, s, torch.full_like(s, float("inf")))
            new_active &= ~top_k(s, n_prune, part, largest=False)
        candidates = ~active  # never the units just dropped
        n_grow = min(n_grow, total(int(candidates.sum())))
        if n_grow:
            if grow_score is None:
                units = self.units_in(tuple(mask.shape))
                g = self._draw((units,), generator, part, m.device)
                gu = self._draw((units, um.shape[1]), generator, part, m.device)
            else:
                gu = self.group(local(grow_score).detach().float().abs())
                g = gu.sum(1)
            g = torch.where(candidates, g, torch.full_like(g, -float("inf")))
            new_active |= top_k(g, n_grow, part)
            tmpl_new = self.template(gu)
        else:
            tmpl_new = torch.zeros_like(um)
        # kept units keep their elements; grown units take a fresh template
        elems = self.ungroup(torch.where(active[:, None], um, tmpl_new) & new_active[:, None], tuple(m.shape))
        return part.wrap(elems) if part else elems


class ChannelOut(Scheme):
    """Whole output channels (filters, or rows of a Linear weight)."""

    name = "channel_out"

    def group(self, t):
        return t.reshape(t.shape[0], -1)

    whole_units = True  # every unit is the same share of the tensor: keep round(density * units)


class ChannelIn(Scheme):
    """Whole input channels (columns of a Linear weight)."""

    name = "channel_in"
    rows_per_unit = None  # a unit is a column: every output row

    def check(self, shape, layer=""):
        if len(shape) < 2:
            raise ValueError(f"{layer}: channel_in needs a weight with an input dimension, got shape {shape}")

    def group(self, t):
        return t.transpose(0, 1).reshape(t.shape[1], -1)

    def ungroup(self, u, shape):
        return u.reshape(shape[1], shape[0], *shape[2:]).transpose(0, 1).contiguous()

    whole_units = True  # every unit is the same share of the tensor: keep round(density * units)


class Kernel(Scheme):
    """Whole kh x kw kernels of a convolution."""

    name = "kernel"

    def check(self, shape, layer=""):
        if len(shape) != 4:
            raise ValueError(f"{layer}: scheme {self.name} applies to Conv2d weights only, got shape {shape}")

    def group(self, t):
        return t.reshape(t.shape[0] * t.shape[1], -1)

    whole_units = True  # every unit is the same share of the tensor: keep round(density * units)


class Pattern(Kernel):
    """Each 3x3 kernel keeps one of :data:`KERNEL_PATTERNS` (the best by score); kernels may be removed whole."""

    name = "pattern"
    kept_per_unit = 4

    def check(self, shape, layer=""):
        super().check(shape, layer)
        if tuple(shape[2:]) != (3, 3):
            raise ValueError(f"{layer}: scheme pattern needs 3x3 kernels, got {tuple(shape[2:])}")

    def template(self, unit_scores):
        pats = KERNEL_PATTERNS.to(unit_scores.device)
        best = (unit_scores @ pats.T.float()).argmax(1)
        return pats[best]

    def units_for(self, numel, density, n_units):
        if density > 4 / 9 + 1e-9:
            raise ValueError(
                f"scheme pattern keeps at most 4 of 9 weights (density 0.444); density {density:.3f} asked"
            )
        return max(0, min(n_units, round(density * numel / 4)))


class Block(Scheme):
    """r x c blocks of the weight seen as a matrix [out, in * kh * kw]."""

    def __init__(self, r: int, c: int):
        if r < 1 or c < 1:
            raise ValueError(f"block size must be positive, got {r}x{c}")
        self.r, self.c = r, c
        self.name = f"block_{r}x{c}"
        self.rows_per_unit = r

    def check(self, shape, layer=""):
        rows, cols = shape[0], (int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1)
        if rows % self.r or cols % self.c:
            raise ValueError(f"{layer}: a {rows}x{cols} weight matrix does not divide into {self.r}x{self.c} blocks")

    def group(self, t):
        m = t.reshape(t.shape[0], -1)
        rows, cols = m.shape
        return (
            m.reshape(rows // self.r, self.r, cols // self.c, self.c).permute(0, 2, 1, 3).reshape(-1, self.r * self.c)
        )

    def ungroup(self, u, shape):
        rows = shape[0]
        cols = u.numel() // rows
        m = u.reshape(rows // self.r, cols // self.c, self.r, self.c).permute(0, 2, 1, 3).reshape(rows, cols)
        return m.reshape(shape)

    whole_units = True  # every unit is the same share of the tensor: keep round(density * units)


class NM(Scheme):
    """N of every M consecutive weights along the input dimension are kept (e.g. 2:4); density is N/M."""

    supports_update = False

    def __init__(self, n: int, m: int):
        if not 0 < n < m:
            raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
        self.n, self.m = n, m
        self.name = f"nm_{n}:{m}"
        self.kept_per_unit = n

    def check(self, shape, layer=""):
        cols = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1
        if cols % self.m:
            raise ValueError(
                f"{layer}: input dimension {cols} does not divide into groups of {self.m} for {self.n}:{self.m}"
            )

    def group(self, t):
        return t.reshape(-1, self.m)

    def template(self, unit_scores):
        idx = torch.topk(unit_scores, self.n, dim=1).indices
        return torch.zeros_like(unit_scores, dtype=torch.bool).scatter_(1, idx, True)

    def units_for(self, numel, density, n_units):
        if abs(density - self.n / self.m) > 1e-6:
            raise ValueError(
                f"scheme {self.name} has density {self.n / self.m:g}; density {density:.4f} asked "
                f"(set sparsity to {1 - self.n / self.m:g} with a uniform distribution)"
            )
        return n_units


class FanIn(Scheme):
    """Constant fan-in: every output row (a Linear's output neuron, a convolution's filter) keeps exactly the same
    number of inputs, round(density * fan_in), chosen by score within the row. A sparse layer is then a dense
    gather of k inputs per neuron and a small dense product (SRigL, Lasby et al. 2024); N:M is the special
    case of a fan-in constant on every group of M inputs. Prune and grow run row by row, the same count in
    every row (SRigL's rule), so the fan-in stays constant through SET, RigL and MEST updates."""

    name = "fan_in"

    def check(self, shape, layer=""):
        if len(shape) < 2:
            raise ValueError(f"{layer}: scheme fan_in needs a weight with output rows, got shape {tuple(shape)}")

    def units_for(self, numel, density, n_units):
        return n_units  # not used by mask(): the count is per row

    def mask(self, score, density, layer=""):
        self.check(tuple(score.shape), layer)
        s, part = self.split(score, layer)
        rows = s.detach().float().reshape(s.shape[0], -1)
        k = max(1, min(rows.shape[1], round(density * rows.shape[1])))
        keep = torch.zeros_like(rows, dtype=torch.bool).scatter_(1, torch.topk(rows, k, dim=1).indices, True)
        return part.wrap(keep.reshape(s.shape)) if part else keep.reshape(s.shape)

    def row_counts(self, mask: torch.Tensor) -> tuple[int, int, int]:
        """(rows with a kept weight, the largest fan-in, kept weights), over all ranks."""
        m, part = self.split(mask)
        m = m.reshape(m.shape[0], -1)
        live, nnz = int(m.any(1).sum()), int(m.sum())
        fan = int(m.sum(1).max()) if m.shape[0] else 0
        if part is None:
            return live, fan, nnz
        return part.sum(live), -part.min(-fan), part.sum(nnz)

    def update(self, mask, prune_score, n_prune, n_grow, grow_score, generator):
        live = local(mask).reshape(local(mask).shape[0], -1).any(1)  # rows an ablation emptied stay empty
        n = max(1, self.row_counts(mask)[0])
        return self.prune_and_grow_rows(mask, prune_score, n_prune // n, n_grow // n, grow_score, generator, live)

    def prune_and_grow_rows(self, mask, prune_score, per_row_prune, per_row_grow, grow_score, generator, live=None):
        """Prune the ``per_row_prune`` lowest-scored kept weights of every live row, then grow ``per_row_grow``
        weights in each (largest ``|grow_score|``, or at random), never one just pruned: the same counts in every
        row, so a constant fan-in stays constant. ``live`` (default: every row) marks the rows that take part."""
        whole_mask = mask
        mask, part = self.split(mask)
        shape = tuple(mask.shape)
        m = mask.reshape(shape[0], -1)
        live = torch.ones(m.shape[0], dtype=torch.bool, device=m.device) if live is None else live
        fewest = (lambda t: part.min(int(t.min()) if t.numel() else 2**62)) if part else (lambda t: int(t.min()))
        if not (part.sum(int(live.sum())) if part else live.any()):
            return whole_mask.clone()
        new = m.clone()
        p = min(per_row_prune, fewest(m[live].sum(1)))
        if p:
            s = local(prune_score).detach().float().reshape(m.shape)
            s = torch.where(m, s, torch.full_like(s, float("inf")))
            new[live] = new[live].scatter(1, torch.topk(s[live], p, dim=1, largest=False).indices, False)
        candidates = ~m  # never a weight just pruned
        g_count = min(per_row_grow, fewest(candidates[live].sum(1)))
        if g_count:
            if grow_score is None:
                g = self._draw(tuple(whole_mask.shape), generator, part, m.device).reshape(m.shape)
            else:
                g = local(grow_score).detach().float().abs().reshape(m.shape)
            g = torch.where(candidates, g, torch.full_like(g, -float("inf")))
            new[live] = new[live].scatter(1, torch.topk(g[live], g_count, dim=1).indices, True)
        return part.wrap(new.reshape(shape)) if part else new.reshape(shape)

    def ablate(self, mask, weight_abs, grad_abs, n_swap: int, threshold: float):
        """SRigL's dynamic neuron ablation: a row (neuron) is salient where its weights survive a magnitude prune of
        ``n_swap`` of the layer's kept weights, or are among the ``n_swap`` inactive ones the gradient would grow;
        rows with fewer than ``threshold`` x their fan-in salient weights lose all their weights. Returns (the
        mask with those rows emptied, the rows that live on, the fan-in that spreads the layer's weights over
        them). Never empties every row."""
        _, fan, nnz = self.row_counts(mask)
        whole_mask = mask
        mask, part = self.split(mask)
        m = mask.reshape(mask.shape[0], -1)
        live = m.any(1)
        below = torch.full(m.shape, -1.0, device=m.device)  # ranks under every real score
        w = torch.where(m, local(weight_abs).detach().float().reshape(m.shape), below)
        salient = top_k(w.reshape(-1), max(nnz - n_swap, 0), part).reshape(m.shape)
        g = torch.where(m, below, local(grad_abs).detach().float().abs().reshape(m.shape))
        salient |= top_k(g.reshape(-1), min(n_swap, whole_mask.numel() - nnz), part).reshape(m.shape)
        survivors = live & (salient.sum(1) >= threshold * fan)
        n_survivors = part.sum(int(survivors.sum())) if part else int(survivors.sum())
        if not n_survivors:
            return whole_mask.clone(), live, fan
        kept = (m & survivors[:, None]).reshape(mask.shape)
        return (part.wrap(kept) if part else kept), survivors, min(m.shape[1], nnz // n_survivors)


def parse_scheme(name: str) -> Scheme:
    """A scheme from its config name; see the module docstring for the names."""
    if not isinstance(name, str):
        raise ValueError(f"unknown scheme {name!r}; choose one of: {SCHEME_NAMES}")
    simple = {
        "unstructured": Scheme,
        "channel_out": ChannelOut,
        "channel_in": ChannelIn,
        "kernel": Kernel,
        "pattern": Pattern,
        "fan_in": FanIn,
    }
    if name in simple:
        return simple[name]()
    if m := re.fullmatch(r"block_(\d+)x(\d+)", name):
        return Block(int(m[1]), int(m[2]))
    if m := re.fullmatch(r"nm_(\d+):(\d+)", name):
        return NM(int(m[1]), int(m[2]))
    raise ValueError(f"unknown scheme {name!r}; choose one of: {SCHEME_NAMES}")
