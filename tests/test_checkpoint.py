"""Checkpoints: exact round trips, atomicity, bit-identical resume."""

import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_train import make_text_dir, micro_config

from galorax.app import config as C
from galorax.app import train as T
from galorax.app.checkpoint import Checkpointer, load_params


def _equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_roundtrip_of_awkward_states(tmp_path):
    """optax.contrib.galore's zero-size placeholders, MaskedNode and PRNG keys survive."""
    params = {"w": jnp.ones((8, 4)), "b": jnp.arange(4.0), "h": jnp.ones((2, 3), jnp.bfloat16)}
    opt = optax.chain(
        optax.contrib.galore(1e-2, rank=2),
        optax.masked(optax.adam(1e-3), {"w": True, "b": False, "h": True}),
    )
    state = opt.init(params)
    state = (state, {"key": jax.random.key(3)})
    grads = jax.tree.map(jnp.ones_like, params)
    inner, _ = opt.update(grads, state[0], params)
    ck = Checkpointer(tmp_path)
    ck.save(7, params, state, {"step": 7})
    p2, s2 = ck.restore(7, params, jax.eval_shape(lambda: state))
    _equal(params, p2)
    _equal(state, s2)
    ck.close()
    assert not list(tmp_path.rglob("*.pkl")) and not list(tmp_path.rglob("*pickle*"))


def test_leftover_tmp_dir_is_ignored(tmp_path):
    import shutil

    params = {"w": jnp.arange(6.0)}
    ck = Checkpointer(tmp_path)
    ck.save(3, params, (), {"step": 3})
    ck.close()
    # What a process killed while writing step 6 leaves: a partial temporary directory.
    partial = tmp_path / "6.orbax-checkpoint-tmp-1234567"
    shutil.copytree(tmp_path / "3", partial)
    shutil.rmtree(partial / "params")
    ck = Checkpointer(tmp_path)
    assert ck.latest_step() == 3
    p, _ = ck.restore(3, params, ())
    _equal(params, p)
    ck.close()


def test_kill_during_saves_leaves_a_readable_checkpoint(tmp_path):
    script = textwrap.dedent(f"""
        import jax.numpy as jnp
        from galorax.app.checkpoint import Checkpointer
        ck = Checkpointer({str(tmp_path)!r}, max_to_keep=3)
        for step in range(1, 10_000):
            ck.save(step, {{"w": jnp.full((256, 256), float(step))}}, (), {{"step": step}})
            print(step, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    proc.stdout.readline()  # at least one finished save
    time.sleep(0.7)
    proc.kill()
    proc.wait()
    ck = Checkpointer(tmp_path)
    step = ck.latest_step()
    assert step is not None
    p, _ = ck.restore(step, {"w": jax.ShapeDtypeStruct((256, 256), jnp.float32)}, ())
    assert float(p["w"][0, 0]) == step
    ck.close()


@pytest.mark.parametrize(
    "optimizer, extra",
    [
        ("galore", {}),
        ("adamw", {}),
        ("galore", {"residual": "channel", "adaptive": True, "state_bits": 8}),
        ("adamw", {"state_bits": 8}),
    ],
    ids=["galore", "adamw", "galore-residual-adaptive-8bit", "adamw-8bit"],
)
def test_resume_is_bit_identical(optimizer, extra, tmp_path):
    data = make_text_dir(tmp_path / "data")
    cfg = micro_config(
        data, optimizer=optimizer, steps=6, checkpoint_every=3, update_proj_gap=2, **extra
    )
    full = T.train(cfg, tmp_path / "full", progress=False, adamw_ref=False)
    part = T.train(cfg, tmp_path / "split", progress=False, adamw_ref=False, stop_after=3)
    assert part["steps_done"] == 3
    before = (tmp_path / "split" / "config.json").read_text()
    # A flag that would change the trajectory is refused, and nothing is touched.
    with pytest.raises(C.UsageError, match=r"--lr 0.5 \(saved: 0.01\)"):
        T.train(C.TrainConfig(), tmp_path / "split", resume=True, flags={"lr": 0.5})
    assert (tmp_path / "split" / "config.json").read_text() == before
    resumed = T.train(
        C.TrainConfig(),
        tmp_path / "split",
        resume=True,
        progress=False,
        adamw_ref=False,
        flags={"lr": 0.01, "optimizer": optimizer, "eval_every": 3},  # agree / free to change
    )
    assert resumed["steps_done"] == 6
    assert resumed["val_loss"] == full["val_loss"]

    from galorax.app import model as M

    template = M.abstract_params(M.get_preset("micro"))
    _equal(load_params(tmp_path / "full", template), load_params(tmp_path / "split", template))
    la = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    lb = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    strip = [
        lambda s: {
            k: v
            for k, v in __import__("json").loads(s).items()
            if k not in ("step_s", "tokens_per_s", "cpu_s")
        }
    ][0]
    assert [strip(x) for x in la] == [strip(x) for x in lb]
