"""Lossless activation memory: the same numbers, fewer bytes kept for backward, for any method (and dense).

Most of a network's training memory is what the forward pass keeps for backward, and much of that is kept only
because PyTorch's modules keep whole float tensors. :class:`LosslessActivations` cuts it with exact savings
(outputs and gradients bit-identical to plain training):

* ReLU keeps one bit per element (:class:`~sparsetrain.execution.activations.BitReLU`) instead of its float output;
* a 2x2 max-pool keeps one byte per output (:class:`~sparsetrain.execution.activations.CompactMaxPool2d`) instead
  of its input and int64 indices;
* **rerun**: the output of a sparse layer that the next operation keeps (BatchNorm's input, GELU's input, the
  attention's query, key and value) is not kept: backward recomputes it from the layer's input, which the layer
  keeps anyway for its weight gradient, with the same kernel (so the same bits). At 90-98% sparsity that forward
  costs a few percent of the dense one; a dense network cannot afford it, a sparse one can. The planner chooses it
  per layer (:attr:`~sparsetrain.execution.plan.LayerPlan.recompute`);
* likewise a dense convolution with few products per output (a network's first layer, 27 on CIFAR: about what a
  sparse layer's forward costs; :func:`~sparsetrain.execution.plan.stem_layers`): its output is not kept, and
  neither is the BatchNorm-ReLU output after it, remade through it when read
  (:attr:`~sparsetrain.execution.plan.ExecutionPlan.stems`);
* a sparse layer's input that is mostly zeros (after a ReLU, about half) is kept as a bitmask and its nonzero
  values (exactly: ``-0.0`` and NaN too), which the layer's backward and the rerun share;
* the output of a ReLU that follows a BatchNorm whose input is kept (a dense or masked layer before it) is not kept
  by the layers that read it: it is recomputed in backward from that input with the same kernels;
* likewise the outputs of LayerNorm, GELU and SiLU (which keep their inputs for their own backward): a transformer's
  projections read them, and backward recomputes them from those inputs (chains too: an MLP's GELU output from the
  recomputed output of the sparse layer before it).

All of it works through :func:`torch.autograd.graph.saved_tensors_hooks` around the model's forward pass, matching
saved tensors by their storage (a view saved by attention matches the projection's output it was split from), so it
covers every layer type and backend alike. A value recomputed in backward is computed once and shared by the saved
views that read it, then dropped.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.accounting import observe_saved
from . import native
from .activations import BitReLU, compact_pools, replace_activations

__all__ = ["LosslessActivations", "COMPRESS_MAX_SHARE"]

# a layer input is kept compressed when at most this share of it is nonzero (the bitmask costs 1/32 more; below
# three quarters the bytes saved pay for the one pass that packs and the one that unpacks)
COMPRESS_MAX_SHARE = 0.75
_COMPRESS_MIN_NUMEL = 1 << 14  # smaller inputs: the calls cost more than their bytes


class _Source:
    """A tensor's whole storage, remade in backward when a saved view of it is read. A source that is dear to remake
    (``shared``) keeps its value for the views still to read it (``readers``: the attention reads three views of one
    projection at once) and drops it after the last; a cheap one is remade for each, so that its value is not held
    through the backward of the layers in between (the first convolution's input, kept for its weight gradient,
    would otherwise live through its BatchNorm's backward, the step's peak)."""

    __slots__ = ("readers", "_value")
    shared = True

    def __init__(self):
        self.readers, self._value = 0, None

    def take(self) -> torch.Tensor:
        value = self._value if self._value is not None else self.compute()
        self.readers -= 1
        self._value = value if self.readers > 0 and self.shared else None
        return value

    def compute(self) -> torch.Tensor:  # pragma: no cover - every source defines it
        raise NotImplementedError


class _Compressed(_Source):
    """A storage of float32 values kept as the bitmask of its nonzero entries and their values."""

    __slots__ = ("bits", "values", "numel")
    shared = False  # one pass over memory to remake

    def __init__(self, bits: torch.Tensor, values: torch.Tensor, numel: int):
        super().__init__()
        self.bits, self.values, self.numel = bits, values, numel

    def compute(self) -> torch.Tensor:
        return native.decompress(self.bits, self.values, self.numel)


class _Rerun(_Source):
    """An output remade by running what made it again on its kept input: a sparse layer's kernel (``layer._run``),
    a dense layer with few products per output (``stem``: a network's first convolution; see
    :func:`~sparsetrain.execution.plan.stem_layers`), or a module that keeps its input for its own backward
    (LayerNorm, GELU, SiLU)."""

    __slots__ = ("run", "x", "stem")

    def __init__(self, run, x, stem: bool = False):
        super().__init__()
        self.run, self.x, self.stem = run, x, stem

    def compute(self) -> torch.Tensor:
        x = self.x.value() if isinstance(self.x, _View) else self.x
        # with gradients on, as in the forward pass, so that every kernel takes the path it took then; what this
        # throwaway graph saves is nobody's business (an outer measurement's hooks would count it as kept)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_as_is, _as_is):
            return self.run(x.detach()).detach()


def _as_is(t):
    return t


# modules whose backward keeps their input and whose output is a function of it alone (and of their parameters)
_REAPPLIED = (nn.LayerNorm, nn.GELU, nn.SiLU)


class _Renorm(_Source):
    """A BatchNorm-ReLU output, remade from the BatchNorm's input: a tensor (which BatchNorm keeps anyway), or a
    :class:`_View` of a stem's rerun output (remade itself for each remake: nothing of it is held in between)."""

    __slots__ = ("z", "bn")
    shared = False  # one BatchNorm and ReLU pass to remake

    def __init__(self, z, bn: nn.BatchNorm2d):
        super().__init__()
        self.z, self.bn = z, bn

    def compute(self) -> torch.Tensor:
        bn, z = self.bn, self.z.peek() if isinstance(self.z, _View) else self.z
        # the scale and shift it applied (a BatchNorm shrunk to a producer's kept channels says which: affine_for)
        weight, bias = bn.affine_for(z) if hasattr(bn, "affine_for") else (bn.weight, bn.bias)
        # training-mode statistics of the same input, without moving the running ones: the forward's exact output
        return torch.relu_(F.batch_norm(z, None, None, weight, bias, True, 0.0, bn.eps))


