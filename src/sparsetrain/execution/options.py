"""How a method's layers run, as one value: :class:`ExecutionOptions`.

Every factory, :meth:`~sparsetrain.methods.base.Sparsifier.use_execution`, both framework callbacks and the
configuration's ``sparsity`` section take the same options; the plan carries them (a resumed run is refused when
they differ) and the backends judge them. Each option is declared once, here: the factories' keyword arguments, their
documentation and the configuration's keys are made from these fields.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

__all__ = ["ExecutionOptions", "OPTION_NAMES", "option_fields"]


def _is_tensor(value: Any) -> bool:
    import torch  # (imported here: the options load with the configuration, before torch is needed)

    return isinstance(value, torch.Tensor)


def _option(default, doc: str, *, config_key: str | None = "", compared: bool = True, kind: str | None = None):
    """A declared option: its default, its one-sentence doc, the configuration key that sets it (``""``: its own
    name; None: not in the configuration), whether a saved plan must agree with it to be resumed, and the type
    signatures show (default: the annotation)."""
    return field(default=default, metadata={"doc": doc, "config_key": config_key, "compared": compared, "kind": kind})


@dataclass(frozen=True)
class ExecutionOptions:
    """How a sparsifier's layers compute and store (see :mod:`sparsetrain.execution.plan` for what comes of it)."""

    execution: Any = _option(
        "masked",
        "``'masked'`` (a simulation at dense cost), a backend's name (``'csr'``, ``'direct'``, ``'condensed'``, "
        "``'channel'``, ``'semi_structured'``), ``'auto'`` (the fastest path per layer and the faster layout, timed "
        "on a real batch) or an ExecutionPlan saved before (nothing is timed)",
        config_key="backend",
        compared=False,  # a plan names its own execution; Planner.check compares the backend separately
        kind="str | ExecutionPlan | ExecutionOptions",
    )
    compact_state: bool = _option(
        False,
        "store only the kept weights, their gradients and optimizer state where the backend allows it",
        compared=False,  # a plan records which layers are compact; applying it compacts exactly those
    )
    channel_both_sides: bool = _option(
        False,
        "backend channel, static masks: a removed filter also leaves its BatchNorm channel and the next layer's inputs",
    )
    lossless_activations: bool = _option(
        False,
        "keep what the forward pass saves for backward in exact compact forms (ReLU bits, max-pool bytes, "
        "BatchNorm-ReLU outputs recomputed), for any method and backend",
    )
    recompute_outputs: bool = _option(
        True,
        "under lossless_activations, also recompute in backward the outputs of layers on sparse kernels (and keep "
        "their mostly-zero inputs compressed) where the plan finds it cheap; False keeps them (faster, more memory)",
    )
    example_inputs: Any = _option(
        None,
        "a tensor, or a tuple of the model's positional inputs, on which ``auto`` times its choices at once "
        "(default: the first training forward pass)",
        config_key=None,
        compared=False,
        kind="Tensor | tuple | None",
    )

    def __post_init__(self) -> None:
        given = self.example_inputs
        if given is None or _is_tensor(given):
            return
        items = tuple(given) if isinstance(given, (tuple, list)) else None
        if items is None or not any(_is_tensor(t) for t in items):
            shape = (
                " (a shape? give a batch of that shape, e.g. torch.randn(...))"
                if items and all(isinstance(v, int) for v in items)
                else ""
            )
            raise TypeError(
                f"example_inputs is {given!r}{shape}; allowed: a tensor, a tuple of the model's positional inputs "
                "(at least one a tensor), or None"
            )

    @classmethod
    def of(cls, execution: Any = "masked", **options) -> "ExecutionOptions":
        """Options from ``execution`` (an :class:`ExecutionOptions`, a backend's name, ``'auto'`` or a plan) and
        keyword options, which override those of a given :class:`ExecutionOptions`."""
        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(f"unknown execution option(s) {unknown}; allowed: {list(OPTION_NAMES)}")
        if isinstance(execution, ExecutionOptions):
            return replace(execution, **options)
        return cls(execution=execution, **options)

    @property
    def requested(self) -> Any:
        """The execution asked for: a backend's name (or ``'auto'``), from a plan when one was given."""
        return getattr(self.execution, "requested", self.execution)

    def differences(self, other: "ExecutionOptions") -> list[tuple[str, Any, Any]]:
        """``(name, mine, theirs)`` for each compared option that differs (what a saved plan and the sparsifier
        that resumes it must share)."""
        return [
            (f.name, getattr(self, f.name), getattr(other, f.name))
            for f in fields(self)
            if f.metadata["compared"] and getattr(self, f.name) != getattr(other, f.name)
        ]

    def to_dict(self) -> dict:
        """The compared options as plain data (plans store them)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["compared"]}


def option_fields():
    """The declared options (dataclass fields; ``metadata`` holds ``doc``, ``config_key`` and ``compared``)."""
    return fields(ExecutionOptions)


OPTION_NAMES = tuple(f.name for f in fields(ExecutionOptions))
assert all(f.default is not MISSING for f in fields(ExecutionOptions))  # every option has its default
