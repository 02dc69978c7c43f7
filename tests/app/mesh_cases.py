"""The application on 8 simulated CPU devices: sharded checkpoints and ``galorax train`` on a
mesh; run by ``tests/app/test_mesh.py`` (the library's sharding: ``tests/lib/sharding_cases.py``).

Not collected by the main pytest run (XLA_FLAGS must be set before JAX starts):
``XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest tests/app/mesh_cases.py``.
"""

from __future__ import annotations

import json
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_train import make_text_dir, micro_config

import galorax
from galorax import sharding
from galorax.app import cli
from galorax.app import train as T
from galorax.app.checkpoint import Checkpointer, with_shardings
from galorax.dimension_numbers import GaLoreDimensionNumbers as Dims

pytestmark = pytest.mark.skipif(jax.device_count() != 8, reason="needs 8 (simulated) devices")

SPECS = {"w": P("fsdp"), "s": P(None, "fsdp"), "b": P()}
DIMS = {"w": Dims(0, 1), "s": Dims(1, 2), "b": None}


def _params() -> dict:
    return {"w": jnp.ones((64, 32)), "s": jnp.ones((2, 32, 16)), "b": jnp.ones(16)}


def _sharded_state(mesh):
    """Params and a GaLore state (plus PRNG keys) on ``mesh``, every leaf filled at random."""
    shard = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
    params = jax.device_put(_params(), shard)
    tx = galorax.scale_by_galore(
        rank=4, update_proj_gap=2, subspace="randomized", weight_dimension_numbers=DIMS
    )
    state = jax.jit(tx.init, out_shardings=sharding.state_shardings(tx, params))(params)
    rng = np.random.default_rng(0)

    def fill(x):  # no update to compile: random contents, the init's shardings
        values = (
            rng.normal(size=x.shape) * 100 if x.dtype.kind == "f" else rng.integers(9, size=x.shape)
        )
        return jax.device_put(values.astype(x.dtype), x.sharding)

    params, state = jax.tree.map(fill, (params, state))
    keys = jax.device_put(jax.random.split(jax.random.key(7), 8), NamedSharding(mesh, P("data")))
    return params, (state, {"keys": keys}), tx


def _leaves_equal(a, b, same_sharding=True):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert x.dtype == y.dtype
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        if same_sharding:
            assert x.sharding.is_equivalent_to(y.sharding, x.ndim), (x.sharding, y.sharding)


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_sharded_checkpoint_roundtrip(tmp_path, explicit):
    """Sharded params and GaLore state come back bit-identical, on the same shardings."""
    mesh = sharding.make_mesh("data=2,fsdp=4", explicit=explicit)
    params, state, _ = _sharded_state(mesh)
    assert params["w"].sharding.spec == P("fsdp")
    ck = Checkpointer(tmp_path)
    ck.save(3, params, state, {"step": 3})
    # Abstract targets carrying the shardings (what a resuming run has before any array).
    targets = jax.tree.map(lambda x: x.sharding, (params, state))
    p_t, s_t = with_shardings(jax.eval_shape(lambda: (params, state)), targets)
    p2, s2 = ck.restore(3, p_t, s_t)
    _leaves_equal(params, p2)
    _leaves_equal(state, s2)
    # The live state as the template works too.
    _leaves_equal(state, ck.restore(3, params, state)[1])
    ck.close()


def test_sharded_checkpoint_restores_onto_other_shardings(tmp_path):
    """Saved on data=2,fsdp=4; restored fully sharded over 8 devices and replicated."""
    params, state, tx = _sharded_state(sharding.make_mesh("data=2,fsdp=4", explicit=False))
    ck = Checkpointer(tmp_path)
    ck.save(3, params, state, {"step": 3})
    other = sharding.make_mesh("fsdp=8", explicit=False)
    p_shard = {k: NamedSharding(other, s) for k, s in SPECS.items()}
    s_shard = (
        sharding.state_shardings(tx, _params(), other, SPECS),
        {"keys": NamedSharding(other, P("fsdp"))},
    )
    abstract = jax.eval_shape(lambda: (params, state))
    p2, s2 = ck.restore(3, *with_shardings(abstract, (p_shard, s_shard)))
    _leaves_equal(params, p2, same_sharding=False)
    _leaves_equal(state, s2, same_sharding=False)
    assert p2["w"].sharding.mesh.shape["fsdp"] == 8 and p2["w"].sharding.spec == P("fsdp")
    assert s2[0].projector["w"].sharding.spec == P("fsdp")
    replicated = NamedSharding(other, P())
    p3 = ck.restore_params(3, with_shardings(jax.eval_shape(lambda: params), replicated))
    _leaves_equal(params, p3, same_sharding=False)
    assert p3["w"].sharding.is_fully_replicated
    ck.close()


