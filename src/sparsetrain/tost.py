"""ToST (Jaiswal, Ma, Chen, Ding, Wang; ICML 2022): train any sparse mask better by changing the protocol.

Four switchable components (``recipe`` section of the config; ``recipe.name: tost`` turns
on ghost soft neurons and label smoothing, with the defaults below; ghost skips and rescaled
initialisation lowered validation accuracy and stay off unless switched on):

* **ghost soft neurons**: every ReLU module becomes ``(1 - a) * soft(x) + a * relu(x)``
  with ``a`` = 0 until ``soft_hold`` of training, rising linearly to 1 at
  ``soft_blend_end``; then the original ReLU modules are put back, so the trained network
  is the plain ReLU network. Default: SiLU, pure for the first 10% of training, blended
  out by 20%. Why: a smooth activation passes gradient through units a sparse network
  would leave dead at the start, and ending the blend well before the learning rate
  decays leaves most of training to adapt to the real ReLU.
* **ghost skip connections**: a dense 1x1 conv + BN from the input of each conv pair
  (``conv1``/``conv2`` of a block, or consecutive convolutions of a plain network such
  as VGG) added to the pair's output, scaled by ``alpha`` decaying linearly from 1 to 0
  at ``skip_end`` of training, then removed. They live outside the model (their own
  optimizer, gradients averaged across ranks), so they never count towards the model's
  parameters or sparsity; their training FLOPs are counted. Off under ``tost`` unless
  switched on: at 98% sparsity their removal cost more validation accuracy than they gave.
* **rescaled initialisation**: ``fan_in`` multiplies each sparse layer by
  sqrt(1 / density), matching the dense network's activation variance; ``gradinit``
  learns one scale per weight tensor (GradInit, Zhu et al. 2021): a short optimisation
  so that one SGD step from the scaled weights lowers the loss while the gradient norm
  stays bounded; it runs after the ghost soft activations are in, on the masked step and the
  training loss, so the scales fit the network that trains. Either way each tensor changes
  by a scalar, so zeros stay zero. Behind BatchNorm a scale changes only the effective
  learning rate, which is why neither is in the default.
* **label smoothing** (default 0.1) and optional soft labels from a teacher run.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .activations import BitReLU, replace_activations
from .config import RecipeConfig

__all__ = ["GhostSoftActivation", "GhostSkips", "ToST", "rescale_fan_in", "gradinit_scales", "find_conv_pairs"]

SOFT = {"silu": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "elu": nn.ELU, "softplus": nn.Softplus}


class GhostSoftActivation(nn.Module):
    """``(1 - a) * soft(x) + a * relu(x)``; holds the original ReLU module to put back."""

    def __init__(self, original: nn.Module, soft: nn.Module):
        super().__init__()
        self.original, self.soft = original, soft
        self.a = 0.0

    def forward(self, x):
        if self.a >= 1.0:
            return self.original(x)
        if self.a <= 0.0:
            return self.soft(x)
        return (1.0 - self.a) * self.soft(x) + self.a * F.relu(x)


def find_conv_pairs(model: nn.Module) -> list[tuple[nn.Conv2d, nn.Conv2d]]:
    """Pairs of convolutions a ghost skip can bridge: ``conv1``/``conv2`` of every block that has
    both, and consecutive convolutions of a Sequential joined only by BN/activations."""
    pairs, used = [], set()
    for m in model.modules():
        c1, c2 = getattr(m, "conv1", None), getattr(m, "conv2", None)
        if isinstance(c1, nn.Conv2d) and isinstance(c2, nn.Conv2d) and c1 is not c2 and id(c1) not in used:
            pairs.append((c1, c2))
            used.update({id(c1), id(c2)})
    for m in model.modules():
        if not isinstance(m, nn.Sequential):
            continue
        pending = None
        for child in m.children():
            if isinstance(child, nn.Conv2d) and id(child) not in used:
                if pending is None:
                    pending = child
                else:
                    pairs.append((pending, child))
                    used.update({id(pending), id(child)})
                    pending = None
            elif not isinstance(child, (nn.BatchNorm2d, nn.ReLU, BitReLU, GhostSoftActivation, nn.Identity)):
                pending = None  # pooling or anything else breaks the pair
    return pairs


class GhostSkips:
    """Dense 1x1 conv + BN shortcuts around conv pairs, outside the model, scaled by ``alpha``."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], device, channels_last: bool):
        self.alpha = 1.0
        self.skips = nn.ModuleList()
        self.hooks: list = []
        self.flops_per_sample = 0.0
        pairs = find_conv_pairs(model)
        shapes: dict[int, tuple] = {}
        probe = [c.register_forward_hook(lambda mod, args, out: shapes.__setitem__(id(mod), (args[0].shape, out.shape)))
                 for pair in pairs for c in pair]
        was = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
        model.train(was)
        for h in probe:
            h.remove()
        for c1, c2 in pairs:
            (in_shape, _), (_, out_shape) = shapes[id(c1)], shapes[id(c2)]
            stride = (in_shape[2] // out_shape[2], in_shape[3] // out_shape[3])
            if stride[0] < 1 or in_shape[2] != out_shape[2] * stride[0]:
                continue
            skip = nn.Sequential(nn.Conv2d(in_shape[1], out_shape[1], 1, stride, bias=False), nn.BatchNorm2d(out_shape[1])).to(device)
            if channels_last:
                skip.to(memory_format=torch.channels_last)
            self.skips.append(skip)
            self.flops_per_sample += 3 * 2 * in_shape[1] * out_shape[1] * out_shape[2] * out_shape[3]  # fwd, dx, dW
            self._attach(c1, c2, skip)

    def _attach(self, c1: nn.Module, c2: nn.Module, skip: nn.Module) -> None:
        stash: dict[str, torch.Tensor] = {}

        def keep_input(mod, args):
            stash["x"] = args[0]

        def add_skip(mod, args, out):
            if "x" not in stash or self.alpha <= 0:
                return out
            skip.train(mod.training)  # the ghost's BN follows the model's train/eval mode
            return out + self.alpha * skip(stash.pop("x"))

        self.hooks += [c1.register_forward_pre_hook(keep_input), c2.register_forward_hook(add_skip)]

    def parameters(self):
        return self.skips.parameters()

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        self.skips = nn.ModuleList()
        self.flops_per_sample = 0.0


@torch.no_grad()
def rescale_fan_in(model: nn.Module, densities: dict[str, float]) -> dict[str, float]:
    """Multiply each sparse layer by sqrt(1 / density): the kept fan-in then carries the dense variance."""
    params = dict(model.named_parameters())
    scales = {n: 1.0 / math.sqrt(d) for n, d in densities.items() if 0 < d < 1}
    for n, s in scales.items():
        params[n].mul_(s)
    return scales


def gradinit_scales(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    steps: int = 50,
    lr: float = 0.1,
    grad_bound: float = 1.0,
    scale_lr: float = 0.01,
    min_scale: float = 0.01,
    masks: dict[str, torch.Tensor] | None = None,
    criterion: nn.Module | None = None,
) -> dict[str, float]:
    """GradInit: one scale per weight tensor, so that a step of SGD (``lr``) from the scaled weights
    lowers the loss, while the gradient's L1 norm, when it exceeds ``grad_bound``, is pushed down
    instead. Works on a copy (BN statistics stay put); returns the scales, leaving the model alone.
    ``masks`` keep the look-ahead step on the kept weights and ``criterion`` (default cross-entropy)
    is the training loss, so the scales are learnt for the sparse network and loss that will train."""
    criterion = criterion or nn.CrossEntropyLoss()
    masks = masks or {}
    net = copy.deepcopy(model).train()
    names = [n for n, p in net.named_parameters() if p.ndim > 1]
    base = {n: p.detach() for n, p in net.named_parameters()}
    log_s = {n: torch.zeros((), device=base[n].device, requires_grad=True) for n in names}
    opt = torch.optim.Adam(log_s.values(), lr=scale_lr)
    for t in range(steps):
        x, y = batches[t % len(batches)]
        scaled = {n: (base[n] * log_s[n].exp() if n in log_s else base[n]) for n in base}
        loss0 = criterion(functional_call(net, scaled, (x,)), y)
        grads = torch.autograd.grad(loss0, [scaled[n] for n in names], create_graph=True)
        gnorm = sum(g.abs().sum() for g in grads)
        if gnorm > grad_bound:
            objective = gnorm
        else:
            stepped = dict(scaled)
            for n, g in zip(names, grads):
                stepped[n] = scaled[n] - lr * (g * masks[n] if n in masks else g)
            objective = criterion(functional_call(net, stepped, (x,)), y)
        opt.zero_grad()
        objective.backward()
        opt.step()
        with torch.no_grad():
            for v in log_s.values():
                v.clamp_(min=math.log(min_scale))
    return {n: float(v.detach().exp()) for n, v in log_s.items()}


class ToST:
    """The recipe as the trainer sees it: set-up, per-step schedule, loss, extra FLOPs, state."""

    def __init__(self, cfg: RecipeConfig):
        self.cfg = cfg
        self.ghost_acts: list[GhostSoftActivation] = []
        self.skips: GhostSkips | None = None
        self.skip_opt: torch.optim.Optimizer | None = None
        self.teacher: nn.Module | None = None
        self.init_scales: dict[str, float] = {}

    def setup(self, model: nn.Module, densities: dict[str, float] | None, batches, input_shape, device, channels_last: bool,
              momentum: float, weight_decay: float, masks: dict[str, torch.Tensor] | None = None,
              criterion: nn.Module | None = None) -> None:
        """Install the switched-on components. The ghost soft activations go in first, so that
        GradInit learns its scales on the network (activations, mask, loss) that will train."""
        c = self.cfg
        if c.ghost_soft:
            soft = SOFT[c.soft_activation]
            for kind in (nn.ReLU, BitReLU):
                replace_activations(model, kind, lambda old: GhostSoftActivation(old, soft()))
            self.ghost_acts = [m for m in model.modules() if isinstance(m, GhostSoftActivation)]
        if c.rescale_init == "fan_in":
            self.init_scales = rescale_fan_in(model, densities or {})
        elif c.rescale_init == "gradinit":
            self.init_scales = gradinit_scales(model, batches(), c.gradinit_steps, masks=masks, criterion=criterion)
            params = dict(model.named_parameters())
            with torch.no_grad():
                for n, s in self.init_scales.items():
                    params[n].mul_(s)
        if c.ghost_skip:
            self.skips = GhostSkips(model, input_shape, device, channels_last)
            self.skip_opt = torch.optim.SGD(self.skips.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
        if c.teacher:
            self.teacher = load_teacher(c.teacher, device)
        self._model = model

    # ------------------------------------------------------------------ schedule
    def on_progress(self, t: float) -> None:
        """Set the ghost schedules for training fraction ``t`` (called before every step)."""
        c = self.cfg
        if self.ghost_acts:
            span = max(c.soft_blend_end - c.soft_hold, 1e-12)
            a = min(1.0, max(0.0, (t - c.soft_hold) / span))
            for g in self.ghost_acts:
                g.a = a
            if a >= 1.0:
                self.remove_soft()
        if self.skips is not None:
            self.skips.alpha = max(0.0, 1.0 - t / self.cfg.skip_end)
            if self.skips.alpha <= 0:
                self.remove_skips()

    def remove_soft(self) -> None:
        replace_activations(self._model, GhostSoftActivation, lambda g: g.original)
        self.ghost_acts = []

    def remove_skips(self) -> None:
        if self.skips is not None:
            self.skips.remove()
        self.skips, self.skip_opt = None, None

    def after_backward(self, lr: float) -> None:
        """Step the ghost skips' own optimizer (gradients averaged across ranks first)."""
        if self.skip_opt is None:
            return
        params = [p for p in self.skips.parameters() if p.grad is not None]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for p in params:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        for g in self.skip_opt.param_groups:
            g["lr"] = lr
        self.skip_opt.step()
        self.skip_opt.zero_grad(set_to_none=True)

    def extra_flops(self, samples: int) -> float:
        return self.skips.flops_per_sample * samples if self.skips is not None else 0.0

    # ------------------------------------------------------------------ loss
    def loss(self, out: torch.Tensor, y: torch.Tensor, x: torch.Tensor, criterion: nn.Module) -> torch.Tensor:
        hard = criterion(out, y)
        if self.teacher is None:
            return hard
        T, beta = self.cfg.teacher_temperature, self.cfg.teacher_weight
        with torch.no_grad():
            soft_targets = F.softmax(self.teacher(x) / T, dim=1)
        kd = F.kl_div(F.log_softmax(out / T, dim=1), soft_targets, reduction="batchmean") * T * T
        return (1 - beta) * hard + beta * kd

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        state: dict = {"soft_removed": not self.ghost_acts, "skips_removed": self.skips is None}
        if self.skips is not None:
            state["skips"] = self.skips.skips.state_dict()
            state["skip_opt"] = self.skip_opt.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("soft_removed") and self.ghost_acts:
            self.remove_soft()
        if state.get("skips_removed"):
            self.remove_skips()
        elif self.skips is not None:
            self.skips.skips.load_state_dict(state["skips"])
            self.skip_opt.load_state_dict(state["skip_opt"])


def load_teacher(run_dir: str, device) -> nn.Module:
    """A trained run's model, frozen in eval mode, for soft labels."""
    from .config import load_config
    from .data import DATASETS
    from .models import build_model
    from .train.checkpoint import load_checkpoint

    run = Path(run_dir)
    cfg = load_config(run / "config.yaml")
    model = build_model(cfg.model.name, DATASETS[cfg.data.dataset].num_classes, cfg.model.width)
    model.load_state_dict(load_checkpoint(run / "model.pt")["model"])
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
