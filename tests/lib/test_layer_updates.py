"""galorax.layer_updates: per-layer updates equal the plain update; clipping, non-finite, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import galorax
from galorax.layer_updates import (
    check_layer_state,
    clip_scale,
    per_layer,
    per_layer_step,
    put_layer,
    split_stack,
    take_layer,
)

L, D = 3, 16
DIMS = {
    "w_in": None,
    "head": None,
    "layers": {"w": galorax.GaLoreDimensionNumbers(reduction_axis=1, output_axis=2), "b": None},
}


def _params() -> dict:
    k = iter(jax.random.split(jax.random.key(0), 4))
    return {
        "w_in": jax.random.normal(next(k), (5, D)) / 2,
        "head": jax.random.normal(next(k), (D, 2)) / 4,
        "layers": {
            "w": jax.random.normal(next(k), (L, D, D)) / 4,
            "b": jnp.zeros((L, D)),
        },
    }


def embed(outer, batch):
    return batch @ outer["w_in"]


def layer(lp, h):
    return jnp.tanh(h @ lp["w"] + lp["b"])


def head(outer, h, batch):
    return jnp.mean((h @ outer["head"] - 0.5) ** 2)


def loss_fn(params, batch):
    h, _ = jax.lax.scan(lambda h, lp: (layer(lp, h), None), embed(params, batch), params["layers"])
    return head(params, h, batch)


def _batch(seed: int) -> jax.Array:
    return jax.random.normal(jax.random.key(100 + seed), (32, 5))


BASES = {
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "galore": lambda: galorax.galore(
        1e-2, rank=4, update_proj_gap=2, weight_dimension_numbers=DIMS
    ),
    "galore-svd-rotate": lambda: galorax.galore(
        1e-2, rank=4, update_proj_gap=2, subspace="svd", weight_dimension_numbers=DIMS
    ),
    "galore-8bit-int8": lambda: galorax.galore(
        1e-2,
        rank=4,
        update_proj_gap=2,
        weight_dimension_numbers=DIMS,
        projector_bits=8,
        base_optimizer=galorax.scale_by_adam_8bit(min_8bit_size=64, block_size=16),
    ),
    "galore-schedule": lambda: galorax.galore(
        optax.linear_schedule(1e-2, 0.0, 10), rank=4, weight_dimension_numbers=DIMS
    ),
}


@pytest.mark.parametrize("name", sorted(BASES))
def test_per_layer_step_equals_plain_steps(name):
    """N per-layer steps == N steps of the base transformation on the whole gradient."""
    base = BASES[name]()
    tx = per_layer(base)
    step = jax.jit(per_layer_step(tx, embed, layer, head))
    p_pl, s_pl = _params(), tx.init(_params())
    p_ref, s_ref = _params(), base.init(_params())

    @jax.jit  # the plain step: one compile, not op by op (the suite is compile-bound)
    def ref_step(p, s, batch):
        loss, g = jax.value_and_grad(loss_fn)(p, batch)
        u, s = base.update(g, s, p)
        return loss, optax.apply_updates(p, u), s

    for t in range(5):
        loss, p_pl, s_pl = step(p_pl, s_pl, _batch(t))
        ref_loss, p_ref, s_ref = ref_step(p_ref, s_ref, _batch(t))
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p_pl), jax.tree.leaves(p_ref), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert jax.tree.leaves(s_pl.layers)[0] == 5  # the count advanced once per step


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_per_layer_step_equals_its_reference_update(max_grad_norm):
    """The step and ``per_layer(...).update`` on the whole gradient: same params and state."""
    tx = per_layer(BASES["galore"](), max_grad_norm=max_grad_norm)
    step = jax.jit(per_layer_step(tx, embed, layer, head))
    grad, update = jax.jit(jax.grad(loss_fn)), jax.jit(tx.update)  # compiled once, not op by op
    p1 = p2 = _params()
    s1 = s2 = tx.init(p1)
    for t in range(4):
        _, p1, s1 = step(p1, s1, _batch(t))
        g = grad(p2, _batch(t))
        u, s2 = update(g, s2, p2)
        p2 = optax.apply_updates(p2, u)
        np.testing.assert_allclose(s1.grad_norm, optax.global_norm(g), rtol=1e-5)
    for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2)), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_clipping_uses_the_previous_steps_norm():
    """Step 1 is unclipped; step 2's gradient is scaled by max_grad_norm / step 1's norm."""
    params, c = _params(), 0.01
    sgd = per_layer(optax.sgd(1.0), max_grad_norm=c)
    state = sgd.init(params)
    g1, g2 = jax.grad(loss_fn)(params, _batch(0)), jax.grad(loss_fn)(params, _batch(1))
    u1, state = sgd.update(g1, state, params)
    assert float(optax.global_norm(u1)) == pytest.approx(float(optax.global_norm(g1)), rel=1e-6)
    u2, state = sgd.update(g2, state, params)
    scale = c / float(optax.global_norm(g1))
    assert float(optax.global_norm(u2)) == pytest.approx(
        scale * float(optax.global_norm(g2)), rel=1e-5
    )
    assert float(clip_scale(jnp.float32(0.005), c)) == 1.0


def test_nonfinite_loss_changes_nothing():
    tx = per_layer(BASES["galore"]())
    step = jax.jit(per_layer_step(tx, embed, layer, head))
    params, state = _params(), tx.init(_params())
    bad = _batch(0).at[0, 0].set(jnp.nan)
    loss, new_params, new_state = step(params, state, bad)
    assert not np.isfinite(loss)
    for a, b in zip(
        jax.tree.leaves((new_params, new_state)), jax.tree.leaves((params, state)), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_nonfinite_layer_gradient_keeps_that_layer():
    """A NaN weight in the top layer: its gradient and those below are not finite, so no
    layer changes, but the shared count advances."""
    tx = per_layer(optax.adam(1e-2))
    step = jax.jit(per_layer_step(tx, embed, layer, lambda o, h, b: jnp.mean(jnp.sqrt(h))))
    params, state = _params(), tx.init(_params())
    _, new_params, new_state = step(params, state, _batch(0))  # sqrt of negatives: NaN
    np.testing.assert_array_equal(new_params["layers"]["w"], params["layers"]["w"])
    np.testing.assert_array_equal(new_state.layers[0].mu["layers"]["w"], 0.0)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="stack='blocks'"):
        per_layer(optax.adam(1e-3), stack="blocks").init(_params())
    with pytest.raises(ValueError, match="max_grad_norm"):
        per_layer(optax.adam(1e-3), max_grad_norm=0.0)
    with pytest.raises(ValueError, match="same leading layer axis"):
        per_layer(optax.adam(1e-3)).init(
            {"a": jnp.ones(2), "layers": {"x": jnp.ones((2, 3)), "y": jnp.ones((3,))}}
        )
    with pytest.raises(ValueError, match="min_8bit_size"):
        per_layer(galorax.adamw_8bit(1e-3, min_8bit_size=1)).init(_params())
    with pytest.raises(ValueError, match="neither a scalar nor per layer"):
        check_layer_state({"ema": jnp.ones((7,))}, L)


def test_split_stack_masks_each_half():
    outer, layers = split_stack(_params(), "layers")
    assert isinstance(
        jax.tree.leaves(outer["layers"], is_leaf=lambda x: x == optax.MaskedNode())[0],
        optax.MaskedNode,
    )
    assert layers["w_in"] == optax.MaskedNode()


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 5), i=st.integers(0, 4), bits=st.sampled_from([None, 8, 4]))
def test_take_put_layer_round_trip(n, i, bits):
    i = i % n
    x = jax.random.normal(jax.random.key(n), (n, 4, 256))
    tree = {"x": x, "count": jnp.int32(3)}
    if bits is not None:
        tree["q"] = galorax.quantization.quantize_blockwise(x, bits=bits)
    part = take_layer(tree, i)
    assert part["x"].shape == (1, 4, 256) and part["count"] == 3
    back = put_layer(tree, i, part)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree), strict=True):
        np.testing.assert_array_equal(a, b)
    if bits is not None:
        np.testing.assert_allclose(
            galorax.quantization.dequantize_blockwise(part["q"])[0],
            galorax.quantization.dequantize_blockwise(tree["q"])[i],
        )
