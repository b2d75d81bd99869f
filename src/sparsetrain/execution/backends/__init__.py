"""Execution backends: how a masked Conv2d/Linear really computes, one small class per backend, each in a module of
this package that registers it (:func:`~.registry.register`).

Each backend declares what it supports (:class:`~.registry.Backend`); :data:`BACKENDS` is the registry the
configuration, the factories and the planner (:mod:`sparsetrain.execution.plan`) ask, in the order the backends
declare (``rank``). SWAT's own layers (:mod:`.swat`) run under the backends that declare ``own_layers``. Nothing
outside this package compares backend names; the docs' table of backends is generated from the registry. Adding a
backend is a module here (every module of the package is imported below) and its conformance-test entry.
"""

import importlib as _importlib
import pkgutil as _pkgutil

from .auto import (
    CLOSE_CALL,
    LAYOUT_TIE,
    MASKED_UNLESS,
    TIMING_SHARE,
    choose_now,
    gradients_dropped,
    keep_buffers,
    measure_reruns,
    near_tie,
    settle_layout,
)
from .channel import expand_channels, kept_channels
from .condensed import CondensedStructure, condensed_linear
from .csr import CSRStructure, csr_conv2d, csr_linear
from .direct import DirectStructure, direct_conv2d, direct_forward, direct_geometry, direct_input_grad, direct_plan
from .layers import SparseConv2d, SparseLinear, apply_backend
from .registry import (
    BACKENDS,
    Backend,
    ExecutionRequest,
    check_execution,
    direct_ok,
    get_backend,
    not_supported_reasons,
    sharding_reasons,
)
from .semi_structured import check_two_four, semi_structured_available

__all__ = [
    "BACKENDS",
    "Backend",
    "ExecutionRequest",
    "check_execution",
    "get_backend",
    "not_supported_reasons",
    "sharding_reasons",
    "direct_ok",
    "apply_backend",
    "SparseLinear",
    "SparseConv2d",
    "settle_layout",
    "keep_buffers",
    "choose_now",
    "measure_reruns",
    "gradients_dropped",
    "near_tie",
    "CLOSE_CALL",
    "MASKED_UNLESS",
    "LAYOUT_TIE",
    "TIMING_SHARE",
    "CSRStructure",
    "CondensedStructure",
    "DirectStructure",
    "csr_linear",
    "csr_conv2d",
    "condensed_linear",
    "direct_conv2d",
    "direct_forward",
    "direct_input_grad",
    "direct_geometry",
    "direct_plan",
    "kept_channels",
    "expand_channels",
    "check_two_four",
    "semi_structured_available",
]

for _module in _pkgutil.iter_modules(__path__):  # each backend's module registers it; compact layers register too
    _importlib.import_module(f"{__name__}.{_module.name}")
