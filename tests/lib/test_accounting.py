"""Tests of galorax.accounting: the model-agnostic planner (bytes of weights, gradients and
state for any params and transformation) and the compiled peak of a step you give it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import galorax

PARAMS = {
    "w": jax.ShapeDtypeStruct((512, 256), jnp.bfloat16),
    "b": jax.ShapeDtypeStruct((256,), jnp.float32),
}


def test_plan_memory_counts_weights_grads_and_state_of_any_optimizer():
    weights = 512 * 256 * 2 + 256 * 4
    adam = galorax.plan_memory(PARAMS, optax.adam(1e-3))
    assert (adam.weights, adam.grads, adam.projectors) == (weights, weights, 0)
    assert adam.state == 2 * weights + 4  # mu and nu in the params' dtypes, an int32 count
    assert adam.total == adam.weights + adam.grads + adam.state
    galore = galorax.plan_memory(PARAMS, galorax.galore(1e-3, rank=8))
    assert galore.projectors == 512 * 8 * 4  # one f32 (512, 8) projector
    assert galore.state < adam.state
    assert galorax.plan_memory(PARAMS, optax.sgd(0.1), grads=100).grads == 100


def test_compiled_memory_is_the_peak_of_the_step_given():
    x = jax.ShapeDtypeStruct((128, 128), jnp.float32)
    mem = galorax.compiled_memory(lambda x: (x @ x).sum(), x)
    assert mem.argument == 128 * 128 * 4
    assert mem.peak == mem.argument + mem.output - mem.alias + mem.temp
    donated = galorax.compiled_memory(lambda x: x * 2, x, donate_argnums=0)
    assert donated.alias == 128 * 128 * 4  # the output written over the donated input
