"""Checkpoints: exact round trips, atomicity, bit-identical resume."""

import json
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
from galorax.app.checkpoint import Checkpointer, CheckpointError, load_params


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
        ("galore", {"state_bits": 8, "per_layer_updates": True}),
        ("apollo", {}),
        ("apollo-mini", {"state_bits": 8, "per_layer_updates": True}),
    ],
    ids=[
        "galore",
        "adamw",
        "galore-residual-adaptive-8bit",
        "adamw-8bit",
        "galore-8bit-per-layer",
        "apollo",
        "apollo-mini-8bit-per-layer",
    ],
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


def _data_files(step_dir, item):
    """orbax's array data files of one item of a checkpoint, largest first."""
    files = [f for f in (step_dir / item).rglob("d/*") if f.is_file()]
    return sorted(files, key=lambda f: -f.stat().st_size)


def _flip(path, n=8):
    """Flips ``n`` bytes in the middle of ``path`` (what bit rot does)."""
    b = bytearray(path.read_bytes())
    for i in range(n):
        b[len(b) // 2 + i] ^= 0xFF
    path.write_bytes(bytes(b))


def _saved_pair(tmp_path):
    """Checkpoints 1 and 2 of random params and Adam state (2: one update later)."""
    rng = np.random.RandomState(0)
    params = {"w": jnp.asarray(rng.randn(128, 96).astype(np.float32)), "b": jnp.ones(96)}
    opt = optax.adam(1e-2)
    s1 = opt.init(params)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.randn(*x.shape), x.dtype), params)
    u, s2 = opt.update(grads, s1, params)
    p2 = optax.apply_updates(params, u)
    ck = Checkpointer(tmp_path)
    ck.save(1, params, s1, {"step": 1})
    ck.save(2, p2, s2, {"step": 2})
    return ck, (params, s1), (p2, s2)


@pytest.mark.parametrize(
    "item, found",
    # The params' largest file holds only w's data: the flip loads silently but for the
    # checksum. Flipping all opt_state files hits metadata too: the reader may fail first.
    [("params", r"is corrupt: params\['w'\] does not"), ("opt_state", r"is (corrupt|unreadable)")],
)
def test_flipped_bits_are_named_and_the_older_checkpoint_used(tmp_path, item, found):
    ck, (p1, s1), _ = _saved_pair(tmp_path)
    for f in _data_files(tmp_path / "2", item)[: 1 if item == "params" else None]:
        _flip(f)
    with pytest.raises(CheckpointError, match=rf"checkpoint 2 \({tmp_path}/2\) {found}"):
        ck.restore(2, p1, s1)
    logged = []
    step, p, s, damaged = ck.restore_latest(p1, s1, logged.append)
    assert (step, damaged) == (1, [2])
    _equal(p1, p)
    _equal(s1, s)
    assert len(logged) == 1 and "checkpoint 2" in logged[0] and "\n" not in logged[0]
    ck.set_aside(2)
    assert ck.all_steps() == [1] and (tmp_path / "2.corrupt").is_dir()
    ck.close()


def _garbage(path):
    path.write_text("{not json")


def _truncate(path):
    path.write_bytes(path.read_bytes()[:100])


def _edit_sum(step_dir):
    f = step_dir / "checksums" / "metadata"
    rec = json.loads(f.read_text())
    rec["arrays"]["params['b']"]["sum"] = "0" * 16
    f.write_text(json.dumps(rec))


DAMAGE = {
    "truncated data": lambda d: _truncate(_data_files(d, "params")[0]),
    "deleted data": lambda d: _data_files(d, "opt_state")[0].unlink(),
    "garbage _METADATA": lambda d: _garbage(d / "params" / "_METADATA"),
    "deleted _METADATA": lambda d: (d / "opt_state" / "_METADATA").unlink(),
    "garbage array metadata": lambda d: _garbage(d / "params" / "array_metadatas" / "process_0"),
    "garbage checksums": lambda d: _garbage(d / "checksums" / "metadata"),
    "edited checksum": _edit_sum,
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_damaged_checkpoint_files_give_one_line_naming_the_checkpoint(tmp_path, damage):
    ck, (p1, s1), _ = _saved_pair(tmp_path)
    DAMAGE[damage](tmp_path / "2")
    with pytest.raises(CheckpointError) as e:
        ck.restore(2, p1, s1)
    assert str(tmp_path / "2") in str(e.value) and "\n" not in str(e.value)
    assert ck.restore_latest(p1, s1, lambda m: None)[0] == 1
    ck.close()


def test_tampered_meta_is_named(tmp_path):
    ck, _, _ = _saved_pair(tmp_path)
    (tmp_path / "2" / "meta" / "metadata").write_text('{"step": 3}')
    with pytest.raises(CheckpointError, match=r"checkpoint 2 .* is corrupt: its meta differs"):
        ck.restore_meta(2)
    _garbage(tmp_path / "1" / "meta" / "metadata")
    with pytest.raises(CheckpointError, match=r"checkpoint 1 .* is unreadable: JSONDecodeError"):
        ck.restore_meta(1)
    ck.close()


def test_no_intact_checkpoint_is_one_error(tmp_path):
    ck, (p1, s1), _ = _saved_pair(tmp_path)
    for step in (1, 2):
        _flip(_data_files(tmp_path / str(step), "params")[0])
    with pytest.raises(CheckpointError, match=r"checkpoint 2 .*; no older checkpoint is intact"):
        ck.restore_latest(p1, s1, lambda m: None)
    ck.close()


def test_checkpoint_without_checksums_restores_unverified(tmp_path):
    """Checkpoints written before checksums existed still resume."""
    import shutil

    ck, (p1, s1), (p2, s2) = _saved_pair(tmp_path)
    shutil.rmtree(tmp_path / "2" / "checksums")
    p, s = ck.restore(2, p1, s1)
    _equal(p2, p)
    _equal(s2, s)
    ck.close()


def test_resume_falls_back_to_the_last_intact_checkpoint(tmp_path, capsys):
    import shutil

    from galorax.app import cli
    from galorax.app import model as M

    data = make_text_dir(tmp_path / "data")
    cfg = micro_config(data, steps=6, checkpoint_every=2, update_proj_gap=2)
    quiet = dict(progress=False, adamw_ref=False)
    full = T.train(cfg, tmp_path / "full", **quiet)
    split = tmp_path / "split"
    T.train(cfg, split, stop_after=4, **quiet)
    # Every checkpoint damaged: one line naming the newest, exit 1, nothing changed.
    shutil.copytree(split, tmp_path / "both")
    for step in (2, 4):
        _flip(_data_files(tmp_path / "both" / "checkpoints" / str(step), "params")[0])
    capsys.readouterr()
    assert cli.main(["train", "--resume", "--out", str(tmp_path / "both")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoints/4) is corrupt" in err[0], err
    assert "no older checkpoint is intact" in err[0]
    # The newest damaged: set aside, and the run continues from step 2 to the bit.
    _flip(_data_files(split / "checkpoints" / "4", "params")[0])
    logged = []
    resumed = T.train(C.TrainConfig(), split, resume=True, log=logged.append, **quiet)
    assert any("checkpoint 4" in m and "is corrupt" in m for m in logged), logged
    assert any("resuming from step 2" in m for m in logged), logged
    assert resumed["steps_done"] == 6 and resumed["val_loss"] == full["val_loss"]
    template = M.abstract_params(M.get_preset("micro"))
    _equal(load_params(tmp_path / "full", template), load_params(split, template))
    names = sorted(p.name for p in (split / "checkpoints").iterdir())
    assert names == ["4", "4.corrupt", "6"]
