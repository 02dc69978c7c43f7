"""Tests of refresh scheduling: overlap measure, retries, adaptive gaps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import galorax
from galorax.schedule import AdaptiveRefresh, RefreshSchedule, advance, subspace_overlap


@settings(max_examples=5, deadline=None)  # each example compiles new shapes
@given(st.integers(2, 12), st.integers(1, 6), st.integers(0, 1000))
def test_overlap_is_basis_independent_and_bounded(m, r, seed):
    r = min(r, m)
    key = jax.random.key(seed)
    p = jnp.linalg.qr(jax.random.normal(key, (m, r)))[0]
    rot = jnp.linalg.qr(jax.random.normal(jax.random.fold_in(key, 1), (r, r)))[0]
    np.testing.assert_allclose(subspace_overlap(p @ rot, p), 1.0, atol=1e-5)
    q = jnp.linalg.qr(jax.random.normal(jax.random.fold_in(key, 2), (m, r)))[0]
    assert -1e-6 <= float(subspace_overlap(q, p)) <= 1 + 1e-5
    if 2 * r <= m:
        full = jnp.linalg.qr(jax.random.normal(jax.random.fold_in(key, 3), (m, m)))[0]
        assert float(subspace_overlap(full[:, :r], full[:, r : 2 * r])) < 1e-5


def test_advance_keeps_slots_and_retries():
    s = RefreshSchedule(jnp.array([0, 0]), jnp.array([10, 10]), jnp.array([0, 0]))
    s = advance(s, jnp.array([True, False]), 0, offset=3, base_gap=10)
    np.testing.assert_array_equal(s.next_step, [3, 0])
    s = advance(s, jnp.array([True, True]), 4, offset=3, base_gap=10)  # a late refresh
    np.testing.assert_array_equal(s.next_step, [13, 13])  # back on the slot grid
    np.testing.assert_array_equal(s.refreshes, [2, 1])


def test_adaptive_gap_grows_when_stable_and_resets_when_not():
    ad = AdaptiveRefresh(threshold=0.9, growth=2, max_factor=4)
    s = RefreshSchedule(jnp.array([0, 0]), jnp.array([5, 5]), jnp.array([1, 1]))
    for expected in ([10, 5], [20, 5], [20, 5]):
        s = advance(s, jnp.array([True, True]), 0, 0, 5, jnp.array([0.95, 0.2]), ad)
        np.testing.assert_array_equal(s.gap, expected)
    first = RefreshSchedule(jnp.array([0]), jnp.array([5]), jnp.array([0]))
    s = advance(first, jnp.array([True]), 0, 0, 5, jnp.array([1.0]), ad)
    np.testing.assert_array_equal(s.gap, [5])  # the first refresh has nothing to compare


def test_adaptive_refresh_skips_refreshes_on_a_stable_gradient():
    key = jax.random.key(0)
    base = jax.random.normal(key, (3, 24, 4)) @ jax.random.normal(key, (3, 4, 16))
    params = {"w": jnp.zeros((3, 24, 16))}

    def count_refreshes(adaptive):
        tx = galorax.galore(
            0.01,
            rank=4,
            update_proj_gap=4,
            adaptive=adaptive,
            weight_dimension_numbers=galorax.GaLoreDimensionNumbers(1, 2),
        )
        state = tx.init(params)
        update = jax.jit(tx.update)
        for t in range(48):
            noise = 1e-3 * jax.random.normal(jax.random.fold_in(key, t), base.shape)
            _, state = update({"w": base + noise}, state, params)
        assert update._cache_size() == 1
        return np.asarray(state[0].schedule["w"].refreshes), np.asarray(state[0].schedule["w"].gap)

    fixed, _ = count_refreshes(None)
    lazy, gaps = count_refreshes(True)
    np.testing.assert_array_equal(fixed, [12, 12, 12])
    assert np.all(lazy < fixed / 2)
    assert np.all(gaps == 4 * 8)


def test_adaptive_settings_validated():
    with pytest.raises(ValueError, match="threshold"):
        AdaptiveRefresh(threshold=0)
    with pytest.raises(TypeError, match="growth"):
        AdaptiveRefresh(growth=1.5)
    with pytest.raises(TypeError, match="adaptive"):
        galorax.galore(0.1, adaptive=3)
