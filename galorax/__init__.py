"""galorax: GaLore (Gradient Low-Rank Projection) for JAX and optax.

A drop-in for ``optax.contrib.galore`` that is faster (randomized refresh), per-layer
(batch axes), stable at every refresh (moments carried across) and works at scale.
"""

from galorax.dimension_numbers import (
    GaLoreDimensionNumbers,
    GaLoreDimNumsOrFn,
    MatrixView,
    default_dimension_numbers,
    dimension_numbers_from_rules,
)
from galorax.galore import GaLoreState, galore, scale_by_galore
from galorax.memory import MemoryEstimate, plan_memory, tree_bytes
from galorax.quantized import (
    QuantizedArray,
    ScaleByAdam8bitState,
    adamw_8bit,
    dequantize_blockwise,
    projector_error,
    quantize_blockwise,
    quantize_like,
    quantize_projector,
    scale_by_adam_8bit,
)
from galorax.residual import Residual
from galorax.schedule import AdaptiveRefresh, RefreshSchedule, subspace_overlap
from galorax.subspace import Randomized, captured_energy, exact_basis, randomized_basis

__all__ = [
    "MemoryEstimate",
    "QuantizedArray",
    "ScaleByAdam8bitState",
    "adamw_8bit",
    "dequantize_blockwise",
    "plan_memory",
    "projector_error",
    "quantize_blockwise",
    "quantize_like",
    "quantize_projector",
    "scale_by_adam_8bit",
    "AdaptiveRefresh",
    "Residual",
    "subspace_overlap",
    "GaLoreDimNumsOrFn",
    "GaLoreDimensionNumbers",
    "GaLoreState",
    "MatrixView",
    "Randomized",
    "RefreshSchedule",
    "captured_energy",
    "default_dimension_numbers",
    "dimension_numbers_from_rules",
    "exact_basis",
    "galore",
    "randomized_basis",
    "scale_by_galore",
    "tree_bytes",
]

__version__ = "0.1.0"
