"""Non-finite gradients in ``galorax train``: the step is skipped (params and optimizer
state unchanged), counted in the metrics and the summary, and too many in a row stop the
run with one line (exit 1)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import make_text_dir, micro_config

from galorax.app import cli
from galorax.app import config as C
from galorax.app import data as D
from galorax.app import model as M
from galorax.app import train as T
from galorax.app.optimizers import run_optimizer
from galorax.app.step import make_train_step

QUIET = dict(progress=False, adamw_ref=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_text_dir(tmp_path_factory.mktemp("data") / "texts")


def _poison(monkeypatch, steps):
    """Makes the loss (so every gradient) NaN at the given steps (1-based, as logged)."""
    sample, loss_fn = D.sample_batch, M.loss_fn

    def sample_batch(tokens, batch_size, seq_len, seed, step):
        batch = sample(tokens, batch_size, seq_len, seed, step)
        if step + 1 in steps:  # ``step`` counts the steps done before this one
            batch = batch.copy()
            batch[0, 0] = -1  # a marker no real token has
        return batch

    def poisoned_loss(params, batch, cfg, remat=False):
        # Exactly 1.0 elsewhere: the other steps' loss and gradients are unchanged.
        return loss_fn(params, batch, cfg, remat) * jnp.where(batch[0, 0] < 0, jnp.nan, 1.0)

    monkeypatch.setattr(D, "sample_batch", sample_batch)
    monkeypatch.setattr(M, "loss_fn", poisoned_loss)


def _records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_nonfinite_step_leaves_params_and_state_unchanged(data, monkeypatch):
    _poison(monkeypatch, {1})
    run = C.resolve_config(micro_config(data))
    mcfg = M.get_preset("micro", 256)
    params = M.init_params(mcfg, jax.random.key(0))
    opt = run_optimizer(run, params)
    state = opt.init(params)
    step = make_train_step(mcfg, opt)
    corpus = np.arange(2000) % 256
    bad, good = D.sample_batch(corpus, 4, 32, 0, 0), D.sample_batch(corpus, 4, 32, 0, 1)
    before = jax.tree.map(np.asarray, (params, state))
    p, s, loss = step(params, state, bad)
    assert not np.isfinite(float(loss))
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves((p, s)), strict=True):
        np.testing.assert_array_equal(x, np.asarray(y))
    _, s2, loss2 = step(p, s, good)  # (the schedule's first lr is 0: moments move)
    assert np.isfinite(float(loss2))
    moved = [
        not np.array_equal(x, np.asarray(y))
        for x, y in zip(jax.tree.leaves(before[1]), jax.tree.leaves(s2), strict=True)
    ]
    assert any(moved)


def test_skipped_step_is_counted_and_training_continues(data, monkeypatch, tmp_path):
    _poison(monkeypatch, {2})
    logged = []
    summary = T.train(micro_config(data), tmp_path / "r", log=logged.append, **QUIET)
    recs = [r for r in _records(tmp_path / "r") if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert [bool(r.get("skipped")) for r in recs] == [False, True] + [False] * 4
    assert all(np.isfinite(r["loss"]) for r in recs if not r.get("skipped"))
    # The optimizer did not count the skipped step: its schedule resumes where it was.
    assert recs[2]["lr"] == recs[1]["lr"] != recs[0]["lr"]
    assert summary["skipped_steps"] == 1 and summary["steps_done"] == 6
    assert np.isfinite(summary["val_loss"]) and summary["val_loss"] < summary["val_loss_start"]
    assert sum("step 2: loss or gradients not finite" in m for m in logged) == 1


def test_resume_across_a_skipped_step_is_bit_identical(data, monkeypatch, tmp_path):
    _poison(monkeypatch, {2})
    full = T.train(micro_config(data), tmp_path / "full", **QUIET)
    T.train(micro_config(data), tmp_path / "split", stop_after=3, **QUIET)
    resumed = T.train(C.TrainConfig(), tmp_path / "split", resume=True, **QUIET)
    assert resumed["val_loss"] == full["val_loss"] and resumed["skipped_steps"] == 1

    def strip(out):
        keep = ("step", "loss", "lr", "val_loss", "skipped")
        return [{k: r[k] for k in keep if k in r} for r in _records(out)]

    assert json.dumps(strip(tmp_path / "full")) == json.dumps(strip(tmp_path / "split"))


def test_too_many_in_a_row_stop_with_one_line(data, monkeypatch, tmp_path, capsys):
    k = T.MAX_NONFINITE_IN_A_ROW
    _poison(monkeypatch, set(range(3, 3 + k)))
    out = tmp_path / "r"
    argv = ["train", "--preset", "micro", "--data", str(data), "--steps", str(k + 5)]
    argv += ["--batch-size", "4", "--seq-len", "32", "--eval-batches", "1", "--out", str(out)]
    assert cli.main([*argv, "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"not finite at {k} steps in a row (3-{k + 2}): stopped; lower --lr" in err[0]
    recs = [r for r in _records(out) if "loss" in r]
    assert recs[-1]["step"] == k + 2 and all(r.get("skipped") for r in recs[2:])


@pytest.mark.parametrize("poisoned", ["w", "b"])
def test_skip_nonfinite_keeps_8bit_base_moments(poisoned):
    """8-bit base moments (a QuantizedArray per leaf: codes and scales) are kept whole for a
    non-finite leaf; the other leaves step exactly as without the guard."""
    import galorax
    from galorax.quantization import QuantizedArray

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"w": jax.random.normal(keys[0], (32, 16)), "b": jax.random.normal(keys[1], (16,))}
    grads = [jax.tree.map(lambda p, i=i: p * (0.5 + i), params) for i in range(3)]
    bad = {**grads[2], poisoned: grads[2][poisoned].at[0].set(jnp.nan)}
    kw = dict(
        rank=4, update_proj_gap=10, base_optimizer=galorax.scale_by_adam_8bit(min_8bit_size=16)
    )
    on, off = galorax.scale_by_galore(skip_nonfinite=True, **kw), galorax.scale_by_galore(**kw)
    state = on.init(params)
    assert isinstance(state.base_optimizer_state.mu["w"], QuantizedArray)
    on_update, off_update = jax.jit(on.update), jax.jit(off.update)  # not op by op
    for g in grads[:2]:
        _, state = on_update(g, state, params)
    out, after = on_update(bad, state, params)
    ref_out, ref = off_update(bad, state, params)
    for name in ("mu", "nu"):
        kept = getattr(after.base_optimizer_state, name)
        jax.tree.map(
            np.testing.assert_array_equal,
            kept[poisoned],
            getattr(state.base_optimizer_state, name)[poisoned],
        )
        other = "b" if poisoned == "w" else "w"
        want = getattr(ref.base_optimizer_state, name)[other]
        jax.tree.map(np.testing.assert_array_equal, kept[other], want)
    np.testing.assert_array_equal(out[poisoned], np.zeros_like(out[poisoned]))
    np.testing.assert_array_equal(out["b" if poisoned == "w" else "w"], ref_out[other])
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((out, after)))
    # Unguarded, the NaN reaches the quantized moments (what the guard prevents).
    assert not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(ref))


def _checkpoint(out, step, run):
    """Checkpoint ``step``'s metadata and the optimizer's step counts in its state."""
    from galorax.app.checkpoint import Checkpointer

    params = M.abstract_params(M.get_preset("micro", 256))
    state = jax.eval_shape(run_optimizer(run, params).init, params)
    ck = Checkpointer(out / "checkpoints")
    try:
        _, restored = ck.restore(step, params, state)
        meta = ck.restore_meta(step)
    finally:
        ck.close()
    flat = jax.tree_util.tree_flatten_with_path(restored)[0]
    return meta, {int(v) for k, v in flat if jax.tree_util.keystr(k).endswith(".count")}


@pytest.mark.parametrize("interrupt", [False, True])
def test_checkpoint_label_is_the_count_plus_the_skipped_steps(
    interrupt, data, monkeypatch, tmp_path
):
    """The invariant with skipped steps: label = steps done = optimizer count + skipped
    (the count, like the rest of the state, does not move on a skipped step), recorded in
    the checkpoint's metadata; an interrupt's checkpoint keeps it too."""
    import os
    import signal

    from galorax.app import interrupt as I

    _poison(monkeypatch, {2})
    cfg, out = micro_config(data), tmp_path / "r"
    if interrupt:  # Ctrl-C once step 4 is counted: checkpoint 4 (3 updates, 1 skipped)

        def hook(point, step):
            if (point, step) == ("counted", 4):
                os.kill(os.getpid(), signal.SIGINT)

        with pytest.raises(I.Interrupted, match="checkpoint saved at step 4"):
            T.train(cfg, out, **QUIET, on_point=hook)
        labels = [4]
    else:
        T.train(cfg, out, **QUIET)
        labels = [3, 6]
    run = C.resolve_config(cfg)
    for label in labels:
        meta, counts = _checkpoint(out, label, run)
        assert meta["step"] == label and meta["skipped"] == 1
        assert counts == {label - 1} == {meta["optimizer_count"]}
