"""Sharded GaLore on 8 simulated CPU devices; run by ``tests/lib/test_sharding.py`` (the
application on a mesh: ``tests/app/mesh_cases.py``).

Not collected by the main pytest run (XLA_FLAGS must be set before JAX starts):
``XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest tests/lib/sharding_cases.py``.
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
    # (r, n): the weight leaves n whole, so the moments take the rows' mesh axis there
    # (replicated, every device would hold all of them).
    assert specs.base_optimizer_state.mu["w"] == P(None, "fsdp")
    assert specs.projector["s"] == P(None, "fsdp")
    assert specs.base_optimizer_state.mu["b"] == P()
    # Columns sharded (as FSDP shards a square attention weight): the projector's rows
    # take the columns' mesh axis; where they do not divide an axis, the rank axis.
    cols = {"q": jnp.ones((32, 32)), "odd": jnp.ones((64, 6))}
    specs = sharding.state_partition_specs(
        galorax.scale_by_galore(rank=4), cols, {"q": P(None, "fsdp"), "odd": P("fsdp")}, mesh
    )
    assert specs.projector["q"] == P("fsdp")
    assert specs.base_optimizer_state.mu["q"] == P(None, "fsdp")
    # (r, 6): 6 columns do not split over 4 devices, the rank axis (4) does.
    assert specs.base_optimizer_state.mu["odd"] == P("fsdp")
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


@pytest.mark.parametrize("method", ["householder", "gram", "svd"])
def test_decompositions_run_matrix_by_matrix_on_shared_cpu_pool(method):
    """Simulated CPU devices share one thread pool, where jaxlib's batched LAPACK kernels
    can wait on each other forever: each matrix of a batch is factorized on its own."""
    from galorax import subspace

    mesh = sharding.make_mesh("data=8", explicit=False)
    y = jax.random.normal(jax.random.key(3), (4, 64, 8))
    y = jax.device_put(y, NamedSharding(mesh, P()))
    if method == "svd":
        fn = lambda y: subspace.exact_basis(y, 4)  # noqa: E731
    else:
        fn = lambda y: subspace.orthonormalize(y, method)  # noqa: E731
    text = jax.jit(fn).lower(y).compile().as_text()
    calls = re.findall(r"= \(?f32\[([\d,]+)\][^\n]*custom_call_target=\"lapack_", text)
    assert calls, "no LAPACK call found"
    assert all(c.count(",") <= 1 for c in calls), calls  # (m, n) operands, no batch axis
    want = np.stack([fn(x) for x in np.asarray(y)])  # one matrix: the plain call
    span = lambda q: q @ np.swapaxes(q, -1, -2)  # noqa: E731  (bases equal up to signs)
    np.testing.assert_allclose(span(np.asarray(jax.jit(fn)(y))), span(want), atol=1e-5)


def _stacked_run(mesh, subspace, refresh_axes, steps=3):
    """A stacked (4, 32, 16) weight replicated on ``mesh``; every step refreshes."""
    rep = NamedSharding(mesh, P())
    params = {"s": jax.device_put(jnp.ones((4, 32, 16)), rep)}
    tx = galorax.scale_by_galore(
        rank=4,
        update_proj_gap=1,
        subspace=subspace,
        weight_dimension_numbers={"s": Dims(1, 2)},
        refresh_axes=refresh_axes,
    )
    state = jax.jit(tx.init, out_shardings=sharding.state_shardings(tx, params))(params)
    grads = [
        jax.device_put(jax.random.normal(jax.random.key(i), (4, 32, 16)), rep) for i in range(steps)
    ]
    update = jax.jit(tx.update).lower({"s": grads[0]}, state).compile()  # one program
    outs = []
    for g in grads:
        u, state = update({"s": g}, state)
        outs.append(np.asarray(u["s"]))
    assert state.projector["s"].sharding.is_fully_replicated
    return outs, update.as_text()


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
@pytest.mark.parametrize("subspace", ["randomized", "svd"])
def test_refresh_axes_spread_the_slices(explicit, subspace):
    """refresh_axes="data": each of 4 devices factorizes 1 of the 4 slices (not all 4), the
    updates equal the unspread ones over 3 refreshes, and one program serves every step."""
    mesh = sharding.make_mesh("data=4,fsdp=2", explicit=explicit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # svd on a mesh warns that it gathers
        whole, whole_text = _stacked_run(mesh, subspace, None)
        spread, text = _stacked_run(mesh, subspace, "data")
    for a, b in zip(whole, spread, strict=True):
        np.testing.assert_allclose(b, a, atol=2e-4, rtol=2e-3)

    def trips(hlo):  # trip counts of the compiled loops
        return set(re.findall(r"known_trip_count[^0-9]{0,12}(\d+)", hlo))

    # Simulated devices factorize matrix by matrix (subspace._per_matrix), in a loop over
    # the slices each device holds: 4 unspread; 1 spread (no loop left).
    assert "4" in trips(whole_text)
    assert "4" not in trips(text), trips(text)


def test_refresh_axes_names_a_missing_axis():
    mesh = sharding.make_mesh("data=4,fsdp=2", explicit=False)
    with pytest.raises(ValueError, match="refresh_axes names \\['model'\\]"):
        _stacked_run(mesh, "randomized", ("data", "model"), steps=1)


def test_the_gate_covers_galore_on_an_explicit_mesh():
    """Under explicit axes GaLore's body runs in auto_axes; its in-place skip still counts."""
    mesh = sharding.make_mesh("data=2,fsdp=4", explicit=True)
    shard = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
    params = jax.device_put(_params(), shard)
    tx = _tx(galorax.Randomized(qr="gram", power_iters=0))
    state = jax.jit(tx.init, out_shardings=sharding.state_shardings(tx, params))(params)
    grads = jax.device_put(_grads()[0], shard)
    covered = []

    def step(g, s, finite):
        gate = galorax.StepGate(finite)
        _, new = tx.update(g, s, gate=gate)
        covered.append(gate.covers(new))
        return gate.keep(new, s)

    kept = jax.jit(step)(grads, state, jnp.asarray(False))
    assert covered == [True]
    jax.tree.map(np.testing.assert_array_equal, kept, state)
    stepped = jax.jit(step)(grads, state, jnp.asarray(True))
    assert int(stepped.count) == 1


