"""The sparse core: masks over selected parameters, kept exact through every optimizer step.

A :class:`MaskSet` owns one boolean mask per selected weight (Conv/Linear weights by
default). Attached to an optimizer, it zeroes the masked gradient entries before each
step and the masked weights (and their optimizer state) after it, so momentum, weight
decay and adaptive moments can never move a masked weight off zero, whatever the
optimizer. Masks are plain tensors: they save and load with the checkpoint, and methods
that change them (dynamic sparse training) call :meth:`MaskSet.set_mask`.

Under sharded training (FSDP2) a mask is a DTensor with its weight's placements: each rank holds and
enforces the mask of its own rows, on its shards of the weight, the gradient and the optimizer state.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn

from .sharding import Part, local, whole

__all__ = ["MaskSet", "LayerSparsity", "select_parameters", "random_masks", "dense_from_values"]


def dense_from_values(values: torch.Tensor, flat_index: torch.Tensor, shape) -> torch.Tensor:
    """A tensor of ``shape`` holding ``values`` at the row-major positions ``flat_index`` and zeros elsewhere (a
    layer's kept weights, or their gradient, laid back into the dense weight)."""
    out = values.new_zeros(math.prod(shape))
    out[flat_index.to(values.device)] = values
    return out.view(tuple(shape))


SPARSIFIABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def is_conv1d(m: nn.Module) -> bool:
    """Whether ``m`` is (or derives from) the ``Conv1D`` projection of Hugging Face GPT-2 style models (a Linear with
    its weight stored transposed, [in, out]), recognised by class name so that ``transformers`` is no dependency."""
    weight = getattr(m, "weight", None)
    return (
        any(c.__name__ == "Conv1D" for c in type(m).__mro__) and isinstance(weight, torch.Tensor) and weight.dim() == 2
    )


def _sparsifiable(m: nn.Module) -> bool:
    """Conv/Linear layers, and the ``Conv1D`` projections of Hugging Face GPT-2 style models."""
    return isinstance(m, SPARSIFIABLE) or is_conv1d(m)


class MaskDict(dict):
    """Name -> boolean mask, as a dict; masks of layers that store only their kept weights (``packed``) are held
    at one bit per weight and unpacked when read. Those layers compute from their own lists of kept weights,
    so their mask is read only when it changes, for accounting and for checkpoints. Save masks through
    :meth:`MaskSet.state_dict` (plain tensors), not this object."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.packed: dict[str, tuple[torch.Size, torch.device]] = {}

    def pack(self, name: str) -> None:
        """Hold ``name``'s mask (now and when set again) at one bit per weight."""
        mask = super().__getitem__(name)
        self.packed[name] = (mask.shape, mask.device)
        super().__setitem__(name, _packbits(mask))

    def __getitem__(self, name: str) -> torch.Tensor:
        value = super().__getitem__(name)
        if name in self.packed:
            shape, device = self.packed[name]
            return _unpackbits(value, shape).to(device)
        return value

    def __setitem__(self, name: str, mask: torch.Tensor) -> None:
        if name in self.packed:
            self.packed[name] = (mask.shape, mask.device)
            mask = _packbits(mask)
        super().__setitem__(name, mask)

    def __iter__(self):
        # defined here so that dict(masks) and {**masks} copy through __getitem__ (unpacked), not the raw values
        return super().__iter__()

    def get(self, name, default=None):
        return self[name] if name in self else default

    def values(self):
        return [self[n] for n in self]

    def items(self):
        return [(n, self[n]) for n in self]


def _packbits(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.detach().to("cpu", torch.bool).reshape(-1).numpy()))


def _unpackbits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    n = int(torch.Size(shape).numel())
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=n).astype(bool)).reshape(shape)


@dataclass(frozen=True)
class LayerSparsity:
    """Kept and total weights of one layer."""

    name: str
    shape: tuple[int, ...]
    numel: int
    nonzeros: int

    @property
    def density(self) -> float:
        """Kept share of the layer's weights."""
        return self.nonzeros / self.numel if self.numel else 1.0

    @property
    def sparsity(self) -> float:
        """Zero share of the layer's weights."""
        return 1.0 - self.density


