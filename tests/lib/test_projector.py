"""Tests of galorax.projector: quantized projectors (projector_bits) and their error."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galorax
from galorax import galore_math, projector, projector_refresh
from galorax.accounting import tree_bytes
from galorax.dimension_numbers import GaLoreDimensionNumbers as Dims
from galorax.dimension_numbers import MatrixView
from galorax.galore_math import uses_left
from galorax.leaf import LeafProjector, is_projector_leaf, make_projectors
from galorax.options import galore_options
from galorax.projector_storage import dense
from galorax.quantization.projectors import (
    projector_error,
    quantize_projector,
    quantize_slices,
    select_slices,
)

CODES = [(c, b, s) for c in ("dynamic", "linear") for b in (8, 4) for s in (True, False)]


@functools.cache
def _gradient_and_projector() -> tuple[jax.Array, jax.Array]:
    """A 256 x 128 gradient with a 1/i spectrum and its exact top-32 left basis."""

    @jax.jit
    def make():
        k1, k2 = jax.random.split(jax.random.key(7))
        g = (jax.random.normal(k1, (256, 128)) / jnp.arange(1, 129)) @ jax.random.normal(
            k2, (128, 128)
        )
        return g, jnp.linalg.svd(g, full_matrices=False)[0][:, :32]

    return make()


@pytest.mark.parametrize(
    "bits,group,max_rel,max_energy_drop",
    [(8, 256, 0.01, 1e-3), (4, 64, 0.12, 0.03), (4, 256, 0.15, 0.04)],
)
def test_projector_quantization_error(bits, group, max_rel, max_energy_drop):
    """Linear absmax code on a Gaussian-like orthonormal P: rms error ~ step / sqrt(12) with
    step = 2 * absmax / (2**bits - 2) and absmax ~ 2.5-3 sigma of a group: ~0.6% (8-bit),
    ~10% (4-bit). The captured energy of the gradient barely moves: quantization noise is
    spread over all m directions, only r / m of it lands in the subspace."""
    k1, k2 = jax.random.split(jax.random.key(7))
    g = (
        jax.random.normal(k1, (512, 256))
        @ jnp.diag(1.0 / jnp.arange(1, 257))
        @ (jax.random.normal(k2, (256, 256)))
    )
    p = jnp.linalg.svd(g, full_matrices=False)[0][:, :64]
    q = quantize_projector(p, bits=bits, group_size=group)
    err = projector_error(p, q, g)
    assert float(err.relative) < max_rel
    assert float(err.energy - err.energy_quantized) < max_energy_drop
    assert tree_bytes(q) < tree_bytes(p) * (bits / 32 + 4 / group + 1e-6)


# ---------------------------------------------------------------- per-leaf projectors


def test_make_projectors_tree_offsets_and_sides():
    params = {
        "tall": jnp.zeros((16, 4)),
        "wide": jnp.zeros((4, 16)),
        "stack": jnp.zeros((3, 8, 6)),
        "bias": jnp.zeros(4),
        "out": optax.MaskedNode(),
    }
    dims = {"tall": Dims(), "wide": Dims(), "stack": Dims(1, 2), "bias": None, "out": None}
    tree = make_projectors(params, dims, galore_options(rank=3, update_proj_gap=9))
    assert tree["bias"] is None and tree["out"] is None
    leaves = jax.tree.leaves(tree, is_leaf=is_projector_leaf)
    assert len(leaves) == 5
    projected = [p for p in leaves if p is not None]
    assert [p.index for p in projected] == [0, 1, 2]
    assert [p.offset for p in projected] == [0, 3, 6]  # stagger: evenly over the gap
    assert tree["tall"].left and not tree["wide"].left  # "auto": the long side
    assert tree["stack"].proj_shape == (3, 8, 3) and tree["stack"].low_shape == (3, 3, 6)
    flat = make_projectors(params, dims, galore_options(rank=3, stagger=False))
    assert {p.offset for p in jax.tree.leaves(flat, is_leaf=is_projector_leaf) if p} == {0}


def test_uses_left_follows_galore_torch():
    assert [uses_left(s, 4, 8) for s in ("auto", "reverse_std", "std", "left", "right")] == [
        False,
        False,
        True,
        True,
        False,
    ]


@pytest.mark.parametrize("left", [True, False])
def test_leaf_projector_round_trip_and_refresh(left):
    view = MatrixView.of((2, 12, 10), Dims(1, 2))
    leaf = LeafProjector(view, left, 3, 0, 0, galore_options(rank=3, subspace="svd"))
    p, proxy, schedule, norm = projector.init_leaf(leaf, jnp.zeros(view.shape))
    assert p.shape == leaf.proj_shape and proxy.shape == leaf.low_shape
    assert schedule.next_step.shape == norm.shape == (2,)
    g2 = view.to_matrix(jax.random.normal(jax.random.key(0), view.shape))
    new, schedule, changed, basis = projector_refresh.refresh(leaf, g2, p, schedule, jnp.asarray(0))
    assert bool(changed)
    # The moments' change of basis new^T old, taken inside the refresh (old is dead after).
    np.testing.assert_allclose(basis, jnp.swapaxes(new, -1, -2) @ p, atol=1e-6)
    np.testing.assert_array_equal(schedule.refreshes, [1, 1])
    eye = jnp.swapaxes(new, -1, -2) @ new
    np.testing.assert_allclose(eye, jnp.broadcast_to(jnp.eye(3), eye.shape), atol=1e-5)
    low, _ = projector.project(leaf, g2, new)
    assert low.shape == leaf.low_shape
    back = galore_math.project_back(low, new, left=left)  # P P^T G (left) or G P P^T (right)
    np.testing.assert_allclose(galore_math.project(back, new, left=left), low, atol=1e-4)


def test_quantized_slices_are_replaced_one_by_one():
    p = jnp.broadcast_to(jnp.eye(8, 2), (3, 8, 2))
    old, new = quantize_slices(p, 8), quantize_slices(-p, 8)
    picked = select_slices(jnp.array([True, False, True]), new, old)
    out = dense(picked, jnp.float32)
    np.testing.assert_array_equal(out[0], -p[0])
    np.testing.assert_array_equal(out[1], p[1])


def _leaf_steps(leaf, grads):
    """Updates and final state of ``leaf.step`` + ``leaf.finish`` (``u`` = 2 x low-rank)."""
    p, _, sched, norm = projector.init_leaf(leaf, grads[0])

    @jax.jit
    def one(g, p, sched, norm, count):
        g2 = projector.as_matrices(leaf, g)
        p, sched, _ = projector.refresh(leaf, g2, p, sched, count, True)
        low, dense = projector.project(leaf, g2, p)
        out, norm = projector.project_back(leaf, g, g2, low, 2.0 * low, p, dense, norm)
        return out, p, sched, norm

    outs = []
    for t, g in enumerate(grads):
        out, p, sched, norm = one(g, p, sched, norm, jnp.asarray(t * 2))
        outs.append(out)
    return outs, p, sched, norm


@pytest.mark.parametrize(
    "left, subspace, bits, residual",
    [
        (True, "svd", None, None),
        (False, "randomized", None, None),
        (True, "randomized", 8, None),
        (False, "svd", None, True),
    ],
)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_chunked_leaf_steps_match_the_whole_stack(left, subspace, bits, residual, dtype):
    """A stacked leaf projected, refreshed and projected back a chunk of slices at a time
    gives the whole-stack updates within f32 rounding (bf16 gradients, residual)."""
    view = MatrixView.of((4, 24, 20), Dims(1, 2))
    opts = galore_options(
        rank=3, update_proj_gap=2, subspace=subspace, projector_bits=bits, residual=residual
    )
    leaf = LeafProjector(view, left, 3, 0, 0, opts)
    keys = jax.random.split(jax.random.key(0), 3)
    grads = [jax.random.normal(k, view.shape).astype(dtype) for k in keys]
    whole = _leaf_steps(leaf, grads)
    two = galorax.Chunking(max_bytes=2 * 4 * 24 * 20)  # 2 slices per chunk
    leaf = LeafProjector(view, left, 3, 0, 0, dataclasses.replace(opts, chunking=two))
    chunked = _leaf_steps(leaf, grads)
    assert chunked[0][0].dtype == dtype
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    for a, b in zip(jax.tree.leaves(chunked), jax.tree.leaves(whole), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol)


@pytest.mark.parametrize("bits, moments", [(None, "rotate"), (8, "keep")])
def test_a_chunked_leaf_keeps_its_projector_when_not_refreshing(bits, moments):
    """In chunks, a refresh that is not due or not attempted (a non-finite step) runs a
    loop of no iteration: projector and schedule come back unchanged, bit for bit."""
    two = galorax.Chunking(max_bytes=2 * 4 * 24 * 20)  # 2 slices per chunk
    view = MatrixView.of((4, 24, 20), Dims(1, 2))
    opts = galore_options(
        rank=3, update_proj_gap=4, projector_bits=bits, moments=moments, chunking=two
    )
    leaf = LeafProjector(view, True, 3, 0, 0, opts)
    g = jax.random.normal(jax.random.key(0), view.shape).astype(jnp.bfloat16)  # chunked
    p, _, sched, _ = projector.init_leaf(leaf, g)
    assert projector_refresh.in_chunks(leaf, view.to_matrix(g))

    def refresh(g, p, s, c, f):
        new, sched, move = projector.refresh(leaf, projector.as_matrices(leaf, g), p, s, c, f)
        return new, sched, (move.changed, move.basis)

    step = jax.jit(refresh)
    p, sched, _ = step(g, p, sched, jnp.asarray(0), jnp.asarray(True))
    for count, finite in [(1, True), (4, False)]:
        new, new_sched, (changed, basis) = step(g * 3, p, sched, jnp.asarray(count), finite)
        assert not bool(changed)
        jax.tree.map(np.testing.assert_array_equal, (new, new_sched), (p, sched))
        if moments == "rotate":
            np.testing.assert_array_equal(basis, jnp.zeros_like(basis))
    new, _, (changed, _) = step(g * 3, p, sched, jnp.asarray(4), jnp.asarray(True))
    assert bool(changed)


def test_a_refresh_traces_under_x64():
    """The refresh's change of basis and the cond's other branch agree on f32 under x64."""
    with jax.enable_x64(True):
        params = {"a": jnp.ones((16, 8), jnp.float32)}
        tx = galorax.scale_by_galore(rank=2)
        grads = {"a": jnp.ones((16, 8), jnp.float32) * jnp.arange(8, dtype=jnp.float32)}
        updates, _ = jax.jit(tx.update)(grads, tx.init(params))
        assert updates["a"].dtype == jnp.float32
