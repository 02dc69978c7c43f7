"""Bounded temporaries: map a function over a stacked array's leading axis in chunks.

A stacked leaf (scanned layers ``(layers, m, n)``, an embedding's rows) updated in one
piece materializes every full-size temporary of the update at once: f32 copies of a bf16
gradient, dequantized 8-bit moments. :func:`update_chunks` runs the update on a few slices at
a time (a ``fori_loop`` over chunks of the leading axis, writing
each chunk's result into the buffer it replaces), so temporaries scale with a chunk
of at most :data:`CHUNK_BYTES`, not with the stack. A leaf that fits is updated whole, as
before. The function must act slice by slice (the same result for a slice whatever
chunk it sits in): elementwise math, batched matmuls, per-slice reductions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax

from galorax.quantization.blockwise import QuantizedArray, lead_axes

#: Largest f32 temporary (bytes) a chunk may need: 64 MiB (one 1B-model MLP layer).
CHUNK_BYTES = 64 * 2**20

#: Whether GaLore's update (projection, refresh, back-projection) of a stacked bf16 leaf
#: runs in chunks. Off: XLA's memory analysis on CPU put the chunked 1B step at 15.54 GB
#: against 14.41 whole (CPU normalizes bf16 dynamic slices to f32 copies); to be measured
#: on a GPU. 8-bit moments are always chunked (13.59 GB against 26.70 for 8-bit AdamW).
CHUNK_GALORE = False

#: A chunk size is a divisor of the leading axis; when the largest divisor under the cap
#: would cost more than this many times the iterations of an ideal split, the leaf is
#: updated whole (a large prime-sized axis would otherwise run one slice per iteration).
MAX_EXTRA_ITERATIONS = 4


def chunk_size(n: int, slice_bytes: int, budget: int | None = None) -> int:
    """Slices per chunk of a leading axis of ``n`` slices of ``slice_bytes`` each.

    The largest divisor of ``n`` whose chunk fits ``budget`` (default
    :data:`CHUNK_BYTES`); ``n`` (no chunking) when everything fits, or when no divisor is
    close enough to the budget (see :data:`MAX_EXTRA_ITERATIONS`).

    Example:
        >>> chunk_size(24, 45 * 2**20), chunk_size(24, 2**20), chunk_size(32000, 8192)
        (1, 24, 8000)
        >>> chunk_size(7919, 2**20, budget=2**24)  # prime: 7919 iterations would be slow
        7919
    """
    budget = CHUNK_BYTES if budget is None else budget
    cap = max(1, budget // max(1, slice_bytes))
    if cap >= n:
        return n
    best = max(d for d in range(1, cap + 1) if n % d == 0)
    if n // best > MAX_EXTRA_ITERATIONS * math.ceil(n / cap):
        return n
    return best


def loop_variant(tree: Any, i: jax.Array) -> tuple[Any, jax.Array]:
    """``tree`` and the loop index ``i`` through one optimization barrier, for reads of
    ``tree`` inside a loop body.

    CPU XLA computes bf16 slices in f32 (its bf16 normalization upcasts the whole operand
    of a dynamic slice); for a loop-invariant stack it then hoists that upcast out of the
    loop: a whole-stack f32 copy. Tied to ``i``, the stack is no longer loop-invariant, the
    upcast stays in the slice's fusion and only the slice is read. Values are unchanged.

    Example:
        >>> import jax.numpy as jnp
        >>> stack, i = loop_variant(jnp.ones((3, 2), jnp.bfloat16), jnp.int32(1))
        >>> stack.dtype, int(i)
        (dtype(bfloat16), 1)
    """
    return jax.lax.optimization_barrier((tree, i))


def update_chunks(fn: Callable[[Any, Any], Any], bufs: Any, reads: Any, chunk: int) -> Any:
    """``fn(bufs, reads)`` computed ``chunk`` slices of the leading axis at a time, in place.

    A ``fori_loop`` over the chunks reads chunk ``i`` of ``bufs`` and ``reads`` and writes
    ``fn``'s result into chunk ``i`` of ``bufs``: the outputs take the buffers of the inputs
    they replace (a gradient becomes its update, 8-bit codes their successors), so no
    second full-size buffer is needed, only one chunk's temporaries.

    Args:
        fn: ``(bufs chunk, reads chunk) -> new bufs chunk`` (same structure; each leaf
            cast to its buffer's dtype). It must act on each slice independently.
        bufs: A tree of arrays with the same leading size ``n`` (a multiple of ``chunk``),
            replaced by the result.
        reads: A tree of arrays with the leading size ``n``, only read.
        chunk: Slices per iteration (:func:`chunk_size`); ``fn(bufs, reads)`` once when
            it covers the axis.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.arange(12.0).reshape(6, 2)
        >>> out = update_chunks(lambda b, r: b * 2 + r, x, jnp.ones((6, 2)), 2)
        >>> bool((out == x * 2 + 1).all())
        True
    """
    n = jax.tree.leaves(bufs)[0].shape[0]
    if chunk >= n:
        return fn(bufs, reads)
    if n % chunk:
        raise ValueError(f"chunk {chunk} does not divide the leading axis {n}")

    def body(i: jax.Array, bufs: Any) -> Any:
        # Tied to i, a bf16 read is not upcast whole outside the loop (see loop_variant).
        rs, i = loop_variant(reads, i)
        start = i * chunk
        cut = lambda x: jax.lax.dynamic_slice_in_dim(x, start, chunk)  # noqa: E731
        new = fn(jax.tree.map(cut, bufs), jax.tree.map(cut, rs))
        return jax.tree.map(
            lambda b, x: jax.lax.dynamic_update_slice_in_dim(b, x.astype(b.dtype), start, 0),
            bufs,
            new,
        )

    return jax.lax.fori_loop(0, n // chunk, body, bufs)


def can_split(q: QuantizedArray) -> bool:
    """Whether ``q``'s blocks never span two slices of its leading axis (so its codes and
    scales can be cut along it).

    Example:
        >>> from galorax.quantization.blockwise import quantized_zeros
        >>> can_split(quantized_zeros((4, 512))), can_split(quantized_zeros((4, 8)))
        (True, False)
    """
    return lead_axes(q.shape, q.block_size) >= 1


def quantized_chunk(like: QuantizedArray, codes: jax.Array, scales: jax.Array) -> QuantizedArray:
    """A chunk (or the whole) of a split :class:`QuantizedArray` ``like``: its codes and
    scales with ``like``'s settings, shaped by the leading axis of ``codes``.

    Example:
        >>> from galorax.quantization.blockwise import quantized_zeros
        >>> q = quantized_zeros((4, 512))
        >>> quantized_chunk(q, q.codes[:2], q.scales[:2]).shape
        (2, 512)
    """
    return dataclasses.replace(
        like, codes=codes, scales=scales, shape=(codes.shape[0], *like.shape[1:])
    )


def map_slices(
    fn: Callable[[Any, Any], Any], bufs: Any, reads: Any, n_batch: int, slice_bytes: int
) -> Any:
    """:func:`update_chunks` over the matrices of arrays shaped ``(*batch, ...)``
    (``n_batch`` batch axes), a chunk of at most :data:`CHUNK_BYTES` (``slice_bytes`` per
    matrix) at a time.

    The batch axes are flattened into one (a free reshape); without batch axes, with
    ``slice_bytes=0`` or when the stack fits, ``fn(bufs, reads)`` as it is.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.ones((2, 3, 4, 5))
        >>> map_slices(lambda b, r: b + r, x, x, 2, slice_bytes=CHUNK_BYTES).shape
        (2, 3, 4, 5)
    """
    batch = jax.tree.leaves(bufs)[0].shape[:n_batch]
    b = math.prod(batch)
    chunk = chunk_size(b, slice_bytes) if n_batch and slice_bytes else b
    if chunk >= b:
        return fn(bufs, reads)
    flat = lambda x: x.reshape((b, *x.shape[n_batch:]))  # noqa: E731
    out = update_chunks(fn, jax.tree.map(flat, bufs), jax.tree.map(flat, reads), chunk)
    return jax.tree.map(lambda y: y.reshape((*batch, *y.shape[1:])), out)