class _View:
    """What a saved tensor is packed as: its geometry over a :class:`_Source`'s storage. A ``reader`` counts among
    the source's readers (:meth:`value` takes the source's value); another remake's input does not (:meth:`peek`)."""

    __slots__ = ("source", "shape", "stride", "offset")

    def __init__(self, source: _Source, t: torch.Tensor, reader: bool = True):
        self.source, self.shape, self.stride, self.offset = source, tuple(t.shape), t.stride(), t.storage_offset()
        source.readers += reader

    def value(self) -> torch.Tensor:
        return self.source.take().as_strided(self.shape, self.stride, self.offset)

    def peek(self) -> torch.Tensor:
        """The value, remade unless the source holds it, leaving the readers' count alone."""
        held = self.source._value
        return (held if held is not None else self.source.compute()).as_strided(self.shape, self.stride, self.offset)


class _Record:
    """What is known, during one forward pass, of a storage: alive (a weak reference to it), unchanged since (its
    version) and what it is kept as (a :class:`_Source`, or the tensor itself)."""

    __slots__ = ("ref", "version", "kept")

    def __init__(self, t: torch.Tensor, kept=None):
        self.ref, self.version, self.kept = weakref.ref(t.untyped_storage()), t._version, kept

    def matches(self, t: torch.Tensor) -> bool:
        return self.ref() is t.untyped_storage() and self.version == t._version


def _lookup(table: dict, t: torch.Tensor) -> _Record | None:
    rec = table.get(t.untyped_storage().data_ptr())
    return rec if rec is not None and rec.matches(t) else None


