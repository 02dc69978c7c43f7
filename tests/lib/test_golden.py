"""Golden updates: six steps (three refreshes) of each GaLore configuration and of 8-bit
AdamW equal the values stored from the commit before the spine redesign (78a9b82).

A guard for refactors of how the update is executed (chunks, in-place writes, gates):
the stacked bf16 leaf runs in chunks of two layers, gradients are fixed by their seeds,
and every config's summed updates must match ``golden_updates.npz`` to f32 tolerance.
Regenerate only for an intended change of the math: ``python tests/lib/test_golden.py``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galorax

GOLDEN = pathlib.Path(__file__).with_name("golden_updates.npz")
STEPS = 6  # update_proj_gap 2: refreshes at steps 0, 2 and 4
CHUNKING = galorax.Chunking(max_bytes=2 * 4 * 16 * 12)  # two f32 layers of the stack

PARAMS = {
    "layers": {"w": jnp.full((4, 16, 12), 0.1)},
    "w": jnp.full((16, 20), 0.1),
    "b": jnp.zeros(20),
}
# The stack's gradients are bf16 (so it runs in chunks): its updates are bf16 too, and a
# last-bit difference in f32 may round them one bf16 step apart (2**-8 relative).
GRAD_DTYPES = {"layers": {"w": jnp.bfloat16}, "w": jnp.float32, "b": jnp.float32}
TOLERANCE = {jnp.bfloat16: 1e-2, jnp.float32: 2e-5}


def _galore(**kw: Any) -> optax.GradientTransformation:
    return galorax.galore(
        1e-2,
        rank=4,
        update_proj_gap=2,
        weight_decay=1e-3,
        weight_dimension_numbers=galorax.dimension_numbers_from_rules,
        chunking=CHUNKING,
        **kw,
    )


CONFIGS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "plain": lambda: _galore(),
    "8bit": lambda: _galore(
        base_optimizer=galorax.scale_by_adam_8bit(
            min_8bit_size=16, block_size=32, chunking=CHUNKING
        )
    ),
    "int8P": lambda: _galore(projector_bits=8),
    "int4P-residual": lambda: _galore(projector_bits=4, residual=True),
    "residual": lambda: _galore(residual=True),
    "svd-keep": lambda: _galore(subspace="svd", moments="keep", stagger=False),
    "adaptive-skip": lambda: _galore(adaptive=True, skip_nonfinite=True),
    "adamw8bit": lambda: galorax.adamw_8bit(
        1e-2, min_8bit_size=16, block_size=32, chunking=CHUNKING
    ),
}


def _grads(t: int) -> Any:
    leaves, treedef = jax.tree.flatten(PARAMS)
    dtypes = jax.tree.leaves(GRAD_DTYPES)
    keys = jax.random.split(jax.random.key(100 + t), len(leaves))
    out = [
        jax.random.normal(k, p.shape).astype(d)
        for k, p, d in zip(keys, leaves, dtypes, strict=True)
    ]
    if t == 3:  # a non-finite gradient in one leaf: skipped where the config skips
        out[1] = out[1].at[0, 0].set(jnp.nan)
    return jax.tree.unflatten(treedef, out)


def run_config(name: str) -> dict[str, np.ndarray]:
    """The summed updates (params after the steps minus before) of config ``name``."""
    tx = CONFIGS[name]()
    params, state = PARAMS, tx.init(PARAMS)
    update = jax.jit(tx.update)
    for t in range(STEPS):
        grads = _grads(t)
        if name not in ("adaptive-skip",) and t == 3:
            grads = _grads(t + 100)  # a finite one for configs that do not skip
        u, state = update(grads, state, params)
        params = optax.apply_updates(params, u)
    diff = jax.tree.map(
        lambda a, b: np.asarray(a, np.float32) - np.asarray(b, np.float32), params, PARAMS
    )
    return {
        f"{name}/{jax.tree_util.keystr(path)}": leaf
        for path, leaf in jax.tree.leaves_with_path(diff)
    }


def per_layer_params() -> Any:
    """The tiny stacked model's weights."""
    # Random weights: constant ones give rank-1 gradients, whose rank-4 projection is
    # rounding noise that Adam normalizes to full-size steps (chaotic across programs).
    k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
    return {
        "w_in": 0.4 * jax.random.normal(k1, (6, 16)),
        "layers": {"w": 0.25 * jax.random.normal(k2, (4, 16, 16))},
        "head": 0.25 * jax.random.normal(k3, (16, 5)),
    }


def run_per_layer() -> dict[str, np.ndarray]:
    """Summed updates of a per-layer GaLore step on a tiny stacked model."""
    params = per_layer_params()
    tx = galorax.per_layer(_galore(), max_grad_norm=1.0)
    state = tx.init(params)
    step = jax.jit(
        galorax.per_layer_step(
            tx,
            lambda outer, b: jnp.tanh(b @ outer["w_in"]),
            lambda lp, h: jnp.tanh(h @ lp["w"]),
            lambda outer, h, b: jnp.mean((h @ outer["head"] - b[:, :5]) ** 2),
        )
    )
    start = params
    for t in range(STEPS):
        batch = jax.random.normal(jax.random.key(200 + t), (8, 6))
        _, params, state = step(params, state, batch)
    return {
        f"per-layer/{jax.tree_util.keystr(path)}": np.asarray(a - b)
        for (path, a), b in zip(
            jax.tree.leaves_with_path(params), jax.tree.leaves(start), strict=True
        )
    }


@pytest.mark.parametrize("name", [*CONFIGS, "per-layer"])
def test_updates_equal_the_stored_reference(name):
    got = run_per_layer() if name == "per-layer" else run_config(name)
    ref = np.load(GOLDEN)
    assert got and all(key in ref.files for key in got), sorted(got)
    for key, value in got.items():
        rel = TOLERANCE[jnp.bfloat16 if key.startswith(f"{name}/['layers']") else jnp.float32]
        if name == "per-layer":
            rel = TOLERANCE[jnp.float32]
        scale = float(np.max(np.abs(ref[key]))) or 1.0
        np.testing.assert_allclose(value, ref[key], rtol=0, atol=rel * scale, err_msg=key)


if __name__ == "__main__":
    out: dict[str, np.ndarray] = {}
    for config in CONFIGS:
        out.update(run_config(config))
    out.update(run_per_layer())
    np.savez_compressed(GOLDEN, **out)
    print(f"wrote {GOLDEN} ({len(out)} arrays)")
