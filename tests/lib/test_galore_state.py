"""Tests of galorax.galore_state: the update one leaf at a time (``leafwise_base``) equals
the update over the whole tree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galorax

PARAMS = {
    "stack": jnp.ones((4, 16, 8)),
    "w": jnp.ones((16, 8), jnp.bfloat16),
    "b": jnp.ones(8),
    "frozen": jnp.ones((8, 8)),
}
DIMS = {
    "stack": galorax.GaLoreDimensionNumbers((1,), (2,)),
    "w": galorax.GaLoreDimensionNumbers((0,), (1,)),
    "b": None,
    "frozen": None,
}
CHUNKS = galorax.Chunking(max_bytes=2 * 16 * 8 * 4)  # the stack in chunks
CONFIGS = {
    "default": {},
    "int8P-residual": {"projector_bits": 8, "residual": True},
    "8bit-base": {
        "base_optimizer": galorax.scale_by_adam_8bit(
            min_8bit_size=16, block_size=32, chunking=CHUNKS
        )
    },
    "rms-base": {"base_optimizer": optax.scale_by_rms()},
    "keep-svd": {"moments": "keep", "subspace": "svd"},
}


def _grads(t: int):
    keys = jax.random.split(jax.random.key(t), len(PARAMS))
    return {
        k: jax.random.normal(key, p.shape).astype(p.dtype)
        for (k, p), key in zip(PARAMS.items(), keys, strict=True)
    }


def _run(leafwise: bool, kw: dict):
    tx = galorax.scale_by_galore(
        rank=2,
        update_proj_gap=2,
        weight_dimension_numbers=DIMS,
        leafwise_base=leafwise,
        chunking=CHUNKS,
        **kw,
    )
    mask = {"stack": True, "w": True, "b": True, "frozen": False}
    tx = optax.masked(tx, mask)  # a masked leaf: nothing to update, its entries stay
    state, update, outs = tx.init(PARAMS), jax.jit(tx.update), []
    for t in range(5):  # refreshes at steps 0, 2, 4 (staggered)
        u, state = update(_grads(t), state)
        outs.append(u)
    return outs, state


@pytest.mark.parametrize("name", list(CONFIGS))
def test_leafwise_update_equals_the_tree_update(name):
    whole, leafwise = _run(False, CONFIGS[name]), _run(True, CONFIGS[name])
    assert jax.tree.structure(whole) == jax.tree.structure(leafwise)

    def close(a, b):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    jax.tree.map(close, leafwise, whole)