def _note(table: dict, t: torch.Tensor, kept=None) -> _Record:
    """Record ``t``'s storage in ``table`` (replacing a record of memory since freed and reused), unless it is there."""
    rec = _lookup(table, t)
    if rec is None:
        rec = table[t.untyped_storage().data_ptr()] = _Record(t, kept)
    return rec


def _compressed(t: torch.Tensor) -> _Compressed | None:
    """``t``'s whole storage compressed, if it is float32 on the CPU and mostly zeros (else None)."""
    storage = t.untyped_storage()
    numel = storage.nbytes() // 4
    if t.dtype != torch.float32 or t.device.type != "cpu" or numel < _COMPRESS_MIN_NUMEL or not native.available():
        return None
    flat = torch.empty(0, dtype=torch.float32).set_(storage, 0, (numel,))
    kept = native.compress_nonzero(flat, COMPRESS_MAX_SHARE)
    return _Compressed(*kept, numel) if kept is not None else None


class LosslessActivations:
    """Apply the lossless activation savings to ``model`` (in place); :meth:`remove` undoes them.

    ReLU modules become :class:`BitReLU` (keeping ``inplace``), 2x2 max-pools :class:`CompactMaxPool2d`; the inputs
    of ``layers`` (the sparsifier's swapped layers) are kept compressed where mostly zeros; the outputs of the layers
    given to :meth:`rerun` are recomputed in backward; the outputs of ReLUs that follow BatchNorm are recomputed
    from its input where that input is kept. Works with any backend and any method (the parameters are untouched)."""

    def __init__(self, model: nn.Module, layers=()):
        self.model = model
        self.relus = replace_activations(model, nn.ReLU, lambda old: BitReLU(inplace=old.inplace))
        self.pools = compact_pools(model)
        self._reruns: set[int] = set()  # ids of the layers whose outputs are recomputed
        # id of a BatchNorm output -> a weak reference to it, its input (held weakly; a stem's rerun output as the
        # _View that remakes it; None where a sparse kernel recomputes it), and the module
        self._bn_out: dict[int, tuple] = {}
        self._inputs: dict[int, _Record] = {}  # storage -> record: the inputs of the layers, not yet saved
        self._kept: dict[int, _Record] = {}  # storage -> what a saved tensor's storage is kept as
        self._made: dict[int, _Record] = {}  # storage -> the source that remakes it (rerun, renorm)
        self._context = None
        self._hooks = [
            model.register_forward_pre_hook(self._enter),
            model.register_forward_hook(self._exit, always_call=True),
        ]
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                self._hooks.append(m.register_forward_hook(self._after_bn))
            elif isinstance(m, BitReLU):
                self._hooks.append(m.register_forward_hook(self._after_relu))
            elif type(m) in _REAPPLIED:
                self._hooks.append(m.register_forward_hook(self._after_reapplied))
        self.layers = list(layers)
        for m in self.layers:
            self._hooks += [m.register_forward_pre_hook(self._before_layer), m.register_forward_hook(self._after_layer)]

    def rerun(self, layers) -> None:
        """Recompute the outputs of ``layers`` in backward from here on (the planner's choice); the rest are kept.
        A layer that keeps less than its whole input by default (SWAT's top-K) is told to keep it whole."""
        self._reruns = {id(m) for m in layers}
        for m in self.layers:
            if hasattr(m, "keeps_input"):
                m.keeps_input = id(m) in self._reruns

    # the forward pass: note layer inputs and outputs, BatchNorm outputs, then ReLU outputs made from them
    def _enter(self, module, args):
        if module.training and torch.is_grad_enabled() and self._context is None:
            self._context = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._context.__enter__()

    def _exit(self, module, args, out):
        for table in (self._bn_out, self._inputs, self._kept, self._made):
            table.clear()
        if self._context is not None:
            context, self._context = self._context, None
            context.__exit__(None, None, None)

    def _before_layer(self, layer, args):
        x = args[0] if args else None
        if self._context is not None and torch.is_tensor(x) and x.numel():
            _note(self._inputs, x)

    def _after_layer(self, layer, args, out):
        if self._context is None or id(layer) not in self._reruns or not torch.is_tensor(out) or not layer.training:
            return
        held = _lookup(self._kept, args[0])
        if held is None:  # the layer did not keep its input (nothing to rerun from without keeping more)
            return
        # (kept as itself, perhaps as another view of the same memory: the input as the layer got it)
        x = _View(held.kept, args[0]) if isinstance(held.kept, _Source) else args[0]
        stem = not hasattr(layer, "_run")  # a dense stem reruns its own forward (its hooks left out)
        rerun = _Rerun(layer.forward if stem else layer._run, x, stem)
        self._made[out.untyped_storage().data_ptr()] = _Record(out, rerun)

    def _after_reapplied(self, module, args, out):
        x = args[0] if args else None
        if self._context is None or not torch.is_tensor(x) or not torch.is_tensor(out) or not x.requires_grad:
            return
        held = _lookup(self._made, x) or _lookup(self._kept, x)  # x itself remade or compressed: read it from there
        x = _View(held.kept, x) if held is not None and isinstance(held.kept, _Source) else x
        self._made[out.untyped_storage().data_ptr()] = _Record(out, _Rerun(module, x))

    def _after_bn(self, bn, args, out):
        if self._context is None or not bn.training or not torch.is_tensor(out) or out.dim() != 4:
            return
        z, made = args[0], _lookup(self._made, args[0])
        if made is None or not isinstance(made.kept, _Rerun):
            source = weakref.ref(z)  # kept by BatchNorm: the ReLU after it is remade from it
        elif made.kept.stem:
            source = _View(made.kept, z, reader=False)  # a stem's output: remade through the stem, on each read
        else:
            source = None  # recomputed by a sparse kernel: the ReLU output is kept (compressed, if a layer reads it)
        self._bn_out[id(out)] = (weakref.ref(out), source, bn)

    def _after_relu(self, relu, args, out):
        # the ReLU's input, if it is a BatchNorm output of this pass (by identity: an in-place ReLU returns it)
        found = self._bn_out.get(id(args[0])) if self._context is not None else None
        if found is None or found[0]() is not args[0] or found[1] is None:
            return
        z = found[1]() if isinstance(found[1], weakref.ref) else found[1]
        if z is not None:
            self._made[out.untyped_storage().data_ptr()] = _Record(out, _Renorm(z, found[2]))

    def _pack(self, t: torch.Tensor):
        if t.numel() == 0 or t.untyped_storage().data_ptr() == 0:
            return t
        rec = _lookup(self._made, t) or _lookup(self._kept, t)
        if rec is None and _lookup(self._inputs, t) is not None:
            rec = _note(self._kept, t, _compressed(t) or t)  # first saved: compressed once, shared by the next saver
            if isinstance(rec.kept, _Compressed):
                observe_saved(rec.kept.bits)
                observe_saved(rec.kept.values)
        if rec is None or not isinstance(rec.kept, _Source):
            observe_saved(t)
            return t
        if isinstance(rec.kept, _Renorm) and torch.is_tensor(rec.kept.z):
            observe_saved(rec.kept.z)  # what is really kept (BatchNorm keeps z anyway)
        _note(self._kept, t, rec.kept)  # a layer reading t finds what it is kept as
        return _View(rec.kept, t)

    @staticmethod
    def _unpack(packed):
        return packed.value() if isinstance(packed, _View) else packed

    def remove(self) -> None:
        """Hooks off; ReLUs and max-pools back to PyTorch's modules."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.rerun(())
        replace_activations(self.model, BitReLU, lambda old: nn.ReLU(inplace=old.inplace))
        compact_pools(self.model, undo=True)
