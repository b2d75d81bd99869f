"""The swapped layers: a Conv2d or Linear that computes with the backend chosen for it.

:func:`apply_backend` swaps the masked layers of a model in place (same parameters, so optimizers and state dicts
are untouched); each layer follows the masks of a :class:`~sparsetrain.core.masks.MaskSet`, caches the sparse
structures its backend reads, and rebuilds them only when the masks change. What a layer computes is its
backend object's business (:data:`~.registry.BACKENDS`); the layer holds only the backend's name.
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn

from .. import native
from .registry import BACKENDS, get_backend, is_conv1d, kind_of

__all__ = ["SparseLinear", "SparseConv2d", "apply_backend"]


def _say_float32_once() -> None:
    """Under CPU autocast the sparse layers whose kernels have no path in autocast's dtype compute in float32:
    said once."""
    global _SAID_FLOAT32
    if not _SAID_FLOAT32:
        _SAID_FLOAT32 = True
        warnings.warn(
            "under torch.autocast the sparse layers compute in float32 (their inputs are cast; masked dense layers "
            "and Linear layers on the condensed kernels follow autocast); the rest of the model keeps the autocast "
            "dtype",
            RuntimeWarning,
            stacklevel=3,
        )


_SAID_FLOAT32 = False


class _DenseGradTap(torch.autograd.Function):
    """The layer's output passed through unchanged; its backward also gives ``sink`` (a leaf the size of the
    weight) the layer's full weight gradient, ``dense_grad(x, grad_out)``."""

    @staticmethod
    def forward(ctx, out, x, sink, dense_grad):
        ctx.save_for_backward(x)
        ctx.dense_grad = dense_grad
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return grad_out, None, ctx.dense_grad(x, grad_out), None


