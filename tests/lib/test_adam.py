"""Tests of galorax.adam: optax's Adam/AdamW bit for bit, skipping a non-finite step in
place under a step gate (no copy of the moments in the compiled step)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galorax
from galorax.step_gate import StepGate

PARAMS = {"w": jnp.ones((8, 4), jnp.bfloat16), "b": jnp.ones(4), "skip": None}


def _grads(seed: int):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "w": jax.random.normal(k1, (8, 4)).astype(jnp.bfloat16),
        "b": jax.random.normal(k2, (4,)),
        "skip": None,
    }


def _run(opt, finite=None, steps=3):
    """``steps`` jitted updates; under a gate with ``finite`` unless it is None."""

    def update(g, s):
        if finite is None:
            return opt.update(g, s, PARAMS)
        gate = StepGate(jnp.asarray(finite))
        u, new = opt.update(g, s, PARAMS, gate=gate)
        return u, gate.keep(new, s)

    state, outs = opt.init(PARAMS), []
    for t in range(steps):
        u, state = jax.jit(update)(_grads(t), state)
        outs.append(u)
    return outs, state


KWARGS = [{}, {"nesterov": True}, {"mu_dtype": jnp.bfloat16}, {"eps_root": 1e-8, "b2": 0.99}]


@pytest.mark.parametrize("kw", KWARGS)
@pytest.mark.parametrize("finite", [None, True])
def test_scale_by_adam_is_optaxs_bit_for_bit(kw, finite):
    want = _run(optax.scale_by_adam(**kw))
    got = _run(galorax.scale_by_adam(**kw), finite)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_adamw_is_optaxs_bit_for_bit_and_skips():
    want = _run(optax.adamw(0.1, weight_decay=0.01))
    got = _run(galorax.adamw(0.1, weight_decay=0.01), True)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    opt = galorax.adamw(0.1)
    _, kept = _run(opt, False)
    jax.tree.map(np.testing.assert_array_equal, kept, opt.init(PARAMS))


@pytest.mark.parametrize("kw", KWARGS)
def test_a_skipped_step_leaves_the_moments_and_count(kw):
    opt = galorax.scale_by_adam(**kw)
    _, kept = _run(opt, False)
    jax.tree.map(np.testing.assert_array_equal, kept, opt.init(PARAMS))


def _donated_temp(opt, grads, gated: bool) -> int:
    params = jax.tree.map(lambda g: jax.ShapeDtypeStruct(g.shape, g.dtype), grads)
    state = jax.eval_shape(opt.init, params)

    def step(params, state, grads, finite):
        if gated:
            gate = StepGate(finite)
            u, new = opt.update(grads, state, gate=gate)
            keep = gate.keep
        else:
            u, new = opt.update(grads, state)
            keep = lambda n, o: jax.tree.map(lambda a, b: jnp.where(finite, a, b), n, o)  # noqa: E731
        return keep(optax.apply_updates(params, u), params), keep(new, state)

    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads, jnp.asarray(True))
    return lowered.compile().memory_analysis().temp_size_in_bytes


def test_a_gated_step_needs_no_copy_of_the_moments():
    """After optax's Adam a select reads each new moment twice and keeps the old one: XLA
    copies the moments; under the gate the update reads the selected moments."""
    grads = {"w": jax.ShapeDtypeStruct((64, 256, 256), jnp.bfloat16)}
    moment = 64 * 256 * 256 * 2  # one bf16 moment
    gated = _donated_temp(galorax.scale_by_adam(), grads, True)
    plain = _donated_temp(optax.scale_by_adam(), grads, False)
    assert plain - gated >= moment, (gated, plain, moment)