def select_parameters(model: nn.Module, dense_layers: Iterable[str] = ("first", "last")) -> dict[str, nn.Parameter]:
    """Weights of Conv/Linear layers, in module order, less those named by ``dense_layers``.

    ``dense_layers`` holds fnmatch patterns of parameter names (``"fc.weight"``,
    ``"*.shortcut.*"``) and the words ``first`` and ``last`` for the first and the last
    such layer (usually the stem conv and the classifier).
    """
    found = [
        (f"{name}.weight" if name else "weight", m.weight) for name, m in model.named_modules() if _sparsifiable(m)
    ]
    if not found:
        raise ValueError("the model has no Conv/Linear layers to sparsify")
    patterns = list(dense_layers)
    skip = set()
    if "first" in patterns:
        skip.add(found[0][0])
    if "last" in patterns:
        skip.add(found[-1][0])
    globs = [p for p in patterns if p not in ("first", "last")]
    names: dict[int, list[str]] = {}  # a tensor shared by several layers (tied weights) is one parameter, masked once
    for n, p in found:
        names.setdefault(id(p), []).append(n)
    dense = lambda n: n in skip or any(fnmatch.fnmatchcase(n, g) for g in globs)  # noqa: E731
    out = {n: p for n, p in found if n == names[id(p)][0] and not any(dense(m) for m in names[id(p)])}
    if not out:
        raise ValueError(
            f"dense_layers={patterns!r} leaves no layer sparse (the model's Conv/Linear weights: "
            f"{[n for n, _ in found][:6]}{' ...' if len(found) > 6 else ''}); name fewer layers in dense_layers"
        )
    return out


# Above this many elements a tensor is masked by its own ``mul_``: the fused call first converts each boolean mask to
# the tensor's dtype (a copy four times the mask's size), which costs more than the call it saves (GPT-2's
# projections: 25 ms a step); below it, the calls cost more than the elements.
_FUSED_MAX_NUMEL = 1 << 16


