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
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ..execution.activations import BitReLU, replace_activations
from ..methods.base import Clock, Sparsifier, check_fraction

__all__ = [
    "GhostSoftActivation",
    "GhostSkips",
    "ToST",
    "tost",
    "rescale_fan_in",
    "gradinit_scales",
    "find_conv_pairs",
    "SOFT",
    "RESCALES",
]

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
        probe = [
            c.register_forward_hook(lambda mod, args, out: shapes.__setitem__(id(mod), (args[0].shape, out.shape)))
            for pair in pairs
            for c in pair
        ]
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
            skip = nn.Sequential(
                nn.Conv2d(in_shape[1], out_shape[1], 1, stride, bias=False), nn.BatchNorm2d(out_shape[1])
            ).to(device)
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
        """The ghost skips' parameters (for their own optimizer)."""
        return self.skips.parameters()

    def remove(self) -> None:
        """Take the skips off the model for good."""
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


RESCALES = ("none", "fan_in", "gradinit")


class ToST:
    """The ToST recipe around a model, its optimizer and (optionally) the sparsifier that masks it.

    Same lifecycle as a sparsifier (it satisfies :class:`sparsetrain.core.lifecycle.Lifecycle`): its schedules advance inside
    ``optimizer.step()`` (the ghost activations blend towards ReLU and the ghost skips decay by
    the fraction of ``total_steps`` done; the ghost skips' own optimizer steps there too), and it
    has ``state_dict``/``load_state_dict`` and ``remove``. The loss part is :meth:`loss` (label
    smoothing, and soft labels from ``teacher``); use it in place of plain cross-entropy.
    """

    name = "tost"
    manual_pre_step = False  # nothing runs before the update, so the switch changes nothing

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        total_steps: int | None = None,
        steps_per_epoch: int | None = None,
        epochs: int | None = None,
        sparsifier: Sparsifier | None = None,
        ghost_soft: bool = True,
        soft_activation: str = "silu",
        soft_hold: float = 0.1,
        soft_blend_end: float = 0.2,
        ghost_skip: bool = False,
        skip_end: float = 0.2,
        rescale_init: str = "none",
        gradinit_steps: int = 50,
        label_smoothing: float = 0.1,
        teacher: nn.Module | None = None,
        teacher_weight: float = 0.5,
        teacher_temperature: float = 4.0,
        batches=None,
        input_shape: tuple[int, ...] | None = None,
        channels_last: bool = False,
    ):
        # long: each switch of the recipe is checked and applied in the order training needs them
        self.model, self.optimizer, self.sparsifier = model, optimizer, sparsifier
        self.clock = Clock.make(total_steps, steps_per_epoch, epochs)
        if ghost_soft or ghost_skip:
            self.clock.require_total("tost's ghost schedules")
        if soft_activation not in SOFT:
            raise ValueError(f"unknown soft_activation {soft_activation!r}; allowed: {list(SOFT)}")
        if rescale_init not in RESCALES:
            raise ValueError(f"unknown rescale_init {rescale_init!r}; allowed: {list(RESCALES)}")
        for name, v in (
            ("soft_hold", soft_hold),
            ("soft_blend_end", soft_blend_end),
            ("teacher_weight", teacher_weight),
        ):
            if not 0 <= v <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        if not 0 < skip_end <= 1:
            raise ValueError(f"skip_end must be in (0, 1], got {skip_end!r}")
        if soft_blend_end < soft_hold:
            raise ValueError(f"soft_blend_end ({soft_blend_end}) must not come before soft_hold ({soft_hold})")
        check_fraction("label_smoothing", label_smoothing)
        if teacher_temperature <= 0:
            raise ValueError(f"teacher_temperature must be > 0, got {teacher_temperature!r}")
        if batches is not None:
            batches = list(batches)
        if input_shape is None and batches:
            input_shape = tuple(batches[0][0].shape[1:])
        self.ghost_soft, self.soft_hold, self.soft_blend_end = ghost_soft, soft_hold, soft_blend_end
        self.ghost_skip, self.skip_end, self.rescale_init = ghost_skip, skip_end, rescale_init
        self.label_smoothing = label_smoothing
        self.teacher, self.teacher_weight, self.teacher_temperature = teacher, teacher_weight, teacher_temperature
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.ghost_acts: list[GhostSoftActivation] = []
        self.skips: GhostSkips | None = None
        self.skip_opt: torch.optim.Optimizer | None = None
        self.init_scales: dict[str, float] = {}
        # the ghost soft activations go in first, so that GradInit learns its scales on the network
        # (activations, mask, loss) that will train
        if ghost_soft:
            soft = SOFT[soft_activation]
            for kind in (nn.ReLU, BitReLU):
                replace_activations(model, kind, lambda old: GhostSoftActivation(old, soft()))
            self.ghost_acts = [m for m in model.modules() if isinstance(m, GhostSoftActivation)]
            if not self.ghost_acts:
                warnings.warn(
                    "ghost_soft found no ReLU to soften in this model (a GELU MLP, say): only the other components act",
                    RuntimeWarning,
                    stacklevel=3,
                )
        self.softened = len(self.ghost_acts)  # how many activations the ghost phase really replaced
        densities = sparsifier.weight_density() if sparsifier is not None else None
        if rescale_init == "fan_in":
            self.init_scales = rescale_fan_in(model, densities or {})
        elif rescale_init == "gradinit":
            if not batches:
                raise ValueError(
                    "rescale_init 'gradinit' learns its scales on training data: pass batches=[(x, y), ...]"
                )
            masks = sparsifier.maskset.masks if sparsifier is not None and sparsifier.maskset is not None else None
            self.init_scales = gradinit_scales(model, batches, gradinit_steps, masks=masks, criterion=self.criterion)
            params = dict(model.named_parameters())
            with torch.no_grad():
                for n, s in self.init_scales.items():
                    params[n].mul_(s)
        if ghost_skip:
            if input_shape is None:
                raise ValueError("ghost_skip sizes its shortcuts on one forward pass: pass input_shape or batches")
            group = optimizer.param_groups[0]
            device = next(model.parameters()).device
            self.skips = GhostSkips(model, tuple(input_shape), device, channels_last)
            if not len(self.skips.skips):
                raise ValueError(
                    "ghost_skip found no pair of convolutions to bridge in this model "
                    "(conv1/conv2 of a block, or consecutive convolutions of a Sequential)"
                )
            self.skip_opt = torch.optim.SGD(
                self.skips.parameters(),
                lr=group["lr"],
                momentum=group.get("momentum", 0.9),
                weight_decay=group.get("weight_decay", 0.0),
            )
        self.on_progress(0.0)
        self._hooks = [optimizer.register_step_post_hook(lambda opt, args, kwargs: self.post_step())]

    def components(self) -> list[str]:
        """Names of the components switched on (for records)."""
        return [
            n
            for n, on in (
                ("ghost-soft", self.ghost_soft and self.softened > 0),
                ("ghost-skip", self.ghost_skip),
                ("rescale-init", self.rescale_init != "none"),
                ("label-smoothing", bool(self.label_smoothing)),
                ("teacher", self.teacher is not None),
            )
            if on
        ]

    # ------------------------------------------------------------------ schedule
    def pre_step(self) -> None:
        """Nothing before the update: the recipe acts after it."""

    def model_state_keys(self) -> list[str]:
        """None: the ghosts are modules of the recipe's own, restored from :meth:`state_dict`."""
        return []

    def post_step(self) -> None:
        """After each optimizer step: the ghost skips' own step, then the schedules move on."""
        self._step_skips(self.optimizer.param_groups[0]["lr"])
        self.clock.advance()
        if self.clock.total_steps:
            self.on_progress(self.clock.step / self.clock.total_steps)

    def on_progress(self, t: float) -> None:
        """Set the ghost schedules for training fraction ``t``."""
        if self.ghost_acts:
            span = max(self.soft_blend_end - self.soft_hold, 1e-12)
            a = min(1.0, max(0.0, (t - self.soft_hold) / span))
            for g in self.ghost_acts:
                g.a = a
            if a >= 1.0:
                self.remove_soft()
        if self.skips is not None:
            self.skips.alpha = max(0.0, 1.0 - t / self.skip_end)
            if self.skips.alpha <= 0:
                self.remove_skips()

    def remove_soft(self) -> None:
        """Put the original ReLU modules back."""
        replace_activations(self.model, GhostSoftActivation, lambda g: g.original)
        self.ghost_acts = []

    def remove_skips(self) -> None:
        """Take the ghost skips off the model."""
        if self.skips is not None:
            self.skips.remove()
        self.skips, self.skip_opt = None, None

    def _step_skips(self, lr: float) -> None:
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
        """Training FLOPs the ghost skips add for ``samples`` examples (they are outside the model)."""
        return self.skips.flops_per_sample * samples if self.skips is not None else 0.0

    # ------------------------------------------------------------------ loss
    def loss(
        self, out: torch.Tensor, y: torch.Tensor, x: torch.Tensor | None = None, criterion: nn.Module | None = None
    ) -> torch.Tensor:
        """The recipe's training loss: ``criterion`` (default: cross-entropy with the recipe's label
        smoothing), blended with soft labels when a teacher is set (then ``x`` is needed)."""
        hard = (criterion or self.criterion)(out, y)
        if self.teacher is None:
            return hard
        if x is None:
            raise ValueError("tost with a teacher needs the inputs: loss(out, y, x)")
        T, beta = self.teacher_temperature, self.teacher_weight
        with torch.no_grad():
            soft_targets = F.softmax(self.teacher(x) / T, dim=1)
        kd = F.kl_div(F.log_softmax(out / T, dim=1), soft_targets, reduction="batchmean") * T * T
        return (1 - beta) * hard + beta * kd

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Clock, which ghosts are gone, and the ghost skips' weights and optimizer."""
        state: dict = {
            "method": self.name,
            "clock": self.clock.state_dict(),
            "soft_removed": not self.ghost_acts,
            "skips_removed": self.skips is None,
        }
        if self.skips is not None:
            state["skips"] = self.skips.skips.state_dict()
            state["skip_opt"] = self.skip_opt.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (before the model's state: removed ghosts change its modules)."""
        if state.get("method") != self.name:
            raise ValueError(f"this state is from {state.get('method')!r}, not the tost recipe")
        self.clock.load_state_dict(state["clock"])
        if state.get("soft_removed") and self.ghost_acts:
            self.remove_soft()
        if state.get("skips_removed"):
            self.remove_skips()
        elif self.skips is not None:
            self.skips.skips.load_state_dict(state["skips"])
            self.skip_opt.load_state_dict(state["skip_opt"])
        if self.clock.total_steps:
            self.on_progress(self.clock.step / self.clock.total_steps)

    def remove(self) -> nn.Module:
        """Hooks off, ghosts gone: the model as it trains without the recipe."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.ghost_acts:
            self.remove_soft()
        self.remove_skips()
        return self.model

    def __repr__(self) -> str:
        return f"ToST(components={self.components()}, step={self.clock.step}/{self.clock.total_steps})"


def tost(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int | None = None,
    steps_per_epoch: int | None = None,
    epochs: int | None = None,
    sparsifier: Sparsifier | None = None,
    ghost_soft: bool = True,
    soft_activation: str = "silu",
    soft_hold: float = 0.1,
    soft_blend_end: float = 0.2,
    ghost_skip: bool = False,
    skip_end: float = 0.2,
    rescale_init: str = "none",
    gradinit_steps: int = 50,
    label_smoothing: float = 0.1,
    teacher: nn.Module | None = None,
    teacher_weight: float = 0.5,
    teacher_temperature: float = 4.0,
    batches=None,
    input_shape: tuple[int, ...] | None = None,
    channels_last: bool = False,
) -> ToST:
    """The ToST recipe (Jaiswal et al., 2022) for any sparse mask: ghost soft neurons (``soft_activation``
    alone until ``soft_hold`` of training, blended back to ReLU by ``soft_blend_end``), label smoothing
    (0.1) through :meth:`ToST.loss`; off by default, since they lowered validation accuracy here:
    ghost skips (``ghost_skip``, decayed away by ``skip_end``) and rescaled initialisation
    (``rescale_init``: ``fan_in`` or ``gradinit``, which needs ``batches``). Build it after the
    ``sparsifier`` whose mask it trains (its densities and masks feed the rescaling)."""
    return ToST(
        model,
        optimizer,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        sparsifier=sparsifier,
        ghost_soft=ghost_soft,
        soft_activation=soft_activation,
        soft_hold=soft_hold,
        soft_blend_end=soft_blend_end,
        ghost_skip=ghost_skip,
        skip_end=skip_end,
        rescale_init=rescale_init,
        gradinit_steps=gradinit_steps,
        label_smoothing=label_smoothing,
        teacher=teacher,
        teacher_weight=teacher_weight,
        teacher_temperature=teacher_temperature,
        batches=batches,
        input_shape=input_shape,
        channels_last=channels_last,
    )
