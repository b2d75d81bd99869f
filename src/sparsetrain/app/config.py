"""One typed configuration for a training run: YAML file + ``key=value`` overrides, validated up front.

Every run directory gets the resolved config (``config.yaml``), so a run can be
repeated from its directory alone. Validation happens before any data is read or
model built; errors name the key, the bad value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from ..core.distributions import DISTRIBUTION_NAMES
from ..data.images import DATASETS
from ..execution.backends import BACKENDS, ExecutionRequest, not_supported_reasons, sharding_reasons
from ..execution.options import ExecutionOptions, option_fields
from ..methods import METHOD_CLASSES, METHODS
from ..methods.knobs import Knob
from ..methods.static import INITS
from ..models import MODELS

__all__ = ["Config", "ConfigError", "load_config", "parse_overrides", "METHODS"]


class ConfigError(ValueError):
    """A configuration value was refused; the message names key, value and what is allowed."""


def _one_of(value: str, allowed, what: str) -> str:
    """Validator body: ``value`` must name one of ``allowed`` (a registry or a tuple)."""
    if value not in allowed:
        raise ValueError(f"unknown {what}; allowed: {sorted(allowed)}")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where the data comes from and how it is fed."""

    dataset: str = "cifar10"
    data_dir: str | None = Field(None, description="file or folder holding the dataset; default: the cache directory")
    download: bool = True
    cache_dir: str | None = None
    val_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="fraction of train held out for validation (text: the tail of the file, default 0.1)",
    )
    context: int = Field(64, gt=1, description="text: characters per window (the model's context)")
    stride: int | None = Field(
        None,
        gt=0,
        description="text: characters between window starts (default: the context); "
        "the windows shift by a seeded offset every epoch",
    )
    augment: bool = True

    _known_dataset = field_validator("dataset")(classmethod(lambda cls, v: _one_of(v, DATASETS, "dataset")))


class ModelConfig(_Section):
    """Which zoo model, how wide, and in which memory layout."""

    name: str = "resnet20"
    width: float = Field(1.0, gt=0, description="channel multiplier (gpt: multiplies a width of 128)")
    channels_last: bool = True
    depth: int | None = Field(None, gt=0, description="gpt, vit: blocks (default 4 for gpt, 6 for vit)")
    heads: int | None = Field(None, gt=0, description="gpt, vit: attention heads (default 4)")

    _known_model = field_validator("name")(classmethod(lambda cls, v: _one_of(v, MODELS, "model")))


