"""The inference form of a trained sparse model: every sparse layer on forward-only kernels, chosen per layer by
timing the forward alone on the input shape it will serve (then the whole forward), BatchNorm folded into the
convolution before it, pruned channels taken out, and no autograd state.

    served = st.for_inference(sp, MyNet(), example_inputs=torch.randn(1, 3, 32, 32))  # a sparsifier + a fresh model,
    served = st.for_inference(plain_model, example_inputs=x)                         # a removed or loaded model,
    served = st.for_inference("model.sparse.safetensors", MyNet(), example_inputs=x)  # or a sparse checkpoint
    y = served(x)

2 x 2 max-pools run on the project's pooling kernel, other max-pools as the maximum of strided slices. The weights
that are sparse are the ones at least half zeros (a sparsifier's masked weights are, from its first step); their
zeros are the mask. The source is never changed: the inference form works on a copy.
"""

from __future__ import annotations

import copy
import os
import warnings

import torch
import torch.nn as nn
from torch.nn.modules.utils import _pair

from ..core.masks import MaskSet
from ..execution.activations import compact_pools
from ..execution.backends import BACKENDS, apply_backend, get_backend
from ..execution.backends.compact import compact_layers

__all__ = ["for_inference", "InferenceModel", "fold_batchnorm", "slim_channels"]


class InferenceModel(nn.Module):
    """A trained model in its inference form (made by :func:`for_inference`): calls run under
    ``torch.inference_mode`` (no autograd state), in eval mode. ``plan`` names each sparse layer's path;
    ``model`` is the module inside, whose sparse layers the kernels run (``torch.export`` takes it whole)."""

    def __init__(self, model: nn.Module, maskset: MaskSet, layers: dict[str, nn.Module]):
        super().__init__()
        self.model = model
        self.maskset = maskset  # the layers read their structures from it; kept alive with the model
        self.layers = layers

    @property
    def plan(self) -> dict[str, str]:
        """Each sparse weight's path, by name (``masked``: the dense product was the faster there)."""
        return {n: m.backend for n, m in self.layers.items()}

    def forward(self, *args, **kwargs):
        with torch.inference_mode():
            return self.model(*args, **kwargs)

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError(
                "an inference form does not train (its layers keep no gradients); train the model it came from"
            )
        return super().train(False)


class _SlicedMaxPool2d(nn.Module):
    """An ``nn.MaxPool2d`` (no dilation, no ceil mode, no indices) as the maximum of its window's strided slices of
    the input padded with -inf: the same values (NaNs propagate alike), several times faster than PyTorch's CPU pool
    with indices at inference (ResNet-50's 3 x 3 stride-2 pool at batch 1: 3.2 ms of a 33 ms forward)."""

    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        self.kernel, self.padding = _pair(pool.kernel_size), _pair(pool.padding)
        self.stride = _pair(pool.stride or pool.kernel_size)

    @staticmethod
    def takes(m: nn.Module) -> bool:
        return type(m) is nn.MaxPool2d and _pair(m.dilation) == (1, 1) and not m.ceil_mode and not m.return_indices

    def forward(self, x):
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        if x.dim() != 4:
            return torch.nn.functional.max_pool2d(x, self.kernel, self.stride, self.padding)
        padded = torch.nn.functional.pad(x, (pw, pw, ph, ph), value=float("-inf")) if ph or pw else x
        ho, wo = (padded.shape[2] - kh) // sh + 1, (padded.shape[3] - kw) // sw + 1
        rows = None  # separable: the maximum along each window's width, then along its height
        for j in range(kw):
            part = padded[:, :, :, j : j + sw * (wo - 1) + 1 : sw]
            rows = part.contiguous() if rows is None else torch.maximum(rows, part, out=rows)
        out = None
        for i in range(kh):
            part = rows[:, :, i : i + sh * (ho - 1) + 1 : sh]
            out = part.contiguous() if out is None else torch.maximum(out, part, out=out)
        return out


def _other_pools(model: nn.Module) -> int:
    """Every max-pool :func:`compact_pools` left (other windows and strides) as :class:`_SlicedMaxPool2d`."""
    targets = [(p, n, c) for p in model.modules() for n, c in p.named_children() if _SlicedMaxPool2d.takes(c)]
    for parent, name, child in targets:
        setattr(parent, name, _SlicedMaxPool2d(child))
    return len(targets)


