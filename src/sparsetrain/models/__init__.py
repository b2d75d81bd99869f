"""Model zoo, a registry by name.

``build_model("resnet20", num_classes=10)`` returns a fresh ``nn.Module``. Every
function of the library also accepts any user ``nn.Module``: the zoo is a
convenience, not a requirement.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from .cifar_resnet import cifar_resnet, wide_resnet
from .densenet import densenet121
from .gpt import gpt
from .mobilenetv2 import mobilenet_v2
from .resnet import resnet18_cifar, resnet50
from .small import small_cnn, small_mlp
from .vgg import vgg
from .vit import vit

__all__ = [
    "MODELS",
    "SEQUENCE_MODELS",
    "TRANSFORMER_MODELS",
    "build_model",
    "build_configured",
    "register_model",
    "model_input_shape",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": lambda num_classes=10, width=1.0: cifar_resnet(20, num_classes, width),
    "resnet32": lambda num_classes=10, width=1.0: cifar_resnet(32, num_classes, width),
    "resnet56": lambda num_classes=10, width=1.0: cifar_resnet(56, num_classes, width),
    "resnet18": lambda num_classes=10, width=1.0: resnet18_cifar(num_classes, width),
    "vgg16": lambda num_classes=10, width=1.0: vgg(16, num_classes, width),
    "vgg19": lambda num_classes=10, width=1.0: vgg(19, num_classes, width),
    "wrn16_8": lambda num_classes=10, width=1.0: wide_resnet(16, 8 * width, num_classes),
    "densenet121": lambda num_classes=10, width=1.0: densenet121(num_classes, width),
    "mobilenetv2": lambda num_classes=10, width=1.0: mobilenet_v2(num_classes, width),
    "resnet50": lambda num_classes=1000, width=1.0: resnet50(num_classes, width),
    "small_cnn": lambda num_classes=10, width=1.0: small_cnn(num_classes, width),
    "mlp": lambda num_classes=10, width=1.0: small_mlp(num_classes, width),
    "gpt": gpt,  # a character GPT: num_classes is the vocabulary; takes context, depth, heads as well
    "vit": vit,  # a small ViT for CIFAR-size images; takes depth and heads as well
}
# models over token sequences (their input is ids, their output a distribution per position)
SEQUENCE_MODELS = {"gpt"}
TRANSFORMER_MODELS = {"gpt", "vit"}  # the models that take depth and heads

# Input shape (C, H, W) each model is meant for; the CIFAR models take 32x32 RGB.
_INPUT_SHAPES = {"resnet50": (3, 224, 224), "small_cnn": (1, 28, 28), "mlp": (1, 28, 28)}


def register_model(
    name: str, factory: Callable[..., nn.Module], input_shape: tuple[int, int, int] = (3, 32, 32)
) -> None:
    """Make ``factory(num_classes=..., width=...)`` available under ``name`` (CLI and config)."""
    MODELS[name] = factory
    _INPUT_SHAPES[name] = input_shape


def model_input_shape(name: str) -> tuple[int, int, int]:
    """The (C, H, W) input a zoo model is built for."""
    return _INPUT_SHAPES.get(name, (3, 32, 32))


def build_model(name: str, num_classes: int | None = None, width: float = 1.0, **extra) -> nn.Module:
    """Build a zoo model by name; ``width`` multiplies every layer's channel count; ``extra`` keys go to models
    that take them (the GPT's ``context``, ``depth``, ``heads``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    kwargs = {"width": width, **{k: v for k, v in extra.items() if v is not None}}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return MODELS[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"model {name!r} does not take {sorted(extra)}: {e}") from None


def build_configured(model_cfg, num_classes: int, context: int | None = None) -> nn.Module:
    """The zoo model a run's ``model`` section names (its depth and heads for a transformer, ``context`` for a
    sequence model): the one place runs, evaluation and sampling build their models."""
    extra = {"depth": model_cfg.depth, "heads": model_cfg.heads} if model_cfg.name in TRANSFORMER_MODELS else {}
    if model_cfg.name in SEQUENCE_MODELS:
        extra["context"] = context
    return build_model(model_cfg.name, num_classes, model_cfg.width, **extra)
