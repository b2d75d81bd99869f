"""One typed configuration for a training run: YAML file + ``key=value`` overrides, validated up front.

Every run directory gets the resolved config (``config.yaml``), so a run can be
repeated from its directory alone. Validation happens before any data is read or
model built; errors name the key, the bad value and what is allowed.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..core.distributions import DISTRIBUTION_NAMES
from ..data.images import DATASETS
from ..execution.backends import BACKENDS, ExecutionRequest, not_supported_reasons, sharding_reasons
from ..methods import METHODS, TRAITS
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


class MestConfig(_Section):
    """MEST (Yuan et al., 2021): mutation every ``every_epochs``; elastic ratio and soft bound as phases."""

    every_epochs: int = Field(5, gt=0, description="epochs between mutations (the paper's delta T)")
    mutation_ratio: list[list[float]] = Field(
        default_factory=lambda: [[0.0, 0.2], [0.56, 0.1], [0.75, 0.0]],
        description="[fraction of training, share of active weights mutated]; a single [[0, r]] disables elastic mutation",
    )
    soft_bound: bool = False
    excess: list[list[float]] = Field(
        default_factory=lambda: [[0.0, 0.05], [0.56, 0.025], [0.75, 0.0]],
        description="soft memory bound: extra density grown before the prune, by phase",
    )
    prune_lambda: float = Field(1.0, ge=0, description="prune score |w| + lambda * |g|")

    @field_validator("mutation_ratio", "excess")
    @classmethod
    def _check_phases(cls, v, info):
        from ..methods.mest import check_phases

        return check_phases(info.field_name, v)


class LotteryConfig(_Section):
    """Lottery-ticket search: rounds to the target sparsity and the rewind point."""

    rounds: int = Field(3, gt=0, description="prune-retrain rounds to reach the target sparsity")
    rewind_step: int = Field(0, ge=0, description="rewind to the weights at this step (0: initialisation)")


class DataEfficiencyConfig(_Section):
    """MEST data efficiency: drop the least-forgotten training examples at one epoch."""

    enabled: bool = False
    remove_epoch: int = Field(3, gt=0, description="after this many epochs of forgetting statistics")
    remove_fraction: float = Field(0.2, gt=0, lt=1, description="share of the training set removed")


class SwatConfig(_Section):
    """SWAT (Raihan & Aamodt, 2020) options; the weight sparsity is sparsity.sparsity."""

    variant: Literal["u", "erk", "m", "structured"] = "u"
    activation_sparsity: float | None = Field(
        None, ge=0, lt=1, description="kept share of layer inputs is 1 - this; default: the weight sparsity"
    )
    topk_period: int = Field(20, gt=0, description="iterations between exact top-K threshold updates")
    structure: Literal["kernel", "channel_out"] = Field(
        "kernel",
        description="unit kept by structured SWAT (by L1 norm). 'kernel', as the authors' released runs: with "
        "'channel_out' a removed filter's output is a constant channel, BatchNorm scales its gradient "
        "by 1/sqrt(eps), and the dense update then inflates the removed filters",
    )
    m_max_density: float = Field(0.95, gt=0, le=1, description="SWAT-M guard: no layer's budget passes this density")
    compact_relu: bool = Field(True, description="ReLUs save a 1-bit mask for backward instead of their float output")
    compact_pool: bool = Field(
        True,
        description="2x2 stride-2 max-pools save one byte per output for backward (where "
        "the maximum was) instead of their input and int64 indices",
    )


# keys of the sparsity section that configure the engine, not the method's factory
_ENGINE_KEYS = {
    "method",
    "backend",
    "compact_state",
    "channel_both_sides",
    "lossless_activations",
    "init_batches",
    "lottery",
    "data_efficiency",
}
# sections of the sparsity section that hold one method's own knobs
_METHOD_SECTIONS = {"mest": "mest", "swat": "swat", "lottery": "lottery"}
_HINTS = {
    ("swat", "distribution"): "SWAT's budgets come from sparsity.swat.variant (u, erk, m, structured)",
    ("swat", "scheme"): "structured SWAT is sparsity.swat.variant=structured with sparsity.swat.structure",
    ("dense", "sparsity"): "choose a sparse method, e.g. sparsity.method=static",
}


class SparsityConfig(_Section):
    """Which method and its knobs: an adapter that builds ``sparsetrain.<method>(**these keys)``.

    The flat keys are the factories' keyword arguments (a method reads those in its signature);
    ``mest``/``swat`` hold those methods' own knobs. A key set to a non-default value that the chosen
    method does not take is refused, naming it, rather than silently ignored.
    """

    method: str = "dense"
    sparsity: float = Field(0.0, ge=0.0, lt=1.0)
    dense_layers: list[str] | None = Field(
        None,
        description="parameters left dense: 'first', 'last' (the first conv, the classifier) or fnmatch patterns of names; "
        "default ['first', 'last'], and ['first'] for swat (its classifier is sparse)",
    )
    distribution: str = "uniform"
    custom_sparsity: dict[str, float] = Field(
        default_factory=dict, description="per-layer sparsity for distribution custom"
    )
    scheme: str = "unstructured"
    init: str = "random"
    global_ranking: bool = False
    init_batches: int = Field(1, gt=0, description="training batches scored by SNIP/GraSP")
    synflow_rounds: int = Field(100, gt=0)
    update_every_steps: int = Field(100, gt=0, description="SET/RigL: steps between mask updates")
    update_fraction: float = Field(
        0.3, ge=0, lt=1, description="SET/RigL: share of active weights replaced at the first update"
    )
    update_decay: Literal["cosine", "constant"] = "cosine"
    update_end: float = Field(0.75, gt=0, le=1, description="SET/RigL: no updates after this fraction of training")
    neuron_ablation: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="RigL with scheme fan_in: SRigL's neuron ablation threshold (0: off; the paper uses 0.3)",
    )
    backend: str = Field(
        "masked",
        description="execution of masked layers: masked dense, CSR sparse products, direct sparse conv kernels, "
        "condensed Linear kernels (rows of kept inputs; convolutions direct), compacted channels, "
        "2:4 semi-structured (CUDA), or the fastest per layer; method swat: masked (dense products "
        "on the top-K weights), direct or auto (its convolutions on the direct kernels where the "
        "step is faster)",
    )
    compact_state: bool = Field(
        False,
        description="direct or condensed backend; static, set, rigl or mest: store only "
        "kept weights (and their gradients and optimizer state)",
    )
    channel_both_sides: bool = Field(
        False,
        description="backend channel, static masks: a removed filter also leaves its "
        "BatchNorm channel and the next layer's inputs (both layers run "
        "smaller; the channel carries zero, not ReLU(beta))",
    )
    lossless_activations: bool = Field(
        False,
        description="any method (dense too): keep activations for backward in exact "
        "compact forms: ReLU bits, max-pool bytes, BatchNorm-ReLU "
        "outputs recomputed in backward instead of kept",
    )
    mest: MestConfig = Field(default_factory=MestConfig)
    swat: SwatConfig = Field(default_factory=SwatConfig)
    lottery: LotteryConfig = Field(default_factory=LotteryConfig)
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

    def method_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``METHODS[method]`` that this section sets (length of training, seed
        and data are the engine's to add)."""
        params = inspect.signature(METHODS[self.method]).parameters
        kw = {
            k: getattr(self, k)
            for k in type(self).model_fields
            if k in params and k not in _ENGINE_KEYS and k not in _METHOD_SECTIONS and getattr(self, k) is not None
        }
        section = _METHOD_SECTIONS.get(self.method)
        if section and section != "lottery":
            kw.update({k: v for k, v in getattr(self, section).model_dump().items() if k in params})
        return kw

    @model_validator(mode="after")
    def _consistent(self):
        m = self.method
        params = inspect.signature(METHODS[m]).parameters
        unused = [
            k
            for k in self._set_keys()
            if k not in _ENGINE_KEYS - {"lottery"} and k not in params and _METHOD_SECTIONS.get(k) != m
        ]
        if "init_batches" in self._set_keys() and self.init not in ("snip", "grasp"):
            unused.append("init_batches")
        if unused:
            keys = ", ".join(f"sparsity.{k}" for k in unused)
            takes = sorted(k for k in params if k in type(self).model_fields and k not in _ENGINE_KEYS)
            takes += [f"{m}.*"] if m in _METHOD_SECTIONS else []
            hints = "".join(f"; {_HINTS[(m, k)]}" for k in unused if (m, k) in _HINTS)
            raise ValueError(f"method {m!r} does not use {keys} (it takes: {', '.join(takes) or 'nothing'}){hints}")
        if m not in ("dense", "swat") and self.sparsity == 0 and self.distribution != "custom":
            raise ValueError(f"method {m!r} needs sparsity.sparsity > 0")
        if m == "swat" and self.sparsity == 0:
            raise ValueError("method 'swat' needs sparsity.sparsity > 0")
        request = ExecutionRequest(
            m, TRAITS[m], self.scheme, self.compact_state, self.channel_both_sides, self.lossless_activations
        )
        reasons = not_supported_reasons(self.backend, request)  # the backends say what combines
        if reasons:
            raise ValueError(reasons[0])
        if m in ("set", "rigl", "mest") and self.scheme.startswith("nm_"):
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
        if sp.method == "lottery":
            reasons.append(
                "method 'lottery' rewinds whole weights from files between rounds; train its rounds unsharded"
            )
        reasons += sharding_reasons(sp.backend, sp.compact_state)
        if sp.compact_state and sp.method == "mest" and sp.mest.soft_bound:
            reasons.append(
                "MEST's soft bound changes how many weights a layer keeps, but FSDP shards a compact layer's "
                "kept weights at a fixed count; use sparsity.mest.soft_bound=false or compact_state=false"
            )
        if sp.compact_state and sp.neuron_ablation:
            reasons.append(
                "neuron ablation changes how many weights a layer keeps, which a sharded compact layer "
                "cannot; use compact_state=false"
            )
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
