"""Quantized GaLore projectors: :func:`quantize_projector` and what it costs
(:func:`projector_error`). Re-exported by :mod:`galorax.projector`, which stores and uses
them (``projector_bits``)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from galorax.quantization.blockwise import QuantizedArray, dequantize_blockwise, quantize_blockwise

#: Values per float32 scale of a quantized projector (``projector_bits``).
PROJECTOR_GROUP = 256


def quantize_projector(p: jax.Array, bits: int = 8, group_size: int = 256) -> QuantizedArray:
    """Stores a GaLore projector in ``bits`` (8: int8-like, 4: two per byte) with one
    ``float32`` scale per group, using the symmetric *linear* code.

    Projector entries are roughly Gaussian with no outliers, where uniform levels beat the
    dynamic (log-like) map; see :func:`projector_error` for the measured cost.

    Example:
        >>> import jax
        >>> p, _ = jax.numpy.linalg.qr(jax.random.normal(jax.random.key(0), (512, 64)))
        >>> q = quantize_projector(p, bits=4, group_size=64)
        >>> q.codes.shape, q.codes.dtype
        ((512, 32), dtype('uint8'))
    """
    return quantize_blockwise(p, bits=bits, block_size=group_size, code="linear", signed=True)


class ProjectorError(NamedTuple):
    """Errors of a quantized projector ``Q`` against the original ``P`` (columns orthonormal).

    Attributes:
        relative: ``||Q - P||_F / ||P||_F``.
        orthogonality: ``||Q^T Q - I||_F / sqrt(r)``.
        energy: Fraction of ``G``'s energy captured by ``P`` (``||P^T G||^2 / ||G||^2``).
        energy_quantized: The same through ``Q`` (``||Q^T G||^2 / ||G||^2``).
        update_relative: ``||Q Q^T G - P P^T G||_F / ||P P^T G||_F``: the error of the
            projected-then-back-projected gradient, i.e. of the weight update direction.
    """

    relative: jax.Array
    orthogonality: jax.Array
    energy: jax.Array
    energy_quantized: jax.Array
    update_relative: jax.Array


def projector_error(p: jax.Array, q: QuantizedArray, g: jax.Array) -> ProjectorError:
    """Measures what quantizing the left projector ``p`` (m x r) costs on gradient ``g``
    (m x n).

    Example:
        >>> import jax
        >>> g = jax.random.normal(jax.random.key(0), (256, 128))
        >>> p = jax.numpy.linalg.svd(g, full_matrices=False)[0][:, :32]
        >>> err = projector_error(p, quantize_projector(p, bits=8), g)
        >>> bool(err.relative < 0.01), bool(abs(err.energy - err.energy_quantized) < 1e-3)
        (True, True)
    """
    p = p.astype(jnp.float32)
    pq = dequantize_blockwise(q, jnp.float32)
    r = p.shape[-1]
    g2 = jnp.sum(g * g)
    upd, upd_q = p @ (p.T @ g), pq @ (pq.T @ g)
    return ProjectorError(
        relative=jnp.linalg.norm(pq - p) / jnp.linalg.norm(p),
        orthogonality=jnp.linalg.norm(pq.T @ pq - jnp.eye(r)) / math.sqrt(r),
        energy=jnp.sum((p.T @ g) ** 2) / g2,
        energy_quantized=jnp.sum((pq.T @ g) ** 2) / g2,
        update_relative=jnp.linalg.norm(upd_q - upd) / jnp.linalg.norm(upd),
    )


def quantize_slices(p: jax.Array, bits: int) -> QuantizedArray:
    """``p`` (``(*batch, rows, r)``) in ``bits`` with one scale per group of at most
    :data:`PROJECTOR_GROUP` values; a group never spans two slices, so the slices of a
    stacked leaf can be replaced one by one (see :func:`select_slices`).

    Example:
        >>> import jax.numpy as jnp
        >>> quantize_slices(jnp.ones((3, 8, 2)), 8).scales.shape  # one group per slice
        (3, 1)
    """
    rows, r = p.shape[-2:]
    return quantize_projector(p, bits=bits, group_size=max(1, min(PROJECTOR_GROUP, rows * r)))


def select_slices(accept: jax.Array, new: QuantizedArray, old: QuantizedArray) -> Any:
    """``new``'s slices where ``accept`` (batch-shaped), else ``old``'s, codes and scales."""

    def pick(a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.where(accept.reshape(accept.shape + (1,) * (a.ndim - accept.ndim)), a, b)

    return jax.tree.map(pick, new, old)
