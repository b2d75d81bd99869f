"""``auto``: per layer, whichever path is fastest, timed once on the layer's real input shape when training starts
(a layer never runs slower than masked dense because of us); then :func:`settle_layout` checks the whole step.

The sparse kernels run in NCHW and in channels-last, dense convolutions fastest in channels-last, and what lies
between layers (BatchNorm, pooling, the residual adds) follows the layout, so the per-layer choices are timed as a
whole step in both layouts against every layer masked dense in the model's own layout, and the fastest is kept;
when every layer ends masked dense the model keeps its own layout, so the step is the dense step. Data-parallel
ranks take rank 0's choices.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from .registry import BACKENDS, Backend, register

__all__ = [
    "Auto",
    "TIMING_SHARE",
    "NEAR_TIE",
    "CLOSE_CALL",
    "MASKED_UNLESS",
    "LAYOUT_TIE",
    "near_tie",
    "choose_now",
    "settle_layout",
    "keep_buffers",
    "measure_reruns",
    "gradients_dropped",
]


@register
class Auto(Backend):
    """The fastest path per layer, timed on the first training batch, and the faster layout for the whole step."""

    name = "auto"
    rank = 90
    summary = "the fastest of the paths that can run each layer, timed on a real batch; the faster layout for the step"
    compact = True
    timed = True
    own_layers = True  # SWAT's convolutions: the direct kernels where the whole step is faster
    # until a layer has chosen (evaluation before training), it runs masked dense: the base class's run methods


TIMING_SHARE = 4  # auto's timing passes run on 1/TIMING_SHARE of a batch (see settle_layout)
NEAR_TIE = 1.1  # settle_layout also tries on the kernels the layers whose kernels came within this factor
# settle_layout times the best sparse plan and every layer masked again on the whole batch when, on the part of it,
# they came within this factor of each other: on a quarter batch of small layers the kernels' per-call costs weigh
# four times as much (ResNet-20 at 95%: all masked 5-10% faster on a quarter, the kernels 10-17% on the whole)
CLOSE_CALL = 1.25
# ... and keeps every layer masked unless a sparse plan's step is at least this much faster: nearer than that the
# machine's noise decides, and a sparse plan picked by noise costs more than one missed (ResNet-20 at 80%, one layer
# on the kernels: 1.02 of dense)
MASKED_UNLESS = 1.03
# ... and the best sparse plan's two layouts when they come within this factor of each other on the part of the
# batch: kernels that run the batch innermost (NCHW below 16 x 16) fill their vectors differently on a quarter of
# it (VGG-16 SWAT-U 90%: channels-last and NCHW within 3% on a quarter, NCHW 30% slower on the whole batch, so the
# plan's layout, and the step, changed from process to process: 0.55 or 0.73 of dense)
LAYOUT_TIE = 1.1


def near_tie(layer: nn.Module, chosen: str) -> str | None:
    """The path of a backend that declares ``retry_near_ties`` (the kernels) whose own timing for ``layer`` came
    within :data:`NEAR_TIE` of its ``chosen`` path, or None: the layers :func:`settle_layout` also times on that
    path in a second plan."""
    timings = getattr(layer, "timings", {})
    for name, b in BACKENDS.items():
        if b.retry_near_ties and name != chosen and name in timings and timings[name] <= NEAR_TIE * timings[chosen]:
            return name
    return None


def keep_buffers(model: nn.Module):
    """A copy of ``model``'s buffers (BatchNorm statistics: the only state a forward and backward pass changes) and
    a function that puts them back. Parameters are not copied: timing passes never step them, and a copy of a dense
    model's weights would set the run's peak memory."""
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}

    @torch.no_grad()
    def restore() -> None:
        for n, b in model.named_buffers():
            if n in saved:
                b.copy_(saved[n])

    return restore


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None


@contextlib.contextmanager
def gradients_dropped(model: nn.Module):
    """Within it, each parameter's gradient is dropped as soon as backward has made it: ``auto``'s timing passes
    then never hold every gradient at once, which for layers still holding their dense weights (before compaction)
    is a copy of the model and set the run's peak memory. Not under torch.distributed, whose reducers read the
    gradients after they are made."""
    if dist.is_available() and dist.is_initialized():
        yield
        return
    hooks = [p.register_post_accumulate_grad_hook(_drop_grad) for p in model.parameters() if p.requires_grad]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def choose_now(model: nn.Module, loss_of) -> None:
    """Let every undecided ``auto`` layer of ``model`` time its paths now, on one forward and backward pass of
    ``loss_of()`` (before compaction, which needs the choice), leaving no gradient behind."""
    loss_of().backward()
    for p in model.parameters():
        p.grad = None


def measure_reruns(
    model: nn.Module, layers: dict[str, nn.Module], loss_of, repeats: int = 2
) -> tuple[float, dict[str, tuple[float, int]]]:
    """Time ``repeats`` training passes of ``loss_of()`` (forward and backward, every layer on its chosen path) and,
    within them, each layer's forward: what backward would pay to recompute its output. Returns the fastest whole
    pass, the budget's measure, and by layer name (its fastest forward in seconds, its output's bytes) (both read
    by :func:`~sparsetrain.execution.plan.reruns`). Gradients and BatchNorm statistics are left as they were."""
    restore = keep_buffers(model)
    costs: dict[str, tuple[float, int]] = {}
    started: dict[str, float] = {}
    hooks = []
    for name, m in layers.items():
        hooks.append(m.register_forward_pre_hook(lambda mod, args, n=name: started.__setitem__(n, time.perf_counter())))

        def done(mod, args, out, n=name):
            spent = time.perf_counter() - started[n]
            nbytes = out.untyped_storage().nbytes() if torch.is_tensor(out) else 0
            costs[n] = (min(spent, costs.get(n, (spent, 0))[0]), nbytes)

        hooks.append(m.register_forward_hook(done))
    best = float("inf")
    try:
        for _ in range(repeats):
            t = time.perf_counter()
            loss_of().backward()
            best = min(best, time.perf_counter() - t)
            for p in model.parameters():
                p.grad = None
    finally:
        for h in hooks:
            h.remove()
        restore()
    return best, costs


def settle_layout(
    model: nn.Module, layers: dict[str, nn.Module], loss_of, repeats: int = 4, whole_loss_of=None, settled=None
) -> torch.memory_format:
    """The whole-step check of ``auto``: time forward + backward (``loss_of(fmt)``: the loss of a training batch
    given in memory format ``fmt``) with every layer on the path it chooses, with the layers near a tie
    (:data:`NEAR_TIE`) on the kernels as well, each in channels-last and in NCHW (the kernels run in both; what lies
    between layers runs faster in one or the other), and with every layer masked dense in the model's own layout;
    keep the fastest (every layer masked unless a sparse plan beats it by :data:`MASKED_UNLESS`), so ``auto`` is
    never slower than its dense layers would be. Whenever every layer ends masked dense the model keeps its own
    layout, untimed: the step is then the dense step itself (a layout chosen on a quarter of a batch can lose on a
    whole one). Layers choose their paths in channels-last.
    Returns the memory format the model's inputs must take from now on (the model is converted to it).
    Parameters, their gradients and BatchNorm statistics are left as they were; data-parallel ranks take rank 0's
    choice. Callers time on a quarter of a training batch (:data:`TIMING_SHARE`): the choices come out the same,
    and the timing passes, which hold every path's activations in turn, stay below a training step's peak. Where the
    best sparse plan and every layer masked come within :data:`CLOSE_CALL` of each other, or that plan's two layouts
    within :data:`LAYOUT_TIE`, those are timed again on the whole batch (``whole_loss_of(fmt)``, when given) and that
    decides (:func:`_finalists`): those passes reach the peak of a step of the plans they time. When only the two
    layouts of one sparse plan remain, its paths are fixed and ``settled()`` (when given; the planner's compaction)
    is called first, so that those passes run on what training will hold (not under torch.distributed, whose ranks
    time apart and take rank 0's choice)."""
    restore = keep_buffers(model)
    formats = (torch.channels_last, torch.contiguous_format)
    own = _layout_of(model)

    def timed(plan: dict[str, str] | None, fmt: torch.memory_format, loss=loss_of) -> float:
        """One forward + backward with the layers on ``plan``, or (None) all masked, in memory format ``fmt``."""
        for n, m in layers.items():
            m.fix_backend(plan.get(n, m.backend) if plan is not None else "masked")
        _put_in_layout(model, fmt)
        t = time.perf_counter()
        loss(fmt).backward()
        elapsed = time.perf_counter() - t
        for p in model.parameters():  # not held into the next pass: a backward's peak is near its start
            p.grad = None
        return elapsed

    timed({}, torch.channels_last)  # warm-up; undecided layers time their paths here
    choices = {n: m.backend for n, m in layers.items()}
    plans = [choices]
    # layers whose kernels came within NEAR_TIE of their chosen path: per-layer timings on a part of a batch miss
    # what the layout around them costs, so the whole step is also timed with those on the kernels
    near = {n: path for n, m in layers.items() if (path := near_tie(m, m.backend)) is not None}
    if near:
        plans.append({**choices, **near})
    tries = [(plan, fmt) for plan in plans for fmt in formats if not _all_masked(plan)] + [(None, own)]
    # all masked alone: nothing to choose, nothing to time
    times = _timed_alternately(tries, timed, repeats) if len(tries) > 1 else [float("inf")]
    again = _finalists(tries, times) if whole_loss_of is not None else []
    if len(again) > 1:
        tries = [tries[i] for i in again]
        if settled is not None and tries[-1][0] is not None and not _distributed():
            for n, m in layers.items():  # every layer masked is out: this plan stands, in one layout or the other
                m.fix_backend(tries[0][0].get(n, m.backend))
            settled()
        times = _timed_alternately(tries, lambda plan, fmt: timed(plan, fmt, whole_loss_of), max(2, repeats // 2))
    fmt = _decide(tries, times, layers, formats)
    model.to(memory_format=fmt)
    restore()
    return fmt


def _put_in_layout(model: nn.Module, fmt: torch.memory_format) -> None:
    """``model`` in memory format ``fmt`` for a timing pass, with autocast's cached casts of the weights dropped:
    autocast keeps them while its region lasts (``auto`` plans inside a training loop's), and a cast made in the
    other layout would time that layout's products (VGG-16 under bfloat16 timed NCHW as fast as channels-last, then
    trained 1.9x slower in it)."""
    model.to(memory_format=fmt)
    torch.clear_autocast_cache()


def _decide(tries: list, times: list[float], layers: dict[str, nn.Module], formats: tuple) -> torch.memory_format:
    """Fix every layer on the fastest candidate's path (rank 0's) and return its layout; each layer keeps the
    deciding round's timings in ``step_timings`` (``masked`` None when that round left every layer masked out)."""
    masked_last = tries[-1][0] is None
    best = _fastest(times) if masked_last else min(range(len(times)), key=times.__getitem__)
    fmt, paths = _rank0s(*tries[best], sorted(layers), formats)
    for n, path in paths.items():
        layers[n].fix_backend(path)
    sparse_times = times[:-1] if masked_last else times
    for m in layers.values():
        m.step_timings = {"sparse": min(sparse_times, default=None), "masked": times[-1] if masked_last else None}
    return fmt


def _rank0s(plan: dict[str, str] | None, fmt: torch.memory_format, names: list[str], formats: tuple):
    """Rank 0's layout and per-layer paths (``plan`` None: all masked), on every rank: broadcast as values, since
    the plans tried, and their order, differ by rank (their near ties are timed per rank)."""
    pick = torch.tensor(
        [formats.index(fmt)] + [list(BACKENDS).index("masked" if plan is None else plan[n]) for n in names]
    )
    if _distributed():
        dist.broadcast(pick, 0)
    return formats[int(pick[0])], {n: list(BACKENDS)[code] for n, code in zip(names, pick[1:].tolist())}


def _distributed() -> bool:
    """Whether this process is one of several torch.distributed ranks."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _layout_of(model: nn.Module) -> torch.memory_format:
    """The memory format the model's convolution weights are in (NCHW unless the user made them channels-last)."""
    w = next((p for p in model.parameters() if p.dim() == 4), None)
    cl = w is not None and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if cl else torch.contiguous_format


def _timed_alternately(tries: list, timed, rounds: int) -> list[float]:
    """The least of ``rounds`` timings of each candidate (``timed(plan, fmt)``), taken in turn after a warm-up pass
    of the last (every layer masked), so that a slow stretch of the machine does not fall on one of them alone."""
    timed(*tries[-1])
    times = [float("inf")] * len(tries)
    for _ in range(rounds):
        for i, (plan, fmt) in enumerate(tries):
            times[i] = min(times[i], timed(plan, fmt))
    return times


def _fastest(times: list[float]) -> int:
    """The index of the fastest candidate; the last one (every layer masked) unless another is faster than it by
    :data:`MASKED_UNLESS`."""
    best = min(range(len(times)), key=times.__getitem__)
    return best if times[best] * MASKED_UNLESS < times[-1] else len(times) - 1


def _finalists(tries: list, times: list[float]) -> list[int]:
    """The candidates to time again on the whole batch (indices into ``tries``, every layer masked last when among
    them): the fastest sparse plan, its other layout when within :data:`LAYOUT_TIE` of it, and every layer masked
    when within :data:`CLOSE_CALL`. Fewer than two: the part of the batch decides."""
    sparse = min(range(len(tries) - 1), key=times.__getitem__, default=None)
    close = sparse is not None and _close(times[sparse], times[-1])
    if sparse is None or (_fastest(times) == len(tries) - 1 and not close):
        return []
    plan = tries[sparse][0]
    chosen = [i for i in range(len(tries) - 1) if tries[i][0] is plan and times[i] <= LAYOUT_TIE * times[sparse]]
    return chosen + ([len(tries) - 1] if close else [])


def _close(a: float, b: float) -> bool:
    """Whether two timings are within :data:`CLOSE_CALL` of each other."""
    return max(a, b) <= CLOSE_CALL * min(a, b)


def _all_masked(plan: dict[str, str] | None) -> bool:
    """Whether ``plan`` leaves every layer masked dense (None: the all-masked plan itself)."""
    return plan is None or all(path == "masked" for path in plan.values())