class _SparseExec:
    """What the swapped layers share: the MaskSet they follow, the cached structure, the chosen path."""

    def _init_exec(self, maskset, name: str, backend: str):
        self.maskset, self.mask_name = maskset, name
        self.backend = backend  # a backend's name; "auto" until the first training forward decides
        self.ran: str | None = None  # the path the last training forward took (a fallback shows here)
        self._structures: dict[str, object] = {}
        self._version_seen = -1
        self.rebuilds = 0
        self._read: set[str] = set()  # the structure kinds read since the mask last changed
        maskset.watch(name, self._rebuild)

    def _rebuild(self) -> None:
        """The mask changed: rebuild now the structures read since the last change (at the change, so that a
        compiled forward finds them made and never builds inside its graph)."""
        if not isinstance(self, _SparseExec):  # given back to its plain class (sp.remove())
            return
        kinds, self._read = self._read, set()
        for kind in kinds:
            self.structure(kind)

    def structure(self, kind: str = "csr"):
        """The structure backend ``kind``'s kernels read for the current mask (:meth:`Backend.build_structure`),
        rebuilt only when the MaskSet's masks changed. A compiled forward does not read the change count (the
        compiler would specialise on it and compile again after every mask change): the watcher
        (:meth:`_rebuild`) has already rebuilt what the forward reads when the mask changed."""
        if not torch.compiler.is_compiling() and self._version_seen != self.maskset.changes[self.mask_name]:
            self._structures.clear()
            self._version_seen = self.maskset.changes[self.mask_name]
        if kind not in self._structures:
            self._structures[kind] = BACKENDS[kind].build_structure(self._kernel_mask(), self.mask_name)
            self.rebuilds += 1
            self._read.add(kind)
        return self._structures[kind]

    def _kernel_mask(self) -> torch.Tensor:
        """The mask in the layout the kernels read (a Conv1D's is transposed)."""
        return self.maskset.masks[self.mask_name]

    def candidates(self, x: torch.Tensor) -> tuple[str, ...]:
        """The backends whose own path can run this layer on ``x`` (each backend says: :meth:`Backend.candidate`)."""
        return tuple(name for name, b in BACKENDS.items() if b.candidate(self, x))

    def _choose(self, x: torch.Tensor, backward: bool = True) -> None:
        """Time every candidate backend (forward + backward, or the forward alone) on this input; keep the fastest."""
        timings = {}
        for name in self.candidates(x):
            self.backend = name
            best = float("inf")
            for _ in range(5):  # the minimum of five: three let a noisy moment flip layers that differ by 10%
                xi = x.detach().requires_grad_(x.requires_grad and backward)
                t = time.perf_counter()
                out = self._run(xi)
                if backward:
                    out.backward(torch.ones_like(out))
                best = min(best, time.perf_counter() - t)
            timings[name] = best
        self.weight.grad = None
        if self.bias is not None:
            self.bias.grad = None
        self.timings = timings
        self.backend = min(timings, key=timings.get)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            names = list(timings)  # the same candidates on every rank: same layer, same input shape
            choice = torch.tensor([names.index(self.backend)])
            dist.broadcast(choice, 0)  # timings differ by rank; the choice must not
            self.backend = names[int(choice)]

    def fix_backend(self, backend: str) -> None:
        """Use ``backend`` from now on (a resumed run keeps the choice it made, instead of timing again)."""
        self.backend = get_backend(backend).name

    @property
    def sparse_forward(self) -> bool:
        """Whether the forward pass runs on a sparse kernel (a fraction of a dense one: backward may recompute the
        output instead of keeping it) rather than a masked dense product."""
        return BACKENDS[self.backend].swaps_layers and not BACKENDS[self.backend].timed

    @property
    def decided(self) -> bool:
        """Whether the layer runs one path (False while an ``auto`` layer has not timed its paths yet)."""
        return not BACKENDS[self.backend].timed

    choose_for_inference = False  # set by for_inference: an undecided layer times its forward paths in eval mode

    def forward(self, x):
        backend = BACKENDS[self.backend]
        if not backend.swaps_layers and not backend.timed:  # masked dense: the dense product and nothing around it
            if self.training:
                self.ran = self.backend
            return self._run(x)
        if not self.decided and self.training and torch.is_grad_enabled():
            self._choose(x)
        elif not self.decided and not self.training and self.choose_for_inference:
            self._choose(x, backward=False)
        if self.training:
            self.ran = self._path(x)
        path = BACKENDS[self._path(x)]
        if x.dtype != torch.float32 and torch.is_autocast_enabled("cpu") and path.swaps_layers:
            if not path.follows_autocast(self, x):
                _say_float32_once()
        try:
            if (
                not torch.compiler.is_compiling()  # (the compiler traces fakes; the kernels are operators it keeps)
                and torch._C._functorch.is_functorch_wrapped_tensor(x)
                and BACKENDS[self._path(x)].swaps_layers
            ):
                raise native.NoDataError(
                    "torch.func's transforms (grad, vmap, jacrev) cannot see inside the sparse kernels; run them over "
                    "execution='masked', or over the model sp.remove() returns"
                )
            out = self._run(x)
        except native.NoDataError as e:  # a transform traced the model: name the layer and what runs instead
            named = native.NoDataError(f"{self.mask_name} (backend {self.backend!r}): {e}")
            named.layer = self.mask_name
            raise named from None
        if self.training and out.requires_grad and self.maskset.capture_dense_grad and BACKENDS[self.ran].swaps_layers:
            # the sparse paths compute the kept weights' gradient only; a step whose update grows by the dense
            # gradient (RigL's) computes the full one as well, with one dense product, into the MaskSet's sink for
            # this weight (a tensor the backward accumulates into: no Python side effect, so it compiles too)
            out = _DenseGradTap.apply(out, x.detach(), self.maskset.sinks[self.mask_name], self._dense_weight_grad)
        return out

    def _path(self, x: torch.Tensor) -> str:
        """The path :meth:`_run` takes for ``x`` under the chosen backend."""
        return BACKENDS[self.backend].path(self, x)


class SparseLinear(_SparseExec, nn.Linear):
    """A Linear that computes with the backend chosen for it (made by :func:`apply_backend`)."""

    def _dense_weight_grad(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """The full weight gradient [out, in] of this layer for input ``x`` and output gradient ``grad_out``."""
        return grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1])

    def _run(self, x):
        return BACKENDS[self.backend].run_linear(self, x)


