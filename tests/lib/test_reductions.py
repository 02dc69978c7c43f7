"""Tests of galorax.reductions (a sum of squares and a finite check in bounded chunks) and
of galorax.clipping, their client: optax's clip_by_global_norm with the norm in chunks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from galorax import chunking
from galorax.chunking import Chunking
from galorax.clipping import clip_by_global_norm
from galorax.reductions import reduce_chunks, tree_all_finite, tree_sum_squares


def _grads(dtype):
    k1, k2 = jax.random.split(jax.random.key(3))
    return {
        "stack": (jax.random.normal(k1, (12, 6, 5)) * 3).astype(dtype),
        "vec": jax.random.normal(k2, (7,)).astype(dtype),
        "scalar": jnp.asarray(0.5, dtype),
    }


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_by_global_norm_matches_optax_in_chunks(dtype, max_norm):
    three = Chunking(max_bytes=3 * 4 * 6 * 5)  # 3 slices per chunk
    grads = _grads(dtype)
    want, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    tx = clip_by_global_norm(max_norm, chunking=three)
    got, state = jax.jit(tx.update)(grads, tx.init(grads))
    assert state == optax.EmptyState()
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tol, atol=tol)
    norm = jnp.sqrt(jax.jit(lambda g: tree_sum_squares(g, three))(grads))
    f32 = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    np.testing.assert_allclose(norm, optax.global_norm(f32), rtol=1e-5)  # in f32


@pytest.mark.parametrize("where", [0, 5, 11])
def test_tree_all_finite_finds_a_nan_in_any_chunk(where):
    finite = jax.jit(lambda g: tree_all_finite(g, Chunking(max_bytes=3 * 4 * 6 * 5)))
    grads = _grads(jnp.bfloat16)
    assert bool(finite(grads))
    grads["stack"] = grads["stack"].at[where, 2, 1].set(jnp.nan)
    assert not bool(finite(grads))


def test_chunked_reductions_of_a_bf16_stack_are_bounded():
    """Inside a train step CPU XLA may materialize a leaf's f32 squares / finite mask
    before reducing them (tests/app/test_step.py checks a step's peak); chunked, one chunk."""
    x = jax.ShapeDtypeStruct((16, 1024, 1024), jnp.bfloat16)  # 64 MiB of f32: several chunks
    for fn in (tree_sum_squares, tree_all_finite):
        temp = jax.jit(fn).lower(x).compile().memory_analysis().temp_size_in_bytes
        assert temp <= chunking.DEFAULT.max_bytes * 1.25, fn.__name__
    sq = lambda c: jnp.sum(jnp.square(c.astype(jnp.float32)))  # noqa: E731
    assert float(reduce_chunks(sq, jnp.ones((4, 3)))) == 12.0