def _mul_all(tensors: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    """``t.mul_(m)`` for every pair: small tensors in as few kernel launches as PyTorch allows (one per device and
    dtype group: a step of a small model with many layers pays per call, not per element), large ones each alone."""
    small = [(t, m) for t, m in zip(tensors, masks) if t.numel() <= _FUSED_MAX_NUMEL]
    for t, m in zip(tensors, masks):
        if t.numel() > _FUSED_MAX_NUMEL:
            t.mul_(m)
    if not small:
        return
    try:
        torch._foreach_mul_([t for t, _ in small], [m for _, m in small])
    except (RuntimeError, TypeError):  # mixed devices or layouts the fused call refuses: one at a time
        for t, m in small:
            t.mul_(m)


# optimizers whose update keeps an entry with zero gradient, weight and state at exactly zero (see zeros_hold)
_ZERO_PRESERVING = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


class MaskSet:
    """Boolean masks for a set of parameters, applied after every optimizer step."""

    def __init__(self, params: dict[str, nn.Parameter]):
        self.params = dict(params)
        self.masks = MaskDict(
            {n: self._layout(n, torch.ones(p.shape, dtype=torch.bool)) for n, p in self.params.items()}
        )
        self.owners: dict[str, object] = {}  # layers that store only their kept weights (see compact.py), by name
        # a step whose update reads dense gradients (RigL's) sets this: layers whose sparse paths compute only the
        # kept weights' gradient then put the full one in ``captured`` (see execution/backends.py)
        self.capture_dense_grad = False
        self.captured: dict[str, torch.Tensor] = {}
        # while capturing: per weight, a leaf of the weight's shape (one element of memory) whose gradient the swapped
        # layers' backward fills with the full weight gradient (collected into ``captured`` before the update)
        self.sinks: dict[str, torch.Tensor] = {}
        self.version = 0  # bumped on every mask change; lets caches (FLOP densities) know when to refresh
        # per weight: how many times its mask changed, and who rebuilds what it derives from the mask right then
        # (the swapped layers' kernel lists: rebuilt at the change, outside any compiled graph)
        self.changes: dict[str, int] = dict.fromkeys(self.params, 0)
        self._watchers: dict[str, Callable[[], None]] = {}
        self._zeroed: tuple[int, int] | None = None  # (version, id(optimizer)) of the last apply(optimizer)

    @classmethod
    def for_model(cls, model: nn.Module, dense_layers: Iterable[str] = ("first", "last")) -> "MaskSet":
        return cls(select_parameters(model, dense_layers))

    # ----------------------------------------------------------------- masks
    def _layout(self, name: str, mask: torch.Tensor) -> torch.Tensor:
        """``mask`` laid out like parameter ``name``: a boolean tensor on its device or, for a sharded parameter, a
        DTensor holding this rank's rows (``mask`` may be whole, as every rank computes it alike, or sharded)."""
        p = self.params[name]
        part = Part.of(p)
        if part is None:
            return whole(mask).to(device=p.device, dtype=torch.bool)
        rows = local(mask) if Part.of(mask) is not None else part.rows_of(mask)
        return part.wrap(rows.to(device=local(p).device, dtype=torch.bool))

    def set_mask(self, name: str, mask: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Install ``mask`` for ``name``, zero the newly masked weights and, given the optimizer,
        reset their optimizer state (so regrown weights start with no stale momentum)."""
        if name in self.owners:  # stored compactly: the layer re-lays its kept weights (grown ones start at zero)
            if mask.shape != self.masks[name].shape:
                raise ValueError(
                    f"mask for {name} has shape {tuple(mask.shape)}, the weight {tuple(self.masks[name].shape)}"
                )
            self.masks[name] = mask.to(device=self.masks[name].device, dtype=torch.bool)
            self.owners[name].remask(self.masks[name], optimizer)
            self._changed(name)
            return
        p = self.params[name]
        if mask.shape != p.shape:
            raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, the parameter {tuple(p.shape)}")
        old = local(self.masks[name])
        self.masks[name] = self._layout(name, mask)
        new = local(self.masks[name])
        with torch.no_grad():
            local(p).mul_(new)
        if optimizer is not None:
            changed = old ^ new
            for v in optimizer.state.get(p, {}).values():
                if torch.is_tensor(v) and v.shape == p.shape:
                    local(v).masked_fill_(changed, 0)
        self._changed(name)

    def watch(self, name: str, rebuild: Callable[[], None]) -> None:
        """Call ``rebuild`` whenever the mask of ``name`` changes (one watcher per weight: its swapped layer)."""
        self._watchers[name] = rebuild

    def _changed(self, name: str) -> None:
        """Count a change of this mask and let its watcher rebuild."""
        self.version += 1
        self._renew(name)

    def _renew(self, *names: str) -> None:
        """Masks replaced (every one when none is named): their change counts move on and watchers rebuild."""
        for n in names or tuple(self.masks):
            self.changes[n] = self.changes.get(n, 0) + 1
            if n in self._watchers:
                self._watchers[n]()

    def rebind(self, model: nn.Module) -> None:
        """Follow ``model``'s parameters after they were replaced by ones of the same names and shapes (FSDP2's
        ``fully_shard`` replaces each by a sharded one): masks take the new parameters' layout."""
        named = dict(model.named_parameters())
        missing = sorted(set(self.params) - set(named))
        if missing:
            raise ValueError(f"the model no longer has the masked parameters {missing[:5]}")
        for n in self.params:
            self.params[n] = named[n]
            self.masks[n] = self._layout(n, self.masks[n])
        self._renew()
        self.apply()

    def release(self, name: str, owner) -> None:
        """Hand ``name`` over to ``owner``, a layer that stores only its kept weights: the MaskSet keeps the mask
        (accounting, checkpoints, mask updates, which it passes on through ``owner.remask(mask, optimizer)``)
        but no longer holds or enforces a dense parameter."""
        self.params.pop(name)
        self.owners[name] = owner
        self.masks.pack(name)  # the owner computes from its own kept-weight lists: one bit per weight is enough here

    def weight_and_grad(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dense weight (detached) and its gradient (None before any backward), however the layer stores them."""
        if name in self.owners:
            return self.owners[name].dense_weight(), self.owners[name].dense_grad()
        p = self.params[name]
        return p.detach(), self.captured.get(name, p.grad)

    @torch.no_grad()
    def start_capture(self, on: bool) -> None:
        """Whether the next backward computes full weight gradients (``capture_dense_grad``), with a fresh sink per
        weight when it does."""
        self.capture_dense_grad = on
        self.sinks = {}
        for n, m in self.masks.items() if on else ():
            m = local(m)
            self.sinks[n] = torch.empty_strided(m.shape, (0,) * m.dim(), device=m.device).requires_grad_()

    def collect_captured(self) -> None:
        """Move the sinks' gradients (the full weight gradients of the last backward) into ``captured``."""
        for n, sink in self.sinks.items():
            if sink.grad is not None:
                self.captured[n] = sink.grad
        self.sinks = {}

    def reduce_captured(self) -> None:
        """Average the captured full gradients over data-parallel ranks, as DDP averages ``.grad``: each rank
        captured its own batch's."""
        import torch.distributed as dist

        self.collect_captured()
        if self.captured and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for grad in self.captured.values():
                dist.all_reduce(grad)
                grad.div_(dist.get_world_size())

    @torch.no_grad()
    def adopt_captured(self) -> None:
        """End a step that captured full gradients: the weights that keep a dense parameter take the full one as
        their gradient (masked next, as under masked dense, so weights grown this step get theirs), and the
        captured tensors are dropped."""
        self.collect_captured()
        for name, grad in self.captured.items():
            if name in self.params and self.params[name].grad is not None:
                self.params[name].grad.copy_(grad)
        self.captured.clear()

    @torch.no_grad()
    def apply(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero every masked weight (and the optimizer state that belongs to it)."""
        self._zeroed = (self.version, id(optimizer)) if optimizer is not None else None
        targets, masks = [], []
        for n, p in self.params.items():
            m = local(self.masks[n])
            targets.append(local(p))
            masks.append(m)
            if optimizer is not None:
                for v in optimizer.state.get(p, {}).values():
                    if torch.is_tensor(v) and v.shape == p.shape:
                        targets.append(local(v))
                        masks.append(m)
        _mul_all(targets, masks)

    def zeros_hold(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether an update of ``optimizer`` from masked gradients leaves every masked weight and its state at zero
        by itself, so that :meth:`apply` after the step would multiply zeros: true for the optimizers whose update
        of an entry with zero gradient, zero weight and zero state is zero (SGD, Adam, AdamW: weight decay and
        momentum included), once ``apply(optimizer)`` has zeroed everything under the current masks."""
        return type(optimizer) in _ZERO_PRESERVING and self._zeroed == (self.version, id(optimizer))

    def forget_zeroed(self) -> None:
        """Weights or optimizer state were written from outside (a state dict loaded): the next step zeroes every
        masked entry again (see :meth:`zeros_hold`)."""
        self._zeroed = None

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradient entries of masked weights."""
        pairs = [(local(p.grad), local(self.masks[n])) for n, p in self.params.items() if p.grad is not None]
        _mul_all([g for g, _ in pairs], [m for _, m in pairs])

    # ----------------------------------------------------------------- reporting
    def layers(self) -> list[LayerSparsity]:
        """Kept and total weights of every masked layer."""
        counts = [int(local(m).sum()) for m in self.masks.values()]
        parts = [Part.of(m) for m in self.masks.values()]
        sharded = [i for i, part in enumerate(parts) if part is not None]
        if sharded:  # one all-reduce for every sharded layer's count
            import torch.distributed as dist

            t = torch.tensor([counts[i] for i in sharded], dtype=torch.int64)
            dist.all_reduce(t, group=parts[sharded[0]].group)
            for i, c in zip(sharded, t.tolist()):
                counts[i] = c
        return [LayerSparsity(n, tuple(m.shape), m.numel(), c) for (n, m), c in zip(self.masks.items(), counts)]

    def densities(self) -> dict[str, float]:
        """Kept share of each masked weight, by name."""
        return {ls.name: ls.density for ls in self.layers()}

    # ----------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """The masks and their version (for checkpoints)."""
        return {"masks": {n: m.clone() for n, m in self.masks.items()}, "version": self.version}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` and apply the masks."""
        missing = set(self.masks) ^ set(state["masks"])
        if missing:
            raise ValueError(f"checkpoint masks do not match the model's sparse parameters: {sorted(missing)[:5]}")
        shapes = {n: (tuple(whole(m).shape), tuple(whole(self.masks[n]).shape)) for n, m in state["masks"].items()}
        wrong = {n: s for n, s in shapes.items() if s[0] != s[1]}
        if wrong:
            n, (saved, now) = next(iter(wrong.items()))
            raise ValueError(
                f"checkpoint masks have other shapes than the model's weights ({len(wrong)} layer(s); "
                f"{n}: {saved} saved, {now} here): the state is from another model or width"
            )
        for n, m in state["masks"].items():
            if n in self.params:
                self.masks[n] = self._layout(n, m)
                continue
            m = m.to(device=self.masks[n].device, dtype=torch.bool)
            if not torch.equal(m, self.masks[n]):
                self.owners[n].remask(m, None)  # before the weights and optimizer state load into the new layout
            self.masks[n] = m
        self.version = int(state["version"])
        self._renew()
        self.apply()

    def broadcast(self, src: int = 0, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Make every data-parallel rank hold rank ``src``'s masks."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for n in self.masks:
                if Part.of(self.masks[n]) is not None:
                    continue  # each rank holds its own rows, chosen exactly (see sparsetrain.core.sharding)
                buf = self.masks[n].to(torch.uint8)
                dist.broadcast(buf, src)
                if n in self.owners and not torch.equal(buf.bool(), self.masks[n]):
                    self.owners[n].remask(buf.bool(), optimizer)
                self.masks[n] = buf.bool()
            self._renew()
            self.apply(optimizer)


def random_masks(maskset: MaskSet, sparsity: float, generator: torch.Generator) -> None:
    """Give every selected layer a uniformly random mask with exactly round((1 - s) * numel) kept weights."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    for n, p in maskset.params.items():
        keep = round((1.0 - sparsity) * p.numel())
        flat = torch.zeros(p.numel(), dtype=torch.bool)
        flat[torch.randperm(p.numel(), generator=generator)[:keep]] = True
        maskset.set_mask(n, flat.view(p.shape))
