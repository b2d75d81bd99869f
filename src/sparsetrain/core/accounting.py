"""FLOP and memory accounting: what a model costs dense, and what sparse training really spends.

Convention: one multiply-accumulate (MAC) = 2 FLOPs, the convention of
``torch.utils.flop_counter``, which supplies every dense per-op count here (no
hand-written table). Counted ops are the ones that counter knows (convolutions and
matrix products); BatchNorm, activations and pooling are not counted, as in the papers.

Training FLOPs of a layer split into three parts, each scaled by the density that
really applies to it:

* forward            x weight density
* input gradient     x weight density     (zero for a layer whose input needs no gradient)
* weight gradient    x gradient density   (the weight density for masked training, where
                                           only kept weights need a gradient; the activation
                                           density for SWAT; 1 when a dense gradient is taken)
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "LayerCost",
    "CostModel",
    "FlopMeter",
    "measure_layer_costs",
    "saved_tensor_bytes",
    "saved_tensor_bytes_by_module",
    "observe_saved",
    "peak_memory_bytes",
]


@dataclass(frozen=True)
class LayerCost:
    """Dense per-sample FLOPs of one Conv/Linear layer."""

    name: str  # the parameter name of the layer's weight, e.g. "layer1.0.conv1.weight"
    kind: str
    params: int
    forward: int
    input_grad: int
    weight_grad: int


@dataclass
class CostModel:
    """Dense per-sample costs of every Conv/Linear layer of a model, and the total of all counted ops."""

    layers: list[LayerCost]
    total_forward: int  # everything the counter saw in the forward pass, per sample
    total_backward: int  # input and weight gradients of the layers, per sample

    def forward_flops(self, weight_density: dict[str, float] | None = None) -> float:
        """Per-sample inference FLOPs with the given weight densities (absent layers are dense)."""
        wd = weight_density or {}
        return self.total_forward - sum(lc.forward * (1 - wd.get(lc.name, 1.0)) for lc in self.layers)

    def training_flops(
        self, weight_density: dict[str, float] | None = None, grad_density: dict[str, float] | None = None
    ) -> dict[str, float]:
        """Per-sample training FLOPs split into forward, input_grad and weight_grad, plus their total."""
        wd, gd = weight_density or {}, grad_density or {}
        other_fwd = self.total_forward - sum(lc.forward for lc in self.layers)
        out = {"forward": float(other_fwd), "input_grad": 0.0, "weight_grad": 0.0}
        for lc in self.layers:
            d = wd.get(lc.name, 1.0)
            out["forward"] += lc.forward * d
            out["input_grad"] += lc.input_grad * d
            out["weight_grad"] += lc.weight_grad * gd.get(lc.name, d)
        out["total"] = out["forward"] + out["input_grad"] + out["weight_grad"]
        return out


def measure_layer_costs(
    model: nn.Module,
    input_shape: tuple[int, ...],
    device: str | torch.device = "cpu",
    example: torch.Tensor | None = None,
) -> CostModel:
    """Count a model's dense per-sample FLOPs with torch's flop counter, per Conv/Linear layer.

    The counter gives each layer's forward FLOPs and the whole backward pass; a layer's
    input gradient costs its forward FLOPs when its input needs a gradient (not for the
    first layer), and its weight gradient costs its forward FLOPs. The counter's own
    backward figures are not used: it misplaces per-module backward work inside residual
    blocks, and over-counts the backward of grouped (depthwise) convolutions; for every
    model without grouped convolutions the closed form equals its backward total (tested).
    Runs forward+backward on a batch of 2 (random inputs of ``input_shape``, or ``example``: two real inputs,
    for models whose input is no float tensor, such as token ids) and leaves parameters, buffers and
    gradients as they were.
    """
    # long: most of it is the keyword signature and one hook per counted quantity
    batch = 2
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad for n, p in model.named_parameters()}
    was_training = model.training
    x = example[:batch].to(device) if example is not None else torch.randn(batch, *input_shape, device=device)
    layer_modules = {
        name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
    }
    input_needs_grad: dict[str, bool] = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, args, name=name: input_needs_grad.__setitem__(name, args[0].requires_grad)
        )
        for name, m in layer_modules.items()
    ]
    try:
        model.train()
        with FlopCounterMode(display=False) as fwd_counter:
            out = model(x)
        out.float().sum().backward()
    finally:
        for h in hooks:
            h.remove()
        model.load_state_dict(state)
        for n, p in model.named_parameters():
            p.grad = grads[n]
        model.train(was_training)
    fwd = {k: sum(v.values()) for k, v in fwd_counter.get_flop_counts().items()}
    root = type(model).__name__
    layers = []
    for name, m in layer_modules.items():
        f = fwd.get(f"{root}.{name}" if name else root, 0) // batch
        layers.append(
            LayerCost(
                f"{name}.weight" if name else "weight",
                type(m).__name__,
                m.weight.numel(),
                f,
                f if input_needs_grad.get(name, False) else 0,
                f if m.weight.requires_grad else 0,
            )
        )
    return CostModel(layers, fwd.get("Global", 0) // batch, sum(lc.input_grad + lc.weight_grad for lc in layers))


@dataclass
class FlopMeter:
    """Accumulates the training FLOPs actually spent, as densities change over training.

    Call :meth:`set_densities` whenever masks change and :meth:`step` once per
    training step with the number of samples it processed.
    """

    costs: CostModel
    spent: dict[str, float] = field(
        default_factory=lambda: {"forward": 0.0, "input_grad": 0.0, "weight_grad": 0.0, "total": 0.0}
    )
    samples: int = 0
    _per_sample: dict[str, float] | None = None

    def set_densities(
        self, weight_density: dict[str, float] | None, grad_density: dict[str, float] | None = None
    ) -> None:
        """Use these weight and gradient densities for the steps that follow."""
        self._per_sample = self.costs.training_flops(weight_density, grad_density)

    def step(self, samples: int, extra_flops: float = 0.0) -> None:
        """Add one step of ``samples`` examples; ``extra_flops`` is method work outside the layers (e.g. a dense gradient)."""
        if self._per_sample is None:
            self.set_densities(None)
        for k, v in self._per_sample.items():
            self.spent[k] += v * samples
        self.spent["total"] += extra_flops
        self.samples += samples

    def dense_equivalent(self, samples: int | None = None) -> float:
        """FLOPs of dense training on ``samples`` examples (default: the samples seen so far)."""
        return self.costs.training_flops()["total"] * (self.samples if samples is None else samples)

    def relative(self, reference_samples: int | None = None) -> float:
        """FLOPs spent relative to dense training on ``reference_samples`` examples — the full
        schedule's, so that training on fewer examples (data efficiency) shows as a saving —
        or, by default, on the same samples."""
        dense = self.dense_equivalent(reference_samples)
        return self.spent["total"] / dense if dense else 1.0

    def state_dict(self) -> dict:
        """FLOPs spent so far (for checkpoints)."""
        return {"spent": dict(self.spent), "samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.spent = {k: float(v) for k, v in state["spent"].items()}
        self.samples = int(state["samples"])


def _storage_bytes(t: torch.Tensor) -> tuple[tuple, int]:
    try:
        s = t.untyped_storage()
        return (s.data_ptr(), t.device.type), s.nbytes()
    except (RuntimeError, NotImplementedError):  # sparse or otherwise storage-less tensors
        return (id(t), "other"), (t._values().nbytes + t._indices().nbytes) if t.is_sparse else 0


def saved_tensor_bytes(fn, model: nn.Module | None = None) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs, each storage once.

    Uses ``torch.autograd.graph.saved_tensors_hooks``. Given ``model``, what its modules hold anyway (parameters,
    buffers, a sparse layer's index lists) is left out: it is resident anyway, so what remains is activation memory.
    """
    return saved_tensor_bytes_by_module(fn, model)["total"]


