"""A method's knobs, declared once: name, default, type, one-sentence doc, and the configuration's constraints.

Each method class lists its :class:`Knob` s (``knobs = (SPARSITY, DISTRIBUTION, ...)``); from that one list come
the factory's keyword arguments and their documentation (:func:`make_factory`), the configuration's keys under
``sparsity`` (flat) or ``sparsity.<method>`` (a knob with a ``section``), and the CLI's keys, which are the
configuration's. Knobs shared by several methods are declared here once; a method's own knobs beside its class.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from ..execution.options import ExecutionOptions, option_fields

__all__ = [
    "Knob",
    "REQUIRED",
    "make_factory",
    "with_knob_defaults",
    "SPARSITY",
    "DISTRIBUTION",
    "CUSTOM_SPARSITY",
    "SCHEME",
    "DENSE_LAYERS",
    "SEED",
    "TOTAL_STEPS",
    "STEPS_PER_EPOCH",
    "EPOCHS",
    "CLOCK",
    "MASK_KNOBS",
]


class _Required:
    """The default of a knob the caller must give."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Knob:
    """One keyword argument of a method's factory, and its configuration key.

    ``kind`` is the type (checked by the configuration; shown in signatures); ``limits`` are pydantic's numeric
    bounds (``gt``, ``ge``, ``lt``, ``le``) the configuration enforces (the constructors check their own values
    too, for callers without a configuration). ``section``: the configuration section under ``sparsity`` that
    holds it (None: the flat keys). ``factory``: an argument of the factory (False: read by the engine, as a
    lottery's rounds). ``config``: a configuration key (False: data or tensors only Python can pass). ``check``: a
    function ``check(name, value) -> value`` the configuration also runs (the constructor runs it itself).
    ``config_default``/``config_kind``: where the configuration's value differs in form (a list for a tuple;
    None for "the method's default")."""

    name: str
    default: Any
    kind: Any
    doc: str
    limits: dict = field(default_factory=dict)
    section: str | None = None
    factory: bool = True
    config: bool = True
    config_default: Any = REQUIRED  # REQUIRED: the same as ``default``
    config_kind: Any = None  # None: the same as ``kind``
    check: Any = None  # check(name, value) -> value: the configuration runs it too (MEST's phase lists)

    def but(self, **changes) -> "Knob":
        """This knob with some declarations changed (SWAT's classifier is sparse: another ``dense_layers``)."""
        return replace(self, **changes)

    @property
    def required(self) -> bool:
        """Whether a factory's caller must give it."""
        return self.default is REQUIRED

    def config_field(self) -> tuple[Any, Any]:
        """``(type, pydantic Field)`` of this knob's configuration key."""
        from pydantic import Field

        default = self.default if self.config_default is REQUIRED else self.config_default
        if isinstance(default, (list, tuple, dict)):
            value = Field(default_factory=lambda: _plain(default), description=self.doc, **self.limits)
        else:
            value = Field(default, description=self.doc, **self.limits)
        kind = self.config_kind or self.kind
        if self.check is not None:
            from typing import Annotated

            from pydantic import AfterValidator

            kind = Annotated[kind, AfterValidator(functools.partial(self.check, self.name))]
        return (kind, value)