def _plain_copy(source, model: nn.Module | None) -> nn.Module:
    """A plain copy of ``source``'s model (a sparsifier's exported weights, a module, or a sparse checkpoint)."""
    from .artifact import load_sparse

    if isinstance(source, (str, os.PathLike)):
        if model is None:
            raise TypeError(
                "for_inference of a sparse checkpoint needs the model to load it into: "
                "for_inference(path, MyNet(), example_inputs=...)"
            )
        return load_sparse(source, copy.deepcopy(model))
    if hasattr(source, "maskset") and hasattr(source, "export_state"):  # a sparsifier
        if model is None:
            raise TypeError(
                "for_inference of a sparsifier needs a fresh model of the same architecture to hold its weights "
                "(the sparsifier's own model keeps training): for_inference(sp, MyNet(), example_inputs=...)"
            )
        plain = copy.deepcopy(model)
        plain.load_state_dict(source.export_state())
        return plain
    if isinstance(source, nn.Module):
        if any(hasattr(m, "maskset") for m in source.modules()):
            raise TypeError(
                "this model still carries a sparsifier's layers: pass the sparsifier (with a fresh model), or the "
                "model sp.remove() returns"
            )
        return copy.deepcopy(source)
    raise TypeError(
        f"for_inference takes a sparsifier, an nn.Module or a sparse checkpoint's path, got {type(source).__name__}"
    )


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` (in eval mode) with every BatchNorm that directly follows a convolution (or a Linear) folded into it, through
    ``torch.fx``'s own fusion pass (zeros stay zeros: folding scales each output channel); a model that ``torch.fx``
    cannot trace is returned as it is, with a warning naming why."""
    from torch.fx.experimental.optimization import fuse

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model  # nothing to fold (and the model keeps its class, and methods such as generate)
    try:
        return fuse(model.eval())
    except Exception as e:  # torch.fx traces only control flow that does not depend on values
        warnings.warn(
            f"BatchNorm not folded: torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else e})",
            RuntimeWarning,
            stacklevel=3,
        )
        return model


def _replace(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


@torch.no_grad()
def _slimmed_pair(conv: nn.Conv2d, consumer: nn.Module, kept: torch.Tensor) -> tuple[nn.Module, nn.Module] | None:
    """``conv`` with only the filters ``kept`` and ``consumer`` reading only those channels, or None when the
    consumer is not a plain Conv2d or a Linear over the flattened channels."""
    if type(consumer) is nn.Conv2d and consumer.groups == 1 and consumer.in_channels == conv.out_channels:
        cols = kept
    elif type(consumer) is nn.Linear and consumer.in_features % conv.out_channels == 0:
        per = consumer.in_features // conv.out_channels  # features a channel, after flattening
        cols = (kept[:, None] * per + torch.arange(per)).reshape(-1)
    else:
        return None
    small = nn.Conv2d(conv.in_channels, len(kept), conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                      bias=conv.bias is not None, padding_mode=conv.padding_mode)  # fmt: skip
    small.weight.copy_(conv.weight[kept])
    if conv.bias is not None:
        small.bias.copy_(conv.bias[kept])
    if isinstance(consumer, nn.Conv2d):
        reader = nn.Conv2d(len(kept), consumer.out_channels, consumer.kernel_size, consumer.stride, consumer.padding,
                           consumer.dilation, bias=consumer.bias is not None, padding_mode=consumer.padding_mode)  # fmt: skip
    else:
        reader = nn.Linear(len(cols), consumer.out_features, bias=consumer.bias is not None)
    reader.weight.copy_(consumer.weight[:, cols])
    if consumer.bias is not None:
        reader.bias.copy_(consumer.bias)
    return small.eval(), reader.eval()


def slim_channels(model: nn.Module) -> nn.Module:
    """``model`` (in eval mode, BatchNorm folded: :func:`fold_batchnorm`) with its pruned channels taken out: every
    convolution whose removed filters are all zeros (weights and bias) and whose output reaches one Conv2d or Linear
    through channel-wise steps (ReLU, pooling, flattening) is made smaller, and so is the layer reading it. The
    same outputs, from layers physically smaller, so any runtime gains (ONNX included). A model ``torch.fx`` cannot
    trace is returned as it is."""
    from ..execution.backends.channel_pairs import passes_channels

    try:
        gm = model if isinstance(model, torch.fx.GraphModule) else torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - value-dependent control flow: nothing to slim that we can see
        return model
    for node in list(gm.graph.nodes):
        modules = dict(gm.named_modules())
        conv = modules.get(node.target) if node.op == "call_module" else None
        if type(conv) is not nn.Conv2d or conv.groups != 1 or len(node.users) != 1:
            continue
        alive = (conv.weight.flatten(1) != 0).any(1)
        if conv.bias is not None:
            alive |= conv.bias != 0
        if bool(alive.all()) or not bool(alive.any()):
            continue
        cur = next(iter(node.users))
        while passes_channels(cur, modules) and len(cur.users) == 1:
            cur = next(iter(cur.users))
        pair = _slimmed_pair(conv, modules[cur.target], alive.nonzero().squeeze(1)) if cur.op == "call_module" else None
        if pair is not None:
            _replace(gm, node.target, pair[0])
            _replace(gm, cur.target, pair[1])
    gm.recompile()
    return gm


def _sparse_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights of Conv2d, Linear and Conv1D layers that are at least half zeros."""
    kinds = (nn.Linear, nn.Conv2d)
    found = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, nn.Parameter) or w.dim() < 2:
            continue
        if isinstance(m, kinds) or type(m).__name__ == "Conv1D":
            if int((w != 0).sum()) * 2 <= w.numel():
                found[f"{name}.weight" if name else "weight"] = w
    return found


def for_inference(
    source,
    model: nn.Module | None = None,
    *,
    execution: str = "auto",
    example_inputs=None,
    fold_bn: bool = True,
) -> InferenceModel:
    """The inference form of ``source`` (a sparsifier with a fresh ``model`` of its architecture, a plain model such
    as ``sp.remove()``'s, or a sparse checkpoint's path with the ``model`` to load it into).

    ``execution``: ``"auto"`` times each sparse layer's forward paths on ``example_inputs`` (a tensor or a tuple of
    them, at the batch size that will be served: batch 1 and batch 64 may choose differently) and keeps the fastest,
    the dense product included; or one backend's name for every sparse layer. ``fold_bn``: BatchNorm folded into the
    convolution before it, and pruned channels taken out (:func:`slim_channels`), where ``torch.fx`` traces the
    model. The result's ``plan`` names each layer's path."""
    chosen = get_backend(execution)  # refuses an unknown name, listing the backends
    if chosen.timed and example_inputs is None:  # (auto: chooses by timing)
        raise TypeError(
            "execution='auto' chooses each layer's path by timing it: give example_inputs= (a batch of the shape "
            "that will be served), or name a backend"
        )
    plain = _plain_copy(source, model).eval()
    if fold_bn:
        plain = slim_channels(fold_batchnorm(plain))  # pruned channels taken out: smaller dense layers
    plain.requires_grad_(False)
    weights = _sparse_weights(plain)
    maskset = MaskSet(weights)
    for name, w in weights.items():
        maskset.masks[name] = maskset._layout(name, w != 0)
    layers = apply_backend(plain, maskset, chosen.name)
    served = InferenceModel(plain, maskset, layers).eval()
    compact_pools(plain)  # 2 x 2 max-pools on the native kernel (forward only here)
    _other_pools(plain)
    if chosen.timed:  # auto; a named backend is the user's choice, kept
        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        _choose_whole(plain, layers, inputs)
    compact_layers(layers, maskset, None)  # the kernels' layers keep their kept values alone: no gather a call
    plain.requires_grad_(False)
    return served


def _choose_whole(model: nn.Module, layers: dict[str, nn.Module], inputs: tuple) -> None:
    """Each undecided layer times its forward paths on ``inputs`` (alone, the minimum of five); then the whole
    forward is timed with those choices, with every layer on the fastest of its kernels, and with every layer
    dense, and the fastest of the three is kept. Per-layer timings miss what lies between layers (threads handed
    between PyTorch's operations and the kernels, caches): at batch 1 on VGG-16 one layer left dense by its own
    timing made the whole forward 1.7x slower."""
    import time

    for m in layers.values():
        m.choose_for_inference = True
    with torch.no_grad():
        model(*inputs)
    for m in layers.values():
        m.choose_for_inference = False
    timings = {n: getattr(m, "timings", {}) for n, m in layers.items()}
    chosen = {n: m.backend for n, m in layers.items()}
    dense = next(n for n, b in BACKENDS.items() if not b.swaps_layers and not b.timed)  # the masked dense path
    fastest_kernel = {
        n: min((k for k in t if BACKENDS[k].swaps_layers), key=t.get, default=None) for n, t in timings.items()
    }
    kernels = {n: k or chosen[n] for n, k in fastest_kernel.items()}
    plans = [chosen, kernels, {n: dense for n in layers}]
    best, best_time = chosen, float("inf")
    with torch.no_grad():
        for plan in plans:
            for n, m in layers.items():
                m.fix_backend(plan[n])
            model(*inputs)  # warm
            took = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                model(*inputs)
                took = min(took, time.perf_counter() - t)
            if took < best_time:
                best, best_time = plan, took
    for n, m in layers.items():
        m.fix_backend(best[n])