_SAVED_OBSERVERS: list = []  # the measurements of saved_tensor_bytes_by_module running now


def observe_saved(t: torch.Tensor) -> None:
    """Report a tensor kept for backward to the measurements running now. Saved-tensor hooks that change what is
    kept (the lossless activation savings) shadow an outer measurement's hooks, so they report what they keep."""
    for observe in _SAVED_OBSERVERS:
        observe(t)


def _held(obj, depth: int = 3):
    """The tensors in ``obj``: itself, or inside its lists, tuples, dicts and plain objects' attributes (a sparse
    layer's structure and its index lists), ``depth`` levels down; modules and functions are not entered."""
    if torch.is_tensor(obj):
        yield obj
    elif depth and not isinstance(obj, nn.Module) and not callable(obj):
        if isinstance(obj, (list, tuple)):
            items = obj
        elif isinstance(obj, dict):
            items = obj.values()
        else:
            slots = getattr(type(obj), "__slots__", ())
            items = [*getattr(obj, "__dict__", {}).values(), *(getattr(obj, a, None) for a in slots)]
        for v in items:
            yield from _held(v, depth - 1)


def _module_state(model: nn.Module) -> list[torch.Tensor]:
    """The tensors ``model``'s modules hold between steps: parameters, buffers, and tensors kept in their attributes
    (a sparse layer's index lists). A step that saves them for backward adds no memory for them."""
    out = [*model.parameters(), *model.buffers()]
    for m in model.modules():
        out += [t for k, v in vars(m).items() if k not in ("_parameters", "_buffers", "_modules") for t in _held(v)]
    return out


