"""galorax: GaLore (Gradient Low-Rank Projection) for JAX and optax.

A drop-in for ``optax.contrib.galore`` that is faster (randomized refresh), per-layer
(batch axes), stable at every refresh (moments carried across) and works at scale.

The public surface, by what it is for (names load on first use: ``import galorax`` imports
neither JAX nor the training application until one is touched):

* The transform: :func:`galore`, :func:`scale_by_galore`, :class:`GaLoreState`.
* APOLLO and APOLLO-Mini: :func:`apollo`, :func:`apollo_mini`, :func:`scale_by_apollo`,
  :class:`ApolloState`.
* How weights become matrices: :class:`GaLoreDimensionNumbers`, :class:`MatrixView`,
  :func:`default_dimension_numbers`, :func:`dimension_numbers_from_rules`.
* Refresh options and their math: :class:`Randomized`, :func:`randomized_basis`,
  :func:`exact_basis`, :func:`captured_energy`; :class:`RefreshSchedule`,
  :class:`AdaptiveRefresh`, :func:`subspace_overlap`; :class:`Residual`.
* Scanned layer stacks: :func:`per_layer` / :func:`per_layer_step` (each layer updated as
  its gradient is ready), :func:`scan_layers` (a rematerialized scan without whole-stack
  copies).
* 8-bit Adam: :func:`adamw_8bit`, :func:`scale_by_adam_8bit`, :class:`ScaleByAdam8bitState`.
* Bounded temporaries: :class:`Chunking` (how large leaves run in chunks),
  :func:`clip_by_global_norm` (optax's, its norm taken in chunks).
* Bytes, for any model and optimizer: :func:`tree_bytes`, :func:`plan_memory` /
  :class:`MemoryPlan` (weights, gradients, state), :func:`compiled_memory` /
  :func:`step_memory` / :class:`StepMemory` (XLA's analysis of a compiled step). The
  LLaMA presets and ``galorax memory``'s tables are the application's.
* Namespaces: :mod:`galorax.quantization` (block-wise codes, quantized projectors),
  :mod:`galorax.sharding` (meshes and state shardings), :mod:`galorax.torch` (PyTorch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from galorax.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    # the transform
    "GaLoreState": "galorax.transform",
    "galore": "galorax.transform",
    "scale_by_galore": "galorax.transform",
    # APOLLO
    "ApolloState": "galorax.apollo_transform",
    "apollo": "galorax.apollo_transform",
    "apollo_mini": "galorax.apollo_transform",
    "scale_by_apollo": "galorax.apollo_transform",
    # weights as matrices
    "GaLoreDimNumsOrFn": "galorax.dimension_numbers",
    "GaLoreDimensionNumbers": "galorax.dimension_numbers",
    "MatrixView": "galorax.dimension_numbers",
    "default_dimension_numbers": "galorax.dimension_numbers",
    "dimension_numbers_from_rules": "galorax.rules",
    # refresh options and their math
    "Randomized": "galorax.subspace",
    "captured_energy": "galorax.subspace",
    "exact_basis": "galorax.subspace",
    "randomized_basis": "galorax.subspace",
    "AdaptiveRefresh": "galorax.schedule",
    "RefreshSchedule": "galorax.schedule",
    "subspace_overlap": "galorax.schedule",
    "Residual": "galorax.residual",
    # per-layer weight updates for scanned layer stacks
    "PerLayerState": "galorax.layer_updates",
    "PerLayerTransformation": "galorax.layer_updates",
    "per_layer": "galorax.layer_updates",
    "per_layer_step": "galorax.layer_updates",
    "scan_layers": "galorax.layer_stack",
    # skipping a non-finite train step in place
    "adamw": "galorax.adam",
    "scale_by_adam": "galorax.adam",
    "StepGate": "galorax.step_gate",
    # 8-bit Adam
    "ScaleByAdam8bitState": "galorax.adam8bit",
    "adamw_8bit": "galorax.adam8bit",
    "scale_by_adam_8bit": "galorax.adam8bit",
    # bounded temporaries
    "Chunking": "galorax.chunking",
    "clip_by_global_norm": "galorax.clipping",
    # bytes
    "MemoryPlan": "galorax.accounting",
    "StepMemory": "galorax.accounting",
    "compiled_memory": "galorax.accounting",
    "plan_memory": "galorax.accounting",
    "step_memory": "galorax.accounting",
    "tree_bytes": "galorax.accounting",
}
# Flat names of earlier releases, now under galorax.quantization (still resolved).
_COMPAT = {
    name: "galorax.quantization"
    for name in (
        "QuantizedArray",
        "dequantize_blockwise",
        "projector_error",
        "quantize_blockwise",
        "quantize_like",
        "quantize_projector",
    )
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(
    __name__, {**_EXPORTS, **_COMPAT}, submodules=("quantization", "sharding"), hidden=_COMPAT
)

if TYPE_CHECKING:
    from galorax import quantization, sharding
    from galorax.accounting import (
        MemoryPlan,
        StepMemory,
        compiled_memory,
        plan_memory,
        step_memory,
        tree_bytes,
    )
    from galorax.adam import adamw, scale_by_adam
    from galorax.adam8bit import ScaleByAdam8bitState, adamw_8bit, scale_by_adam_8bit
    from galorax.apollo_transform import ApolloState, apollo, apollo_mini, scale_by_apollo
    from galorax.chunking import Chunking
    from galorax.clipping import clip_by_global_norm
    from galorax.dimension_numbers import (
        GaLoreDimensionNumbers,
        GaLoreDimNumsOrFn,
        MatrixView,
        default_dimension_numbers,
    )
    from galorax.layer_stack import scan_layers
    from galorax.layer_updates import (
        PerLayerState,
        PerLayerTransformation,
        per_layer,
        per_layer_step,
    )
    from galorax.quantization import (
        QuantizedArray,
        dequantize_blockwise,
        projector_error,
        quantize_blockwise,
        quantize_like,
        quantize_projector,
    )
    from galorax.residual import Residual
    from galorax.rules import dimension_numbers_from_rules
    from galorax.schedule import AdaptiveRefresh, RefreshSchedule, subspace_overlap
    from galorax.step_gate import StepGate
    from galorax.subspace import Randomized, captured_energy, exact_basis, randomized_basis
    from galorax.transform import GaLoreState, galore, scale_by_galore