class OptimConfig(_Section):
    """The optimizer by name (SGD with momentum, or AdamW) and a per-step learning-rate schedule."""

    name: Literal["sgd", "adamw"] = "sgd"
    epochs: int = Field(15, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    no_decay_bn_bias: bool = False
    schedule: Literal["cosine", "step", "onecycle", "constant"] = "cosine"
    warmup_epochs: float = Field(0.5, ge=0)
    warmup_steps: int = Field(0, ge=0, description="warm-up in optimizer steps; overrides warmup_epochs when > 0")
    min_lr_ratio: float = Field(0.0, ge=0, lt=1, description="cosine: the learning rate decays to lr * this")
    milestones: list[float] = Field(
        default_factory=lambda: [0.5, 0.75], description="step schedule: fractions of training"
    )
    gamma: float = Field(0.1, gt=0, le=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    betas: tuple[float, float] = Field((0.9, 0.999), description="adamw: coefficients of the moment averages")
    eps: float = Field(1e-8, gt=0, description="adamw: added to the denominator")

    @model_validator(mode="after")
    def _keys_of_the_optimizer(self):
        own = {"sgd": {"momentum", "nesterov"}, "adamw": {"betas", "eps"}}
        other = own["adamw" if self.name == "sgd" else "sgd"]
        wrong = [k for k in sorted(other) if getattr(self, k) != type(self).model_fields[k].default]
        if wrong:
            raise ValueError(f"optimizer {self.name!r} does not use {', '.join('optim.' + k for k in wrong)}")
        return self


class DataEfficiencyConfig(_Section):
    """MEST data efficiency: drop the least-forgotten training examples at one epoch."""

    enabled: bool = False
    remove_epoch: int = Field(3, gt=0, description="after this many epochs of forgetting statistics")
    remove_fraction: float = Field(0.2, gt=0, lt=1, description="share of the training set removed")


def _declared() -> tuple[dict[str, Knob], dict[str, list[Knob]]]:
    """The configuration's method keys from the methods' declarations: flat knobs by name, and each section's."""
    flat: dict[str, Knob] = {}
    sections: dict[str, dict[str, Knob]] = {}
    for cls in METHOD_CLASSES.values():
        for k in cls.knobs:
            if k.config:
                (flat if k.section is None else sections.setdefault(k.section, {})).setdefault(k.name, k)
    return flat, {s: list(ks.values()) for s, ks in sections.items()}


FLAT_KNOBS, SECTION_KNOBS = _declared()
# the execution options by their configuration keys (``execution`` is ``backend`` here)
_OPTION_KEYS = {f.metadata["config_key"] or f.name: f for f in option_fields() if f.metadata["config_key"] is not None}


def _section_model(section: str):
    """``(model, Field)`` of the section ``sparsity.<section>``, from the knobs declared with that section."""
    doc = " ".join((METHOD_CLASSES[section].__doc__ or "").split("\n\n")[0].split())
    fields = {k.name: k.config_field() for k in SECTION_KNOBS[section]}
    model = create_model(f"{section.capitalize()}Config", __base__=_Section, __doc__=doc, **fields)
    return (model, Field(default_factory=model))


class _MethodChoice(_Section):
    method: str = "dense"


_MethodKeys = create_model(
    "_MethodKeys",
    __base__=_MethodChoice,
    **{name: k.config_field() for name, k in FLAT_KNOBS.items()},
    init_batches=(int, Field(1, gt=0, description="training batches scored by SNIP/GraSP")),
    **{
        key: (bool if isinstance(f.default, bool) else str, Field(f.default, description=f.metadata["doc"]))
        for key, f in _OPTION_KEYS.items()
    },
    **{section: _section_model(section) for section in SECTION_KNOBS},
)
# keys of the section that configure the engine, not the method's factory
ENGINE_KEYS = {"method", "init_batches", "data_efficiency", *_OPTION_KEYS}


class SparsityConfig(_MethodKeys):
    """Which method and its knobs: an adapter that builds ``sparsetrain.<method>(**these keys)``.

    The keys are made from what the methods declare (:mod:`sparsetrain.methods.knobs`): flat keys are knobs
    several methods share, ``sparsity.<method>`` holds a method's own, and the execution options
    (:class:`~sparsetrain.execution.options.ExecutionOptions`, ``backend`` for ``execution``) sit beside them. A
    key set to a non-default value that the chosen method does not take is refused, naming it, rather than
    silently ignored.
    """

    data_efficiency: DataEfficiencyConfig = Field(default_factory=DataEfficiencyConfig)

    _known_method = field_validator("method")(classmethod(lambda cls, v: _one_of(v, METHODS, "method")))
    _known_distribution = field_validator("distribution")(
        classmethod(lambda cls, v: _one_of(v, DISTRIBUTION_NAMES, "distribution"))
    )
    _known_backend = field_validator("backend")(classmethod(lambda cls, v: _one_of(v, BACKENDS, "backend")))
    _known_init = field_validator("init")(classmethod(lambda cls, v: _one_of(v, INITS, "init")))

    @field_validator("scheme")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        from ..core.schemes import parse_scheme

        parse_scheme(v)
        return v

    def _set_keys(self) -> list[str]:
        """Keys whose value differs from the default (what the user chose)."""
        out = []
        for name, field in type(self).model_fields.items():
            default = field.get_default(call_default_factory=True)
            if getattr(self, name) != default:
                out.append(name)
        return out

    def method_class(self) -> type:
        """The chosen method's class (its knobs, traits and hints)."""
        return METHOD_CLASSES[self.method]

    def method_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``METHODS[method]`` that this section sets (length of training, seed
        and data are the engine's to add)."""
        kw = {}
        for k in self.method_class().knobs:
            if k.factory and k.config:
                value = getattr(getattr(self, k.section), k.name) if k.section else getattr(self, k.name)
                if value is not None:
                    kw[k.name] = value
        return kw

    def execution_options(self) -> ExecutionOptions:
        """The execution options these keys set."""
        return ExecutionOptions(**{f.name: getattr(self, key) for key, f in _OPTION_KEYS.items()})

    @model_validator(mode="after")
    def _consistent(self):
        m, cls = self.method, self.method_class()
        takes = {k.name for k in cls.knobs if k.config and k.section is None}
        own = sorted({k.section for k in cls.knobs if k.config and k.section})
        unused = [k for k in self._set_keys() if k not in ENGINE_KEYS and k not in takes and k not in own]
        if "init_batches" in self._set_keys() and self.init not in ("snip", "grasp"):
            unused.append("init_batches")
        if unused:
            keys = ", ".join(f"sparsity.{k}" for k in unused)
            listed = sorted(takes) + [f"{s}.*" for s in own]
            hints = "".join(f"; {cls.config_hints[k]}" for k in unused if k in cls.config_hints)
            raise ValueError(f"method {m!r} does not use {keys} (it takes: {', '.join(listed) or 'nothing'}){hints}")
        custom = self.distribution == "custom" and "distribution" in takes
        if cls.traits.masks and self.sparsity == 0 and not custom:
            raise ValueError(f"method {m!r} needs sparsity.sparsity > 0")
        request = ExecutionRequest(m, cls.traits, self.scheme, self.execution_options())
        reasons = not_supported_reasons(self.backend, request)  # the backends say what combines
        if reasons:
            raise ValueError(reasons[0])
        if cls.traits.regrows and self.scheme.startswith("nm_"):
            raise ValueError(f"method {m!r} prunes and grows; N:M scheme {self.scheme!r} supports static masks only")
        return self


class RecipeConfig(_Section):
    """ToST (Jaiswal et al., 2022): a training recipe for any sparse mask. ``name: tost`` turns on the default
    components (ghost soft neurons, label smoothing) whose switch is left unset (null); ghost skips and rescaled
    initialisation stay off unless switched on, since they lowered validation accuracy; each switch also works alone."""

    name: Literal["none", "tost"] = "none"
    ghost_soft: bool | None = Field(None, description="soft activations blended back to ReLU early in training")
    soft_activation: Literal["silu", "mish", "gelu", "elu", "softplus"] = "silu"
    soft_hold: float = Field(0.1, ge=0, le=1, description="fraction of training with the pure soft activation")
    soft_blend_end: float = Field(
        0.2, ge=0, le=1, description="fraction of training by which the activation is ReLU again"
    )
    ghost_skip: bool | None = Field(
        None,
        description="extra dense 1x1 conv + BN shortcuts around conv pairs, decayed away "
        "(off under tost unless set: they cost validation accuracy)",
    )
    skip_end: float = Field(
        0.2, gt=0, le=1, description="fraction of training by which ghost skips have decayed to 0 and are removed"
    )
    rescale_init: Literal["none", "fan_in", "gradinit"] | None = Field(
        None, description="none unless set, also under tost: GradInit lowered validation accuracy"
    )
    gradinit_steps: int = Field(50, gt=0)
    label_smoothing: float | None = Field(
        None, ge=0, lt=1, description="tost default 0.1 (overrides optim.label_smoothing)"
    )
    teacher: str | None = Field(None, description="run directory of a trained teacher for soft labels")
    teacher_weight: float = Field(0.5, ge=0, le=1)
    teacher_temperature: float = Field(4.0, gt=0)

    @model_validator(mode="after")
    def _resolve(self):
        on = self.name == "tost"
        if self.ghost_soft is None:
            self.ghost_soft = on
        if self.ghost_skip is None:
            self.ghost_skip = False  # measured: removing them costs more than they gave (benchmarks/README.md)
        if self.rescale_init is None:
            self.rescale_init = "none"  # measured: GradInit cost validation accuracy (benchmarks/README.md)
        if self.label_smoothing is None and on:
            self.label_smoothing = 0.1
        if self.soft_blend_end < self.soft_hold:
            raise ValueError(
                f"soft_blend_end ({self.soft_blend_end}) must not come before soft_hold ({self.soft_hold})"
            )
        return self

    def tost_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``sparsetrain.tost`` these switches set (the model, the data and the teacher's
        weights are the engine's to add)."""
        keys = (
            "ghost_soft",
            "soft_activation",
            "soft_hold",
            "soft_blend_end",
            "ghost_skip",
            "skip_end",
            "rescale_init",
            "gradinit_steps",
            "teacher_weight",
            "teacher_temperature",
        )
        return {**{k: getattr(self, k) for k in keys}, "label_smoothing": self.label_smoothing or 0.0}

    def components(self) -> list[str]:
        """Names of the components switched on (for records)."""
        return [
            n
            for n, on in (
                ("ghost-soft", self.ghost_soft),
                ("ghost-skip", self.ghost_skip),
                ("rescale-init", self.rescale_init != "none"),
                ("label-smoothing", bool(self.label_smoothing)),
                ("teacher", bool(self.teacher)),
            )
            if on
        ]


class RunConfig(_Section):
    """Where the run writes, its seed, device, threads, checkpoint cadence and progress bar."""

    out_dir: str = "runs/run"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    threads: int = Field(0, ge=0, description="torch threads; 0 keeps torch's default")
    keep_freed_memory: bool = Field(
        True,
        description="keep freed memory in the process for the next step's tensors (glibc's malloc; "
        "sparsetrain.keep_freed_memory): faster steps, dense and sparse alike, for a higher resident peak",
    )
    checkpoint_every_steps: int = Field(0, ge=0, description="also checkpoint mid-epoch every N steps; 0: by time only")
    checkpoint_every_seconds: float = Field(
        300.0,
        ge=0,
        description="also checkpoint mid-epoch when this many seconds of training passed since the last save; 0: off",
    )
    resume_with_changes: bool = Field(
        False,
        description="resume although the schedule keys (optim.epochs, optim.lr, ...) "
        "changed; the changes are recorded in final.json",
    )
    progress: bool = True
    tensorboard: bool = Field(
        False,
        description="also write the metrics, learning rate, per-layer sparsity and FLOPs as "
        "TensorBoard scalars in <out_dir>/tensorboard (needs the tensorboard package)",
    )
    eval_batch_size: int = Field(500, gt=0)
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="under torchrun: ddp replicates the model on every rank; "
        "fsdp shards weights, gradients, optimizer state and masks "
        "(FSDP2 fully_shard)",
    )


class Config(_Section):
    """The whole configuration of a run, one section per concern."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    sparsity: SparsityConfig = Field(default_factory=SparsityConfig)
    recipe: RecipeConfig = Field(default_factory=RecipeConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _model_fits_data(self):
        from ..data.images import TEXT_DATASETS
        from ..models import SEQUENCE_MODELS, TRANSFORMER_MODELS

        text, seq = self.data.dataset in TEXT_DATASETS, self.model.name in SEQUENCE_MODELS
        if text != seq:
            raise ValueError(
                f"model {self.model.name!r} and dataset {self.data.dataset!r} do not fit: sequence models "
                f"({sorted(SEQUENCE_MODELS)}) train on text ({sorted(TEXT_DATASETS)}), image models on images"
            )
        if self.model.name not in TRANSFORMER_MODELS and (self.model.depth or self.model.heads):
            raise ValueError(
                f"model.depth and model.heads shape the transformers ({sorted(TRANSFORMER_MODELS)}); "
                f"model {self.model.name!r} does not take them"
            )
        if text and self.sparsity.data_efficiency.enabled:
            raise ValueError("sparsity.data_efficiency drops whole examples; it is not defined for text windows")
        if text and self.model.channels_last:
            self.model.channels_last = False  # token ids have no channels
        if self.run.parallel == "fsdp":
            self._check_sharded()
            self.model.channels_last = False  # FSDP2 shards contiguous parameters only
        return self

    def _check_sharded(self) -> None:
        """Refuse, before anything is built, what cannot run on sharded weights, with the reason."""
        sp, rc = self.sparsity, self.recipe
        reasons = []
        reasons += sp.method_class().sharding_reasons(sp.method_kwargs(), sp.compact_state)
        reasons += sharding_reasons(sp.backend, sp.compact_state)
        if sp.init in ("snip", "grasp", "synflow"):
            reasons.append(
                f"sparsity.init={sp.init!r} scores weights with gradients taken outside the optimizer's step, "
                "which FSDP does not reduce; use random or magnitude"
            )
        if sp.global_ranking:
            reasons.append(
                "sparsity.global_ranking ranks all layers at once; under FSDP rank each layer "
                "(sparsity.global_ranking=false)"
            )
        if sp.scheme == "channel_in":
            reasons.append("scheme 'channel_in' groups weights across output rows, which FSDP spreads over ranks")
        extra = [c for c in rc.components() if c != "label-smoothing"]
        if extra:
            reasons.append(
                f"the recipe's {', '.join(extra)} change the model after it is sharded; of the recipe only "
                "label smoothing runs under FSDP"
            )
        if reasons:
            raise ValueError("run.parallel=fsdp cannot run this configuration: " + "; ".join(reasons))

    def to_yaml(self) -> str:
        """The resolved configuration as YAML (what run directories keep)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            section = e["loc"][:-1]
            model = Config
            for p in section:
                model = model.model_fields[str(p)].annotation
            msg = f"unknown key; allowed here: {sorted(model.model_fields)}"
        lines.append(f"{key}: {msg} (got {e.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["optim.lr=0.05", "model.name=vgg16"]`` into a nested dict; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping (YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Read a YAML config (safe loader), apply overrides, validate; raise ConfigError naming every bad key."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader) or {}
        except FileNotFoundError as e:
            raise ConfigError(f"config file {path} does not exist") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    if overrides:
        raw = _merge(raw, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format(e)) from None
