"""Reductions of large leaves in bounded chunks: a sum of squares (a global norm), a finite
check.

On CPU, XLA runs a reduction outside the fusion that produces its input, materializing it
whole: the f32 squares of a bf16 gradient stack, its finite mask. Here each leaf is reduced a
chunk of its leading axis at a time (at most :attr:`galorax.Chunking.max_bytes` of f32), so
only one chunk's temporaries exist.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from galorax.chunking import DEFAULT, Chunking, chunk_size, loop_variant

__all__ = ["reduce_chunks", "tree_all_finite", "tree_sum_squares"]


def reduce_chunks(
    fn: Callable[[jax.Array], jax.Array], x: jax.Array, settings: Chunking = DEFAULT
) -> jax.Array:
    """The sum of ``fn`` (a scalar per chunk) over chunks of ``x``'s leading axis.

    ``fn(x)`` whole when the f32 image of ``x`` fits ``settings.max_bytes``; otherwise a
    loop over chunks of at most that size, so a reduction of a large leaf (the squares of
    a bf16 gradient stack, its finite mask) has one chunk's temporaries: on CPU, XLA runs
    reductions outside the fusion that produces their input, materializing it whole.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.ones((64, 2**20), jnp.bfloat16)  # 256 MiB as f32: 32 chunks
        >>> float(reduce_chunks(lambda c: jnp.sum(c.astype(jnp.float32)), x))
        67108864.0
    """
    if x.ndim == 0:
        return fn(x)
    n = x.shape[0]
    chunk = chunk_size(n, 4 * (x.size // n), settings)
    if chunk >= n:
        return fn(x)
    zero = jnp.zeros((), jax.eval_shape(fn, x[:chunk]).dtype)

    def body(i: jax.Array, acc: jax.Array) -> jax.Array:
        xs, i = loop_variant(x, i)
        return acc + fn(jax.lax.dynamic_slice_in_dim(xs, i * chunk, chunk))

    return jax.lax.fori_loop(0, n // chunk, body, zero)


def tree_sum_squares(tree: Any, settings: Chunking = DEFAULT) -> jax.Array:
    """The sum of squares (f32) of every leaf of ``tree``, in bounded chunks
    (:func:`reduce_chunks`); its square root is ``optax.global_norm(tree)``.

    Example:
        >>> import jax.numpy as jnp
        >>> float(tree_sum_squares({"a": jnp.full(3, 2.0), "b": jnp.ones((2, 2), jnp.bfloat16)}))
        16.0
    """
    sq = lambda c: jnp.sum(jnp.square(c.astype(jnp.float32)))  # noqa: E731
    leaves = jax.tree.leaves(tree)
    return sum((reduce_chunks(sq, x, settings) for x in leaves), jnp.zeros([], jnp.float32))


def tree_all_finite(tree: Any, settings: Chunking = DEFAULT) -> jax.Array:
    """Whether every element of every leaf of ``tree`` is finite, in bounded chunks
    (:func:`reduce_chunks`).

    Example:
        >>> import jax.numpy as jnp
        >>> bool(tree_all_finite({"a": jnp.ones(3)})), bool(tree_all_finite([jnp.array([jnp.inf])]))
        (True, False)
    """
    bad = lambda c: jnp.any(~jnp.isfinite(c)).astype(jnp.int32)  # noqa: E731
    leaves = jax.tree.leaves(tree)
    n_bad = sum((reduce_chunks(bad, x, settings) for x in leaves), jnp.zeros([], jnp.int32))
    return n_bad == 0