def _plain(value):
    """``value`` with tuples as lists (YAML's and JSON's form), recursively; dicts copied."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return dict(value) if isinstance(value, dict) else value


# ---------------------------------------------------------------------- knobs several methods share
SPARSITY = Knob(
    "sparsity",
    REQUIRED,
    float,
    "share of the sparse layers' weights removed",
    {"ge": 0.0, "lt": 1.0},
    config_default=0.0,
)
DISTRIBUTION = Knob(
    "distribution", "uniform", str, "per-layer sparsity: uniform, er, erk, or custom (with custom_sparsity)"
)
CUSTOM_SPARSITY = Knob(
    "custom_sparsity",
    None,
    "dict[str, float] | None",
    "per-layer sparsity for distribution custom",
    config_default={},
    config_kind=dict[str, float],
)
SCHEME = Knob(
    "scheme",
    "unstructured",
    str,
    "removed shape: unstructured, channel_out, channel_in, kernel, pattern, block_RxC, nm_N:M, fan_in",
)
DENSE_LAYERS = Knob(
    "dense_layers",
    ("first", "last"),
    "Iterable[str]",
    "parameters left dense: 'first', 'last' (the first conv, the classifier) or fnmatch patterns of names",
    config_default=None,
    config_kind=list[str] | None,
)
SEED = Knob("seed", 0, int, "seeds the random masks and growth (the engine gives run.seed)", config=False)
TOTAL_STEPS = Knob("total_steps", None, "int | None", "optimizer steps in training", config=False)
STEPS_PER_EPOCH = Knob("steps_per_epoch", None, "int | None", "optimizer steps in an epoch", config=False)
EPOCHS = Knob("epochs", None, "int | None", "epochs in training", config=False)

CLOCK = (TOTAL_STEPS, STEPS_PER_EPOCH, EPOCHS)  # the length of training: the engine gives it
MASK_KNOBS = (SPARSITY, DISTRIBUTION, CUSTOM_SPARSITY, SCHEME, DENSE_LAYERS)  # what every mask is made from


def _annotation(kind) -> str:
    if isinstance(kind, str):
        return kind
    return kind.__name__ if isinstance(kind, type) else str(kind).replace("typing.", "")


# ---------------------------------------------------------------------- factories from the declarations
def _execution_doc() -> str:
    lines = [f"    - ``{f.name}`` (default ``{f.default!r}``): {f.metadata['doc']}" for f in option_fields()]
    return (
        "\n\n    Execution, the same for every factory (:class:`~sparsetrain.execution.options.ExecutionOptions`; "
        "``execution`` may also be one such value), the plan is ``sp.plan``, saved in ``sp.state_dict()``:\n\n"
        + "\n".join(lines)
    )


def _knobs_doc(knobs: Sequence[Knob]) -> str:
    lines = [
        f"    - ``{k.name}``{'' if k.required else f' (default ``{k.default!r}``)'}: {k.doc}"
        for k in knobs
        if k.factory
    ]
    return "\n\n    Arguments (the method's knobs):\n\n" + "\n".join(lines)


def make_factory(cls, doc: str, name: str | None = None) -> Callable:
    """The factory ``name(model, optimizer, *, <cls.knobs>, <execution options>)`` of method class ``cls``: it fills
    the knobs' defaults, builds ``cls.build(model, optimizer, **knobs)`` and runs its layers on the execution
    options (:meth:`~sparsetrain.methods.base.Sparsifier.use_execution`). Its signature and docstring come from
    the declarations, so they cannot disagree with the configuration."""
    knobs = [k for k in cls.knobs if k.factory]
    names = {k.name for k in knobs}
    options = [f.name for f in option_fields()]

    def factory(model, optimizer, **kwargs):
        unknown = sorted(set(kwargs) - names - set(options))
        if unknown:
            raise TypeError(
                f"{factory.__name__}() got unexpected keyword argument(s) {unknown}; it takes {sorted(names)}"
            )
        missing = [k.name for k in knobs if k.required and k.name not in kwargs]
        if missing:
            raise TypeError(f"{factory.__name__}() missing required keyword argument(s): {missing}")
        values = {k.name: kwargs.get(k.name, k.default) for k in knobs}
        execution = ExecutionOptions.of(**{o: kwargs[o] for o in options if o in kwargs})
        sp = cls.build(model, optimizer, **values)
        sp.use_execution(execution)
        return sp

    kw = inspect.Parameter.KEYWORD_ONLY
    ordered = [k for k in knobs if k.required] + [k for k in knobs if not k.required]
    params = [
        inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="nn.Module"),
        inspect.Parameter("optimizer", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="torch.optim.Optimizer"),
        *[
            inspect.Parameter(
                k.name, kw, annotation=_annotation(k.kind), **({} if k.required else {"default": k.default})
            )
            for k in ordered
        ],
        *[
            inspect.Parameter(f.name, kw, default=f.default, annotation=f.metadata["kind"] or _annotation(f.type))
            for f in option_fields()
        ],
    ]
    factory.__name__ = factory.__qualname__ = name or cls.name
    factory.__module__ = cls.__module__
    factory.__signature__ = inspect.Signature(params, return_annotation=cls.__name__)
    factory.__doc__ = inspect.cleandoc(doc).replace("\n", "\n    ") + _knobs_doc(ordered) + _execution_doc()
    factory.method = cls
    return factory


def with_knob_defaults(*knobs: Knob):
    """Decorator: the keyword arguments of the decorated function named like ``knobs`` default to theirs (a helper
    such as :func:`~sparsetrain.methods.static.make_masks` takes the same knobs as the factories, defaults once)."""
    defaults = {k.name: k.default for k in knobs if not k.required}

    def wrap(fn):
        sig = inspect.signature(fn)
        params = [p.replace(default=defaults[p.name]) if p.name in defaults else p for p in sig.parameters.values()]

        @functools.wraps(fn)
        def call(*args, **kwargs):
            return fn(*args, **{**{k: v for k, v in defaults.items() if k in sig.parameters}, **kwargs})

        call.__signature__ = sig.replace(parameters=params)
        return call

    return wrap