def saved_tensor_bytes_by_module(fn, model: nn.Module | None = None) -> dict[str, int]:
    """Saved-for-backward bytes, in total (each storage once) and per kind of module whose forward saved them
    (``"Conv2d"``, ``"BatchNorm2d"``, ...; ``"other"`` outside any leaf module); given ``model``, what its modules
    hold between steps (:func:`_module_state`: parameters, buffers, index lists) is left out of both and reported
    as ``"module_state"`` (parameters excepted). The per-kind figures count what each op holds, shared storages
    included, so that a layer's own input is charged to it even when the activation before it saved the same
    tensor."""
    # long: the hooks' set-up and tear-down
    state = _module_state(model) if model is not None else []  # (held here: no storage is freed and reused meanwhile)
    params = {_storage_bytes(p)[0] for p in model.parameters()} if model is not None else set()
    resident = {_storage_bytes(t)[0] for t in state}
    seen: dict[tuple, int] = {}
    held: dict[tuple, int] = {}
    by_kind: dict[str, int] = {}
    current: list[str] = []

    def pack(t: torch.Tensor):
        key, nbytes = _storage_bytes(t)
        if key in resident:
            if key not in params:
                held.setdefault(key, nbytes)
        else:
            seen.setdefault(key, nbytes)
            kind = current[-1] if current else "other"
            by_kind[kind] = by_kind.get(kind, 0) + nbytes
        return t

    hooks = []
    if model is not None:
        for m in model.modules():
            if not any(True for _ in m.children()):
                kind = (
                    "Conv2d" if isinstance(m, nn.Conv2d) else "Linear" if isinstance(m, nn.Linear) else type(m).__name__
                )
                hooks.append(m.register_forward_pre_hook(lambda mod, args, k=kind: current.append(k)))
                hooks.append(m.register_forward_hook(lambda mod, args, out: current.pop() and None))
    _SAVED_OBSERVERS.append(pack)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
    finally:
        _SAVED_OBSERVERS.remove(pack)
        for h in hooks:
            h.remove()
    return {"total": sum(seen.values()), **by_kind, **({"module_state": sum(held.values())} if held else {})}


def peak_memory_bytes(device: str | torch.device = "cpu") -> int:
    """Peak memory of this process: allocator peak on CUDA, peak resident set size on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    hwm = _proc_status_kib("VmHWM")
    if hwm is not None:  # this address space's own peak; ru_maxrss starts from the parent's peak after fork + exec
        return hwm * 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _proc_status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (Linux), or None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None