class _LinearView:
    """A Hugging Face ``Conv1D`` (``y = x @ W + b``, ``W`` of shape [in, out]) as the Linear it is: weight ``W.T``,
    structures of the transposed mask, so every backend that runs a Linear runs it unchanged."""

    def __init__(self, layer: "_Conv1DExec"):
        self.layer = layer
        self.weight = layer.weight.t()
        self.bias = layer.bias
        self.in_features, self.out_features = layer.weight.shape
        self.maskset, self.mask_name = layer.maskset, layer.mask_name

    def structure(self, kind: str = "csr"):
        return self.layer.structure(kind)


class _Conv1DExec(_SparseExec):
    """A ``transformers`` ``Conv1D`` that computes with the backend chosen for it (made by :func:`apply_backend`):
    the backends see it as a Linear with its weight transposed (:class:`_LinearView`)."""

    plain_class: type  # the Conv1D class it was made from (set per class by :func:`_conv1d_class`)

    def _kernel_mask(self) -> torch.Tensor:
        """The transposed mask ([out, in], a Linear's): the structures are those of the Linear it computes."""
        return self.maskset.masks[self.mask_name].t().contiguous()

    def _dense_weight_grad(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """The full weight gradient [in, out] of this Conv1D for input ``x`` and output gradient ``grad_out``."""
        return x.reshape(-1, x.shape[-1]).t() @ grad_out.reshape(-1, grad_out.shape[-1])

    def _run(self, x):
        return BACKENDS[self.backend].run_linear(_LinearView(self), x)

    def _path(self, x: torch.Tensor) -> str:
        return BACKENDS[self.backend].path(_LinearView(self), x)


_CONV1D_CLASSES: dict[type, type] = {}


def _conv1d_class(plain: type) -> type:
    """The swapped class of a ``Conv1D`` class (made once per class, so ``isinstance`` and pickling see one)."""
    if plain not in _CONV1D_CLASSES:
        _CONV1D_CLASSES[plain] = type("SparseConv1D", (_Conv1DExec, plain), {"plain_class": plain})
    return _CONV1D_CLASSES[plain]


class SparseConv2d(_SparseExec, nn.Conv2d):
    """A Conv2d that computes with the backend chosen for it (made by :func:`apply_backend`)."""

    def _dense_weight_grad(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """The full weight gradient of this (ungrouped) convolution for input ``x`` and output gradient ``grad_out``."""
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        return torch.nn.grad.conv2d_weight(x, shape, grad_out, self.stride, self.padding, self.dilation, self.groups)

    def _run(self, x):
        return BACKENDS[self.backend].run_conv(self, x)


def apply_backend(model: nn.Module, maskset, backend: str) -> dict[str, nn.Module]:
    """Swap the masked layers of ``model`` to compute with ``backend``; returns them by weight name.

    Grouped convolutions, non-zero padding modes and layer types the backend does not declare stay masked dense.
    Layers read their masks from the MaskSet and rebuild their structures when its ``version`` moves.
    """
    chosen = get_backend(backend)
    modules = dict(model.named_modules())
    swapped = {}
    for wname, mask in maskset.masks.items():
        m = modules[wname.rsplit(".", 1)[0] if "." in wname else ""]
        conv1d = is_conv1d(m) and not isinstance(m, _SparseExec)
        if type(m) not in (nn.Linear, nn.Conv2d) and not conv1d:
            continue
        runs = issubclass(kind_of(m), chosen.layer_types)
        if runs:
            chosen.prepare(mask.t() if conv1d else mask, wname, mask.device)
        if conv1d:
            m.__class__ = _conv1d_class(type(m))
        elif type(m) is nn.Linear:
            m.__class__ = SparseLinear
        else:
            m.__class__ = SparseConv2d
            runs = runs and m.padding_mode == "zeros" and not isinstance(m.padding, str) and m.groups == 1
        on = (chosen.conv_backend if isinstance(m, nn.Conv2d) else None) or chosen.name
        m._init_exec(maskset, wname, on if runs else "masked")
        swapped[wname] = m
    return swapped