#: Leaves large enough for 8-bit moments: rows sharded (whole blocks per shard), and the
#: last axis sharded with blocks of 256 spanning shards of 128.
Q_SPECS = {"w": P("fsdp"), "s": P(None, None, "fsdp"), "b": P()}


def _q_params() -> dict:
    return {"w": jnp.ones((64, 512)), "s": jnp.ones((2, 32, 512)), "b": jnp.ones(16)}


def _q_run(tx, mesh, steps=3):
    params = _q_params()
    grads = [
        jax.tree.map(lambda x, i=i: jax.random.normal(jax.random.key(i), x.shape), params)
        for i in range(steps)
    ]
    if mesh is not None:
        shard = {k: NamedSharding(mesh, s) for k, s in Q_SPECS.items()}
        params, grads = jax.device_put(params, shard), jax.device_put(grads, [shard] * steps)
        state = jax.jit(tx.init, out_shardings=sharding.state_shardings(tx, params))(params)
    else:
        state = tx.init(params)
    update = jax.jit(tx.update)
    outs = []
    for g in grads:
        u, state = update(g, state, params)
        outs.append(u)
    return outs, state


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "auto"])
def test_8bit_adam_state_is_sharded_like_the_params(explicit):
    """8-bit moments were replicated on a mesh (every device held all the codes)."""
    tx = galorax.scale_by_adam_8bit()
    want, _ = _q_run(tx, None)
    mesh = sharding.make_mesh("data=2,fsdp=4", explicit=explicit)
    outs, state = _q_run(tx, mesh)
    for got, ref in zip(outs, want, strict=True):
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, atol=1e-7, err_msg=k)
    specs = sharding.state_partition_specs(tx, _q_params(), Q_SPECS, mesh)
    assert (specs.mu["w"].codes, specs.mu["w"].scales, specs.nu["s"].codes) == (
        P("fsdp"),
        P("fsdp"),
        P(None, None, "fsdp"),
    )
    for m in (state.mu, state.nu):
        assert sharding.canonical(m["w"].codes.sharding.spec) == P("fsdp")
        assert sharding.canonical(m["w"].scales.sharding.spec) == P("fsdp")
        assert sharding.canonical(m["s"].codes.sharding.spec) == P(None, None, "fsdp")
        assert m["w"].codes.addressable_shards[0].data.shape == (16, 512)  # a quarter


