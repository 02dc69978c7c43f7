"""Tests of galorax.chunking: chunk sizes, in-place chunked maps, bf16 reads without an
f32 copy of the whole stack."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from galorax import chunking
from galorax.chunking import (
    Chunking,
    chunk_size,
    loop_variant,
    map_slices,
    update_chunks,
)


@pytest.mark.parametrize(
    "n, slice_bytes, budget, want",
    [(24, 10, 1000, 24), (24, 10, 50, 4), (24, 10, 9, 1), (7, 10, 30, 1), (7919, 1, 16, 7919)],
)
def test_chunk_size_is_a_divisor_under_the_budget(n, slice_bytes, budget, want):
    assert chunk_size(n, slice_bytes, Chunking(max_bytes=budget)) == want


def test_update_chunks_equals_the_whole_call():
    x = jax.random.normal(jax.random.key(0), (12, 5, 3))
    r = jax.random.normal(jax.random.key(1), (12, 3, 4))

    def fn(bufs, reads):
        a, s = bufs
        return a @ reads @ jnp.swapaxes(reads, -1, -2), s + jnp.sum(a, axis=(-2, -1))

    whole = fn((x, jnp.zeros(12)), r)
    for chunk in (1, 3, 12):
        out = jax.jit(lambda x, r, c=chunk: update_chunks(fn, (x, jnp.zeros(12)), r, c))(x, r)
        jax.tree.map(np.testing.assert_array_equal, out, whole)


@pytest.mark.parametrize("chunk", [2, 6])
def test_update_chunks_keep_false_writes_the_old_chunks_back(chunk):
    x = jnp.arange(12.0).reshape(6, 2)
    fn = jax.jit(
        lambda x, keep: update_chunks(lambda b, r: b * 2 + r, x, jnp.ones((6, 2)), chunk, keep)
    )
    np.testing.assert_array_equal(fn(x, jnp.asarray(False)), x)
    np.testing.assert_array_equal(fn(x, jnp.asarray(True)), x * 2 + 1)


def test_buffers_that_read_each_other_are_updated_without_copies():
    """Each new chunk reads both buffers' old chunks (as a gradient becomes its update
    while the moments are requantized): fused into the in-place writes, XLA copied both
    buffers whole every iteration; now only chunks are temporaries."""

    def fn(bufs, _):
        a, b = (x.astype(jnp.float32) for x in bufs)
        m, v = 0.9 * a + 0.1 * b, 0.99 * b + 0.01 * a * a
        return (m / (jnp.sqrt(v) + 1e-8)).astype(bufs[0].dtype), v.astype(bufs[1].dtype)

    x = jax.ShapeDtypeStruct((64, 1024, 256), jnp.bfloat16)  # 32 MiB each
    step = jax.jit(
        lambda a, b: update_chunks(fn, (a, b), (), 4, isolate=True), donate_argnums=(0, 1)
    )
    temp = step.lower(x, x).compile().memory_analysis().temp_size_in_bytes
    assert temp < 64 * 1024 * 256 * 2 / 2  # under half of one buffer
    a, b = jnp.ones((8, 2, 3)), jnp.full((8, 2, 3), 2.0)
    out = update_chunks(fn, (a, b), (), 2, isolate=True)
    jax.tree.map(np.testing.assert_array_equal, out, fn((a, b), ()))


def test_update_chunks_rejects_a_chunk_that_does_not_divide():
    with pytest.raises(ValueError, match="divide"):
        update_chunks(lambda b, r: b, jnp.ones((5, 2)), (), 2)


def test_loop_variant_reads_the_same_values():
    x = jnp.linspace(-3, 3, 12, dtype=jnp.bfloat16).reshape(3, 4)
    read = lambda i: jax.lax.dynamic_index_in_dim(*loop_variant(x, i), keepdims=False)
    out = jax.lax.map(read, jnp.arange(3))
    np.testing.assert_array_equal(out, x)


def test_map_slices_flattens_batch_axes():
    one = Chunking(max_bytes=4 * 4 * 5)  # one matrix per chunk
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))
    out = map_slices(lambda b, r: b * r, x, x + 1, 2, slice_bytes=4 * 4 * 5, settings=one)
    np.testing.assert_array_equal(out, x * (x + 1))


@pytest.mark.parametrize("slice_bytes", [4 * 4 * 5, 0])  # a loop of chunks; one whole call
def test_map_slices_keep_false_leaves_the_buffers(slice_bytes):
    one = Chunking(max_bytes=4 * 4 * 5)
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))
    mul = lambda b, r: b * r  # noqa: E731
    fn = jax.jit(lambda x, keep: map_slices(mul, x, x + 1, 2, slice_bytes, keep, one))
    np.testing.assert_array_equal(fn(x, jnp.asarray(False)), x)
    np.testing.assert_array_equal(fn(x, jnp.asarray(True)), x * (x + 1))


def test_after_keeps_the_values_and_depends_on_its_argument():
    x = jnp.arange(4.0, dtype=jnp.bfloat16)
    np.testing.assert_array_equal(chunking.after(x, jnp.ones((2, 3))), x)
    jaxpr = str(jax.make_jaxpr(chunking.after)(x, jnp.ones((2, 3))))
    assert "slice" in jaxpr and "mul" in jaxpr  # not folded away while tracing


def test_chunked_bf16_read_is_not_copied_whole():
    """CPU XLA upcasts a bf16 dynamic slice's operand; hoisted out of the loop, that is an
    f32 copy of the whole stack (read as uint16 bits instead, a uint16 copy)."""
    g = jax.ShapeDtypeStruct((24, 64, 256), jnp.bfloat16)
    p = jax.ShapeDtypeStruct((24, 256, 16), jnp.float32)

    def project(g, p):
        fn = lambda _, r: jnp.matmul(r[0].astype(jnp.float32), r[1])  # noqa: E731
        return update_chunks(fn, jnp.zeros((24, 64, 16)), (g, p), 1)

    memory = jax.jit(project).lower(g, p).compile().memory_analysis()
    assert memory.temp_size_in_bytes < 24 * 64 * 256 * 2 / 2  # under half a bf16 copy
