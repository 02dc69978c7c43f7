"""Tests of residual compensation: Fira's formula, the limiter, and the transform option."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import galorax
from galorax.galore_math import compensation
from galorax.residual import Residual


def _case(seed, m=12, n=8, r=3, left=True):
    key = jax.random.key(seed)
    g = jax.random.normal(key, (m, n))
    rows = m if left else n
    p = jnp.linalg.qr(jax.random.normal(jax.random.fold_in(key, 1), (rows, r)))[0]
    low = p.T @ g if left else g @ p
    upd = jnp.sign(low) * jnp.sqrt(jnp.abs(low))  # some rescaling, like Adam's
    return g, p, low, upd


@pytest.mark.parametrize("left", [True, False])
def test_matches_fira_per_channel(left):
    g, p, low, upd = _case(0, left=left)
    term, norm = compensation(
        g, low, upd, p, left=left, prev_norm=jnp.zeros(()), settings=Residual()
    )
    g_np, p_np, low_np, upd_np = map(np.asarray, (g, p, low, upd))
    inside = p_np @ low_np if left else low_np @ p_np.T
    dim = 0 if left else 1  # Fira: norms over the rank axis
    phi = np.linalg.norm(upd_np, axis=dim, keepdims=True) / (
        np.linalg.norm(low_np, axis=dim, keepdims=True) + 1e-8
    )
    np.testing.assert_allclose(term, phi * (g_np - inside), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm, np.linalg.norm(phi * (g_np - inside)), rtol=1e-5)


@pytest.mark.parametrize("left", [True, False])
def test_term_is_outside_the_subspace(left):
    g, p, low, upd = _case(1, left=left)
    term, _ = compensation(
        g, low, upd, p, left=left, prev_norm=jnp.zeros(()), settings=Residual("matrix")
    )
    inside = p.T @ term if left else term @ p
    assert float(jnp.max(jnp.abs(inside))) < 1e-5


@settings(max_examples=8, deadline=None)  # each example compiles new shapes
@given(
    st.integers(0, 10_000),
    st.floats(1e-3, 10.0),
    st.sampled_from(["channel", "matrix"]),
    st.floats(1.0, 1.5),
)
def test_limiter_bounds_norm_growth(seed, prev, granularity, limit):
    g, p, low, upd = _case(seed)
    settings_ = Residual(granularity, limit)
    term, norm = compensation(
        g, low, upd, p, left=True, prev_norm=jnp.asarray(prev), settings=settings_
    )
    assert float(norm) <= limit * prev * (1 + 1e-5)
    np.testing.assert_allclose(float(jnp.linalg.norm(term)), float(norm), rtol=1e-4)
    unlimited, raw = compensation(
        g, low, upd, p, left=True, prev_norm=jnp.zeros(()), settings=settings_
    )
    if float(raw) <= limit * prev:  # under the cap: untouched
        np.testing.assert_allclose(term, unlimited, rtol=1e-5, atol=1e-7)


def test_bad_settings():
    with pytest.raises(ValueError, match="granularity"):
        Residual("row")
    with pytest.raises(ValueError, match="limit"):
        Residual(limit=0.5)
    with pytest.raises(TypeError, match="residual"):
        galorax.galore(0.1, residual="yes")


def test_transform_adds_the_residual_and_keeps_one_scalar_per_matrix():
    params = {"w": jax.random.normal(jax.random.key(0), (2, 16, 8)), "b": jnp.zeros(8)}
    dims = {"w": galorax.GaLoreDimensionNumbers(1, 2), "b": None}
    plain = galorax.scale_by_galore(rank=2, weight_dimension_numbers=dims)
    comp = galorax.scale_by_galore(rank=2, weight_dimension_numbers=dims, residual=True)
    s1, s2 = plain.init(params), comp.init(params)
    assert s1.residual_norm is None and s2.residual_norm["w"].shape == (2,)
    grads = jax.tree.map(lambda x: jnp.cos(x) + 1.0, params)
    u1, _ = plain.update(grads, s1)
    u2, s2 = jax.jit(comp.update)(grads, s2)
    assert bool(jnp.all(s2.residual_norm["w"] > 0))
    view = galorax.MatrixView.of((2, 16, 8), dims["w"])
    p = s2.projector["w"]
    extra = view.to_matrix(u2["w"] - u1["w"])  # the compensation term
    assert float(jnp.max(jnp.abs(jnp.swapaxes(p, -1, -2) @ extra))) < 1e-4
    assert float(jnp.linalg.norm(extra)) > 0
    np.testing.assert_allclose(u1["b"], u2["b"], rtol=1e-6)


def test_compensated_galore_converges():
    key = jax.random.key(0)
    x = jax.random.normal(key, (128, 32))
    y = x @ jax.random.normal(jax.random.fold_in(key, 1), (32, 24))  # full-rank target

    def loss(p):
        return jnp.mean((x @ p["w"] - y) ** 2)

    finals = {}
    for name, residual in [("plain", None), ("residual", True)]:
        tx = galorax.galore(0.05, rank=4, update_proj_gap=20, residual=residual)
        params = {"w": jnp.zeros((32, 24))}
        state = tx.init(params)

        @jax.jit
        def step(params, state, tx=tx):
            grads = jax.grad(loss)(params)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        for _ in range(200):
            params, state = step(params, state)
        finals[name] = float(loss(params))
    # A rank-4 subspace cannot fit a rank-24 target fast; the residual reaches the rest.
    assert finals["residual"] < 0.5 * finals["plain"]
