"""How GaLore stores its projectors and reads them back for the math.

A projector is stored as a float array in ``projector_dtype`` or, with ``projector_bits``,
as an int8 / int4 :class:`galorax.QuantizedArray` (:func:`galorax.quantize_projector`, one
``float32`` scale per group). A refresh quantizes the new basis; every use (projection,
back-projection, warm start, sign alignment, moment rotation, residual, subspace overlap)
dequantizes it first (:func:`dense`), in the dtype the math runs in (:func:`compute_dtype`).

Projector bytes: 1.016 (8) or 0.516 (4) per value instead of 4. Measured on the ``tiny``
model (``BENCHMARKS.md``): ``||Q - P|| / ||P||`` 0.85% (8) / 15% (4), error of the
back-projected gradient 1.0% / 18%; validation loss after 400 steps (2 refreshes) within
0.003 of float32 (8) and 0.01 below it (4); :func:`galorax.projector_error` measures it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from galorax import galore_math, placement
from galorax.quantization.blockwise import dequantize_blockwise, is_quantized

__all__ = ["change_of_basis", "compute_dtype", "dense", "quantized_spec"]


def quantized_spec(x: jax.Array, proj_spec: Any, n_batch: int, param: Any) -> Any:
    """Spec of a quantized projector's codes or scales under explicit sharding.

    Arrays shaped ``(*batch, rows, k)`` (8-bit codes) take the projector's spec; arrays
    shaped ``(*batch, k)``, whose last axis runs over ``(rows, r)`` row-major (4-bit codes,
    group scales), are split over it like the rows when it divides evenly: what sharding
    propagation gives the refresh's output, so the update's outputs match its inputs.

    Args:
        x: The codes or the scales of the quantized projector.
        proj_spec: The float projector's ``PartitionSpec`` (None: not placed).
        n_batch: Number of batch axes of the leaf.
        param: The parameter the projector belongs to (its mesh decides).

    Returns:
        A ``PartitionSpec`` for ``x``, or None when ``proj_spec`` is None.
    """
    if proj_spec is None:
        return None
    entries = tuple(proj_spec) + (None,) * (n_batch + 2 - len(proj_spec))
    mesh = placement.explicit_mesh(param)
    if x.ndim == n_batch + 2:
        # The rank axis may be sharded (placement): the scales' block axis need not divide.
        if mesh is not None and x.shape[-1] % placement.ways(entries[-1], mesh):
            return PartitionSpec(*entries[:-1], None)
        return proj_spec
    rows = entries[n_batch]
    if mesh is None or x.ndim != n_batch + 1 or x.shape[-1] % placement.ways(rows, mesh):
        rows = None
    return PartitionSpec(*entries[:n_batch], rows)


def dense(p: Any, dtype: Any) -> jax.Array:
    """A stored projector as a ``dtype`` array (dequantized with ``projector_bits``).

    Example:
        >>> import jax.numpy as jnp
        >>> dense(jnp.eye(2, dtype=jnp.bfloat16), jnp.float32).dtype
        dtype('float32')
    """
    return dequantize_blockwise(p, dtype) if is_quantized(p) else p.astype(dtype)


def change_of_basis(new: Any, old: Any) -> jax.Array:
    """:func:`galorax.galore_math.change_of_basis` of two stored projectors (float or
    quantized): ``C = new^T old`` per slice, in f32.

    Example:
        >>> import jax.numpy as jnp
        >>> old = jnp.eye(3)[:, :2]
        >>> change_of_basis(old[:, ::-1], old).tolist()
        [[0.0, 1.0], [1.0, 0.0]]
    """
    return galore_math.change_of_basis(dense(new, jnp.float32), dense(old, jnp.float32))


def compute_dtype(dtype: Any) -> Any:
    """Projections and low-rank moments run in at least f32 (bf16 moments stall).

    Example:
        >>> import jax.numpy as jnp
        >>> compute_dtype(jnp.bfloat16)
        dtype('float32')
    """
    return jnp.promote_types(dtype, jnp.float32)
