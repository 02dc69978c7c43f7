"""Quantization: code tables, block-wise quantized arrays and quantized GaLore projectors.

* :mod:`galorax.quantization.codes`: the dynamic and linear code tables (numpy only).
* :mod:`galorax.quantization.blockwise`: :class:`QuantizedArray`, :func:`quantize_blockwise`,
  :func:`dequantize_blockwise` and friends.
* :func:`quantize_projector` / :func:`projector_error` (from :mod:`galorax.projector`): int8 /
  int4 projector storage (``projector_bits``) and what it costs.

The 8-bit Adam built on them is :func:`galorax.adamw_8bit`.

Example:
    >>> import jax.numpy as jnp
    >>> from galorax import quantization
    >>> q = quantization.quantize_blockwise(jnp.linspace(-1.0, 1.0, 512))
    >>> q.codes.dtype, q.scales.shape
    (dtype('uint8'), (2,))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from galorax.lazy import lazy_exports

_BLOCKWISE = "galorax.quantization.blockwise"
_CODES = "galorax.quantization.codes"
_PROJECTOR = "galorax.quantization.projectors"

_EXPORTS = {
    "Code": _CODES,
    "code_table": _CODES,
    "dynamic_code": _CODES,
    "linear_code": _CODES,
    "QuantizedArray": _BLOCKWISE,
    "dequantize_blockwise": _BLOCKWISE,
    "is_quantized": _BLOCKWISE,
    "quantize_blockwise": _BLOCKWISE,
    "quantize_like": _BLOCKWISE,
    "quantized_zeros": _BLOCKWISE,
    "ProjectorError": _PROJECTOR,
    "projector_error": _PROJECTOR,
    "quantize_projector": _PROJECTOR,
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from galorax.quantization.blockwise import (
        QuantizedArray,
        dequantize_blockwise,
        is_quantized,
        quantize_blockwise,
        quantize_like,
        quantized_zeros,
    )
    from galorax.quantization.codes import Code, code_table, dynamic_code, linear_code
    from galorax.quantization.projectors import ProjectorError, projector_error, quantize_projector