def test_8bit_galore_state_is_sharded():
    """8-bit low-rank moments and int8 projectors sharded on an FSDP mesh: none of the
    state's large arrays is whole on every device."""
    dims = {"w": Dims(0, 1), "s": Dims(1, 2), "b": None}
    tx = galorax.scale_by_galore(
        rank=8,
        base_optimizer=galorax.scale_by_adam_8bit(min_8bit_size=256),
        projector_bits=8,
        weight_dimension_numbers=dims,
    )
    mesh = sharding.make_mesh("data=2,fsdp=4", explicit=False)
    _, state = _q_run(tx, mesh, steps=2)
    for path, x in jax.tree_util.tree_leaves_with_path(state):
        if x.size >= 4096:
            assert x.addressable_shards[0].data.size < x.size, jax.tree_util.keystr(path)


def test_a_projector_whose_rows_do_not_split_is_sharded_over_its_rank():
    """The projected axis (266) splits over no mesh axis: the projector takes the rank's
    (256), and its int8 scales (one block per row) stay whole along their block axis."""
    mesh = sharding.make_mesh("data=2,fsdp=4", explicit=False)
    params = jax.device_put(
        {"t": jnp.ones((1, 260, 266))}, {"t": NamedSharding(mesh, P(None, "fsdp"))}
    )
    tx = galorax.scale_by_galore(
        rank=256, projector_bits=8, weight_dimension_numbers={"t": Dims(1, 2)}
    )
    state = jax.jit(tx.init, out_shardings=sharding.state_shardings(tx, params))(params)
    codes, scales = state.projector["t"].codes, state.projector["t"].scales
    assert (codes.shape, scales.shape) == ((1, 266, 256), (1, 266, 1))
    assert sharding.canonical(codes.sharding.spec) == P(None, None, "fsdp")
    assert sharding.canonical(scales.sharding.spec) == P()


def test_the_refresh_works_in_chunks_on_a_mesh():
    """A bf16 stack's refresh loops over chunks of its layers on an FSDP mesh as on one
    device (it was whole on a mesh: every device held the sketch of all the layers), with
    the same updates."""
    mesh = sharding.make_mesh("data=2,fsdp=4", explicit=False)
    params = {"s": jnp.ones((8, 64, 32), jnp.bfloat16)}
    grads = [
        {"s": jax.random.normal(jax.random.key(i), (8, 64, 32)).astype(jnp.bfloat16)}
        for i in range(3)
    ]
    tx = galorax.scale_by_galore(
        rank=4,
        update_proj_gap=1,
        subspace=galorax.Randomized(qr="gram", power_iters=0),
        weight_dimension_numbers={"s": Dims(1, 2)},
        chunking=galorax.Chunking(max_bytes=2 * 4 * 64 * 32),  # 2 of the 8 slices
    )

    def run(shard):
        p = jax.device_put(params, shard) if shard else params
        state = (
            jax.jit(tx.init, out_shardings=sharding.state_shardings(tx, p))(p)
            if shard
            else tx.init(p)
        )
        gs = [jax.device_put(g, shard) for g in grads] if shard else grads
        update = jax.jit(tx.update).lower(gs[0], state).compile()
        outs = []
        for g in gs:
            u, state = update(g, state)
            outs.append(np.asarray(u["s"], np.float32))
        return outs, update.as_text()

    want, _ = run(None)
    got, text = run({"s": NamedSharding(mesh, P(None, "fsdp"))})
    for a, b in zip(want, got, strict=True):
        np.testing.assert_allclose(b, a, atol=2e-2, rtol=2e-2)
    # Simulated devices factorize matrix by matrix (subspace._per_matrix): a loop over the
    # 2 slices of a chunk inside the loop over 4 chunks; no loop over all 8 slices at once.
    trips = set(re.findall(r"known_trip_count[^0-9]{0,12}(\d+)", text))
    assert {"2", "4"} <= trips and "8" not in trips, trips
