"""Tests of galorax.apollo_transform: APOLLO against a dense reference written from
apollo-torch 1.0.3's ``AdamW.step`` (numpy, the same projections), batch axes, per-layer
updates, the step's gate, 8-bit moments and the aliases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galorax
from galorax import apollo_math

DIMS = galorax.GaLoreDimensionNumbers


def _reference(grads, *, rank, gap, scale, per_channel, left, steps_key, growth=1.01, eps=1e-6):
    """apollo-torch's step for one matrix, in numpy: updates (before the learning rate)."""
    b1, b2 = 0.9, 0.999
    mu = nu = None
    prev, outs = None, []
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        m, n = g.shape
        p = np.asarray(
            apollo_math.random_projection(steps_key((t - 1) // gap), (), m if left else n, rank)
        )
        low = p.T @ g if left else g @ p
        mu = (1 - b1) * low if mu is None else b1 * mu + (1 - b1) * low
        nu = (1 - b2) * low**2 if nu is None else b2 * nu + (1 - b2) * low**2
        normalized = mu / (np.sqrt(nu) + eps)
        axis = (0 if left else 1) if per_channel else None
        s = np.linalg.norm(normalized, axis=axis, keepdims=True) / (
            np.linalg.norm(low, axis=axis, keepdims=True) + 1e-8
        )
        u = g * s
        if growth is not None:
            norm = np.linalg.norm(u)
            if prev is not None:
                limiter = max(norm / (prev + 1e-8), growth) / growth
                u, norm = u / limiter, norm / limiter
            prev = norm
        step_size = np.sqrt(1 - b2**t) / (1 - b1**t)
        outs.append(u * np.sqrt(scale) * step_size)
    return outs


@pytest.mark.parametrize("shape", [(24, 10), (10, 24)])  # std: right, then left
@pytest.mark.parametrize("scale_type, scale", [("channel", 1.0), ("tensor", 128.0)])
def test_updates_equal_the_reference(shape, scale_type, scale):
    rank, gap, steps = 3, 2, 5  # re-drawn at steps 0, 2 and 4
    grads = [jax.random.normal(jax.random.key(t), shape) for t in range(steps)]
    tx = galorax.scale_by_apollo(rank, gap, scale, scale_type=scale_type, seed=7)
    state, update, got = tx.init({"w": grads[0]}), jax.jit(tx.update), []
    for g in grads:
        u, state = update({"w": g}, state)
        got.append(u["w"])
    left = shape[0] < shape[1]
    key = jax.random.fold_in(jax.random.key(7), shape[0] if left else shape[1])  # its rows
    want = _reference(
        grads,
        rank=rank,
        gap=gap,
        scale=scale,
        per_channel=scale_type == "channel",
        left=left,
        steps_key=lambda i: jax.random.fold_in(key, i),
    )
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def _stack_params():
    k = jax.random.split(jax.random.key(3), 3)
    return {
        "w_in": 0.4 * jax.random.normal(k[0], (6, 16)),
        "layers": {"w": 0.25 * jax.random.normal(k[1], (4, 16, 16))},
        "head": 0.25 * jax.random.normal(k[2], (16, 5)),
    }


def _fns():
    embed = lambda outer, b: jnp.tanh(b @ outer["w_in"])  # noqa: E731
    layer = lambda lp, h: jnp.tanh(h @ lp["w"])  # noqa: E731
    head = lambda outer, h, b: jnp.mean((h @ outer["head"] - b[:, :5]) ** 2)  # noqa: E731
    return embed, layer, head


def test_per_layer_step_equals_the_plain_update():
    """One projection shared by a stack's layers: a layer updated on its own draws it too."""
    params = _stack_params()
    tx = galorax.per_layer(
        galorax.apollo(
            1e-2,
            rank=4,
            update_proj_gap=2,
            weight_dimension_numbers=galorax.dimension_numbers_from_rules,
        )
    )
    embed, layer, head = _fns()

    def loss(p, b):
        x, _ = jax.lax.scan(lambda h, lp: (layer(lp, h), None), embed(p, b), p["layers"])
        return head(p, x, b)

    step = jax.jit(galorax.per_layer_step(tx, embed, layer, head))
    update = jax.jit(tx.update)
    a = b = params
    sa = sb = tx.init(params)
    for t in range(4):
        batch = jax.random.normal(jax.random.key(20 + t), (8, 6))
        _, a, sa = step(a, sa, batch)
        u, sb = update(jax.grad(loss)(b, batch), sb, b)
        b = optax.apply_updates(b, u)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


def test_a_skipped_step_leaves_the_state_in_place():
    params = {"w": jnp.ones((64, 32)), "b": jnp.ones(32)}
    tx = galorax.scale_by_apollo(rank=4, moment_bits=8)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = jax.jit(tx.update)(grads, state)

    @jax.jit
    def skipped(g, s):
        gate = galorax.StepGate(False)
        _, new = tx.update(g, s, gate=gate)
        assert gate.covers(new)
        return gate.keep(new, s)

    kept = skipped(jax.tree.map(lambda x: x * jnp.nan, grads), state)
    jax.tree.map(np.testing.assert_array_equal, kept, state)


def test_8bit_moments_follow_the_f32_ones():
    params = {"w": jnp.ones((128, 64))}
    grads = [{"w": jax.random.normal(jax.random.key(t), (128, 64))} for t in range(4)]
    outs = []
    for bits in (None, 8):
        tx = galorax.scale_by_apollo(rank=32, moment_bits=bits)
        state, update = tx.init(params), jax.jit(tx.update)
        for g in grads:
            u, state = update(g, state)
        outs.append(u["w"])
        if bits:
            assert type(state.mu["w"]).__name__ == "QuantizedArray"
    cos = jnp.sum(outs[0] * outs[1]) / (jnp.linalg.norm(outs[0]) * jnp.linalg.norm(outs[1]))
    assert float(cos) > 0.99


def test_apollo_mini_is_rank_one_tensor_scaled():
    params = {"w": jnp.ones((64, 32)), "b": jnp.zeros(32)}
    mini = galorax.apollo_mini(1e-2)
    state = mini.init(params)
    assert state[0].mu["w"].shape == (64, 1) and state[0].norm["w"].shape == ()
    g = {"w": jax.random.normal(jax.random.key(0), (64, 32)), "b": jnp.ones(32)}
    u, _ = mini.update(g, state, params)
    ratio = u["w"] / g["w"]  # one factor for the whole matrix
    np.testing.assert_allclose(ratio, jnp.full_like(ratio, ratio[0, 0]), rtol=1e-5)
    assert (
        galorax.plan_memory(params, mini).state
        < galorax.plan_memory(params, galorax.galore(1e-2, rank=1)).state * 2
    )


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"scale_type": "row"}, "scale_type"),
        ({"moment_bits": 4}, "moment_bits"),
        ({"growth": 0.5}, "growth"),
        ({"rank": 0}, "rank"),
    ],
)
def test_bad_arguments_are_named(kw, match):
    with pytest.raises((TypeError, ValueError), match=match):
        galorax.scale_by_apollo(**kw)


def test_under_inject_hyperparams():
    """The learning rate, weight decay, scale, betas and growth as injected hyperparameters;
    rank and gap static, as galore's."""
    make = optax.inject_hyperparams(galorax.apollo, static_args=("rank", "update_proj_gap"))
    tx = make(learning_rate=0.1, rank=2, update_proj_gap=3, weight_decay=0.01, growth=1.02)
    params = {"w": jnp.ones((8, 4))}
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(params, state, params)
    assert {"learning_rate", "weight_decay", "growth"} <= set(state.hyperparams)
    assert updates["w"].shape == (8, 4)


def test_a_large_matrix_is_scaled_from_all_its_moments():
    """A matrix whose moments outgrow a chunk is not split along its rank axis (the scale
    of a channel reads every row of its moments): the same updates as one whole chunk."""
    params = {"w": jnp.ones((64, 48))}
    g = {"w": jax.random.normal(jax.random.key(0), (64, 48))}
    outs = []
    for chunking in (None, galorax.Chunking(max_bytes=4 * 48 * 2)):
        tx = galorax.scale_by_apollo(rank=16, chunking=chunking, moment_bits=8)
        outs.append(jax.jit(tx.update)(g, tx.init(params))[0]["w"])
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6)