def _metrics(out):
    timing = ("step_s", "cpu_s", "tokens_per_s")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in timing} for x in lines]


def test_train_cli_on_mesh(tmp_path):
    """``galorax train --mesh data=2,fsdp=4``, split by --stop-after/--resume: the unsharded
    run's losses."""
    # The resume loads the split run's compiled programs (test_train's cache directory).
    jax.config.update("jax_compilation_cache_dir", str(tempfile.gettempdir()) + "/galorax-test-xla")
    data = make_text_dir(tmp_path / "data")
    settings = dict(steps=4, batch_size=8, eval_every=2, checkpoint_every=2, update_proj_gap=2)
    T.train(micro_config(data, **settings), tmp_path / "one", progress=False, adamw_ref=False)
    one = _metrics(tmp_path / "one")
    flags = "--preset micro --steps 4 --batch-size 8 --seq-len 32 --eval-batches 1 "
    flags += f"--eval-every 2 --checkpoint-every 2 --update-proj-gap 2 --no-progress --data {data}"

    def train(out, *extra):
        assert cli.main(["train", *flags.split(), "--out", str(tmp_path / out), *extra]) == 0
        return _metrics(tmp_path / out)

    # Split in two: steps 1-2, then --resume for steps 3-4 (both on the mesh).
    split = train("split", "--mesh", "data=2,fsdp=4", "--stop-after", "2")
    assert len(split) == 3
    resumed = ["train", "--resume", "--out", str(tmp_path / "split"), "--no-progress"]
    assert cli.main(resumed) == 0
    mesh = _metrics(tmp_path / "split")
    assert len(mesh) == 5
    for a, b in zip(one, mesh, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-4, err_msg=f"step {a['step']}: {k}")
    config = (tmp_path / "split" / "config.json").read_text()
    assert '"mesh": "data=2,fsdp=4"' in config


def test_per_layer_updates_on_mesh(tmp_path):
    """``--per-layer-updates`` on ``--mesh data=2,fsdp=4``: the losses of the unsharded
    plain step (clipping off: the per-layer step clips by the previous step's norm)."""
    data = make_text_dir(tmp_path / "data")
    settings = dict(steps=4, batch_size=8, eval_every=2, update_proj_gap=2, grad_clip=0.0)
    T.train(micro_config(data, **settings), tmp_path / "plain", progress=False, adamw_ref=False)
    cfg = micro_config(data, per_layer_updates=True, mesh="data=2,fsdp=4", **settings)
    T.train(cfg, tmp_path / "mesh", progress=False, adamw_ref=False)
    plain, mesh = _metrics(tmp_path / "plain"), _metrics(tmp_path / "mesh")
    assert len(mesh) == len(plain) == 5
    for a, b in zip(plain, mesh, strict=True):
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-4, err_msg=f"step {a['step']}: {k}")


@pytest.mark.parametrize("optimizer", ["apollo", "apollo-mini8bit"])
def test_apollo_on_mesh(optimizer, tmp_path):
    """``galorax train --optimizer apollo|apollo-mini8bit --mesh data=2,fsdp=4``: the
    unsharded run's losses (state FSDP-sharded as GaLore's; a re-draw at step 3)."""
    data = make_text_dir(tmp_path / "data")
    settings = dict(steps=4, batch_size=8, eval_every=2, update_proj_gap=2, optimizer=optimizer)
    T.train(micro_config(data, **settings), tmp_path / "one", progress=False, adamw_ref=False)
    cfg = micro_config(data, mesh="data=2,fsdp=4", **settings)
    T.train(cfg, tmp_path / "mesh", progress=False, adamw_ref=False)
    one, mesh = _metrics(tmp_path / "one"), _metrics(tmp_path / "mesh")
    assert len(mesh) == len(one) == 5
    for a, b in zip(one, mesh, strict=True):
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-4, err_msg=f"step {a['step']}: {k}")
