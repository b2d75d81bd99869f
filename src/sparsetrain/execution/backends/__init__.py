"""Execution backends: how a masked Conv2d/Linear really computes, one small class per backend.

================== =======================================================================================
``masked``         masked dense tensors: the reference and the fallback (exact zeros, dense cost)
``csr``            PyTorch's CSR sparse-dense products (:mod:`.csr`)
``direct``         our C kernels over the kept weights of convolutions (:mod:`.direct`)
``condensed``      our C kernels over the kept weights of Linear layers (:mod:`.condensed`)
``channel``        whole output channels as smaller dense layers (:mod:`.channel`)
``semi_structured`` 2:4 Linear layers on sparse tensor cores (:mod:`.semi_structured`, CUDA)
``auto``           the fastest path per layer and the faster layout, timed on a real batch (:mod:`.auto`)
================== =======================================================================================

Each backend declares what it supports (:class:`~.registry.Backend`); :data:`BACKENDS` is the registry the
configuration, the factories and the planner (:mod:`sparsetrain.execution.plan`) ask. SWAT's own layers
(:mod:`.swat`) run under the backends that declare ``own_layers``. Nothing outside this package compares
backend names.
"""

# isort: off
from . import masked, csr, direct, condensed, channel, semi_structured, auto  # noqa: F401 - registration order
from . import compact  # noqa: F401 - registers the compact layers

# isort: on
from .auto import TIMING_SHARE, choose_now, keep_buffers, near_tie, settle_layout
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
    "near_tie",
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
