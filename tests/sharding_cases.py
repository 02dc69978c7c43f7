"""Sharded GaLore on 8 simulated CPU devices; run by ``tests/test_sharding.py``.

Not collected by the main pytest run (XLA_FLAGS must be set before JAX starts):
``XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest tests/sharding_cases.py``.
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import galorax
from galorax import sharding
from galorax.dimension_numbers import GaLoreDimensionNumbers as Dims

pytestmark = pytest.mark.skipif(jax.device_count() != 8, reason="needs 8 (simulated) devices")

SPECS = {"w": P("fsdp"), "s": P(None, "fsdp"), "b": P()}
DIMS = {"w": Dims(0, 1), "s": Dims(1, 2), "b": None}
STEPS = 5


def _params() -> dict:
    return {"w": jnp.ones((64, 32)), "s": jnp.ones((2, 32, 16)), "b": jnp.ones(16)}


def _grads() -> list:
    p = _params()
    return [
        jax.tree.map(lambda x, i=i: jax.random.normal(jax.random.key(i), x.shape), p)
        for i in range(STEPS)
    ]


def _tx(subspace="randomized"):
    return galorax.scale_by_galore(
        rank=4, update_proj_gap=2, subspace=subspace, weight_dimension_numbers=DIMS
    )


@pytest.fixture(scope="module")
def reference():
    """Single-device updates with the same (matmul-only) orthonormalization."""
    tx = _tx(galorax.Randomized(qr="gram", power_iters=0))
    state = tx.init(_params())
    update = jax.jit(tx.update)
    outs = []
    for g in _grads():
        u, state = update(g, state)
        outs.append(u)
    return outs


def _run(mesh):
    shard = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
    params = jax.device_put(_params(), shard)
    tx = _tx(galorax.Randomized(qr="gram", power_iters=0))
    init = jax.jit(tx.init, out_shardings=sharding.state_shardings(tx, params))
    state = init(params)
    grads = [jax.device_put(g, shard) for g in _grads()]
    # One compiled program for every step: a compiled executable refuses inputs sharded
    # otherwise than it was compiled for, so this also proves no recompilation.
    update = jax.jit(tx.update).lower(grads[0], state).compile()
    outs = []
    for g in grads:
        u, state = update(g, state)
        outs.append(u)
    return outs, state, update.as_text()


def _check(outs, state, text, reference):
    for got, want in zip(outs, reference, strict=True):
        for k in want:
            np.testing.assert_allclose(got[k], want[k], atol=2e-4, rtol=2e-3, err_msg=k)
    assert sharding.canonical(state.projector["w"].sharding.spec) == P("fsdp")
    assert sharding.canonical(state.projector["s"].sharding.spec) == P(None, "fsdp")
    # No all-gather of a whole gradient matrix (64 x 32 or 32 x 16 per slice).
    for shape in re.findall(r"= f32\[([\d,]*)\]\{[^}]*\} all-gather", text):
        size = int(np.prod([int(d) for d in shape.split(",") if d]))
        assert size < 32 * 16, f"all-gather of f32[{shape}]"


def test_explicit_mesh(reference):
    mesh = sharding.make_mesh("data=2,fsdp=4", explicit=True)
    _check(*_run(mesh), reference)


def test_auto_mesh(reference):
    mesh = sharding.make_mesh("data=2,fsdp=4", explicit=False)
    _check(*_run(mesh), reference)


def test_state_specs_follow_params():
    mesh = sharding.make_mesh("data=2,fsdp=4")
    specs = sharding.state_partition_specs(_tx(), _params(), SPECS, mesh)
    assert specs.projector["w"] == P("fsdp")  # left: (m, r) like the rows
    assert specs.base_optimizer_state.mu["w"] == P()  # (r, n): n is not sharded
    assert specs.projector["s"] == P(None, "fsdp")
    assert specs.base_optimizer_state.mu["b"] == P()
    # Right projection: the projector follows the columns, the moments the rows.
    wide = {"w": jnp.ones((32, 64))}
    specs = sharding.state_partition_specs(
        galorax.scale_by_galore(rank=4), wide, {"w": P("data", "fsdp")}, mesh
    )
    assert specs.projector["w"] == P("fsdp")
    assert specs.base_optimizer_state.mu["w"] == P("data")


def test_svd_on_a_mesh_warns():
    mesh = sharding.make_mesh("data=2,fsdp=4", explicit=False)
    shard = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
    params = jax.device_put(_params(), shard)
    tx = _tx("svd")
    state = jax.jit(tx.init, out_shardings=sharding.state_shardings(tx, params))(params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jax.jit(tx.update).lower(jax.device_put(_grads()[0], shard), state)
    assert any("gathers each" in str(w.message) for w in caught)


def test_fsdp_specs_and_batch():
    mesh = sharding.make_mesh("data=2,fsdp=4")
    specs = sharding.fsdp_partition_specs(
        {"embed": jnp.zeros((256, 32)), "wq": jnp.zeros((2, 32, 48)), "n": jnp.zeros(32)}, mesh
    )
    assert specs == {"embed": P("fsdp"), "wq": P(None, None, "fsdp"), "n": P()}
    assert sharding.batch_partition_spec(mesh) == P(("data", "fsdp"))
