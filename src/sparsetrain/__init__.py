"""sparsetrain: sparse neural-network training in PyTorch.

The pieces, one concept per module: :mod:`~sparsetrain.data` (datasets and batches),
:mod:`~sparsetrain.models` (model zoo), :mod:`~sparsetrain.masks` (the sparse core),
:mod:`~sparsetrain.methods` (how masks are made and changed), :mod:`~sparsetrain.accounting`
(FLOPs and memory), :mod:`~sparsetrain.train` (the engine), :mod:`~sparsetrain.config`
and :mod:`~sparsetrain.cli`.
"""

from .accounting import FlopMeter, measure_layer_costs, saved_tensor_bytes
from .config import Config, ConfigError, load_config
from .data import load_dataset
from .masks import MaskSet
from .models import build_model
from .train import Trainer

__version__ = "0.1.0"

__all__ = [
    "Config", "ConfigError", "load_config", "load_dataset", "build_model", "MaskSet",
    "Trainer", "FlopMeter", "measure_layer_costs", "saved_tensor_bytes", "__version__",
]
