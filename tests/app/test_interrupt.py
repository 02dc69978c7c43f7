"""Ctrl-C lands on step boundaries: delivered (a real SIGINT) at each point of the step loop
by an observer of its points (``on_point``, passed to the run), it leaves a checkpoint
labelled with the optimizer's count and a resume bit-identical to an uninterrupted run; a
second Ctrl-C aborts and writes nothing more."""

import json
import os
import signal

import jax
import numpy as np
import pytest
from test_train import make_text_dir, micro_config

from galorax.app import cli
from galorax.app import config as C
from galorax.app import interrupt as I
from galorax.app import model as M
from galorax.app import train as T
from galorax.app.checkpoint import Checkpointer, load_params

TIMINGS = ("step_s", "tokens_per_s", "cpu_s")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_text_dir(tmp_path_factory.mktemp("data") / "texts")


def _cfg(data):
    return micro_config(data, steps=6, checkpoint_every=3, update_proj_gap=2)


@pytest.fixture(scope="module")
def full(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("full") / "run"
    return out, T.train(_cfg(data), out, progress=False, adamw_ref=False)


def _sigint_at(*targets):
    """An ``on_point`` observer that sends this process a SIGINT at each
    ``(point, step[, nth occurrence])`` of the loop."""
    seen: dict[tuple[str, int], int] = {}
    pending = [t if len(t) == 3 else (*t, 1) for t in targets]

    def hook(point, step):
        seen[point, step] = seen.get((point, step), 0) + 1
        for t in [t for t in pending if t == (point, step, seen[point, step])]:
            pending.remove(t)
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs before this returns

    return hook


def _records(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMINGS} for x in lines]


def _counts(out, step, cfg):
    """The optimizer's step counts in checkpoint ``step``."""
    run = C.resolve_config(cfg)
    from galorax.app.optimizers import run_optimizer

    params = M.abstract_params(M.get_preset("micro"))
    state = jax.eval_shape(run_optimizer(run, params).init, params)
    ck = Checkpointer(out / "checkpoints")
    try:
        _, restored = ck.restore(step, params, state)
    finally:
        ck.close()
    flat = jax.tree_util.tree_flatten_with_path(restored)[0]
    return {int(v) for k, v in flat if jax.tree_util.keystr(k).endswith(".count")}


def _latest(out):
    ck = Checkpointer(out / "checkpoints")
    try:
        return ck.latest_step()
    finally:
        ck.close()


def _assert_resumes_like(full, out):
    full_out, full_summary = full
    resumed = T.train(C.TrainConfig(), out, resume=True, progress=False, adamw_ref=False)
    assert resumed["steps_done"] == 6
    assert resumed["val_loss"] == full_summary["val_loss"]
    template = M.abstract_params(M.get_preset("micro"))
    a, b = load_params(full_out, template), load_params(out, template)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert _records(out) == _records(full_out)


@pytest.mark.parametrize(
    "point, step, label",
    [
        ("start", 1, 2),  # before step 2's batch: step 2 completes
        ("stepped", 1, 2),  # step 2 returned, not yet counted: the mislabel
        ("counted", 2, 2),
        ("logged", 2, 2),
        ("saving", 3, 3),  # during the periodic save at 3
        ("saved", 3, 3),
    ],
)
def test_interrupt_saves_the_step_it_landed_on(point, step, label, data, full, tmp_path):
    out = tmp_path / "run"
    hook = _sigint_at((point, step))
    with pytest.raises(I.Interrupted, match=f"checkpoint saved at step {label}"):
        T.train(_cfg(data), out, progress=False, adamw_ref=False, on_point=hook)
    assert _latest(out) == label
    assert _counts(out, label, _cfg(data)) == {label}  # label == the optimizer's count
    steps = [r["step"] for r in _records(out) if "loss" in r]
    assert steps == list(range(1, label + 1))  # every step's line, none past the checkpoint
    assert (out / "loss_curve.png").exists() and not (out / "summary.json").exists()
    _assert_resumes_like(full, out)


def test_second_ctrl_c_aborts_without_writing(data, full, tmp_path):
    out = tmp_path / "run"
    # Twice within step 5: abort; the periodic checkpoint 3 stays the latest.
    hook = _sigint_at(("stepped", 4), ("stepped", 4, 1))
    with pytest.raises(KeyboardInterrupt) as e:
        T.train(_cfg(data), out, progress=False, adamw_ref=False, on_point=hook)
    assert not isinstance(e.value, I.Interrupted)
    assert _latest(out) == 3 and sorted(p.name for p in (out / "checkpoints").iterdir()) == ["3"]
    assert not (out / "loss_curve.png").exists()
    _assert_resumes_like(full, out)


def test_second_ctrl_c_during_the_interrupt_save(data, full, tmp_path):
    out = tmp_path / "run"
    hook = _sigint_at(("logged", 4), ("saving", 4))
    with pytest.raises(KeyboardInterrupt):
        T.train(_cfg(data), out, progress=False, adamw_ref=False, on_point=hook)
    assert _latest(out) == 3
    _assert_resumes_like(full, out)


def test_cli_reports_the_interrupt_in_one_line(data, tmp_path, capsys):
    from test_cli import MICRO

    out = tmp_path / "run"
    hook = _sigint_at(("counted", 2))
    argv = ["train", *MICRO, "--data", str(data), "--out", str(out), "--lr", "0.01"]
    assert cli.main(argv, on_point=hook) == 130
    err = capsys.readouterr().err.strip().splitlines()
    saved = "galorax train: interrupted: checkpoint saved at step 2; continue with --resume"
    assert err[-1] == f"{saved} --out {out}"
    assert _latest(out) == 2


def test_interrupt_before_the_first_step_leaves_no_run(data, tmp_path):
    out = tmp_path / "runs" / "new"
    hook = _sigint_at(("ready", 0))
    with pytest.raises(I.Interrupted, match="nothing saved"):
        T.train(_cfg(data), out, progress=False, adamw_ref=False, on_point=hook)
    assert not (tmp_path / "runs").exists()  # no empty run folder left behind


def test_compare_resume_continues_each_run_from_its_checkpoint(data, tmp_path, capsys):
    from test_cli import MICRO

    runs = ["--runs", "adamw:lr=1e-2", "galore:lr=1e-2"]
    common = ["compare", *MICRO, "--data", str(data), *runs]
    assert cli.main([*common, "--out", str(tmp_path / "full")]) == 0
    # Interrupted in the second run (galore) at step 2: its checkpoint 2 is kept ...
    hook = _sigint_at(("counted", 2, 2))
    assert cli.main([*common, "--out", str(tmp_path / "cut")], on_point=hook) == 130
    assert "--resume" in capsys.readouterr().err.strip().splitlines()[-1]
    # ... and --resume reuses adamw and continues galore from step 2, not from 0.
    assert cli.main([*common, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    text = capsys.readouterr().out
    assert "reusing" in text and "at step 2/6" in text

    def losses(name):
        results = json.loads((tmp_path / name / "compare.json").read_text())
        return {r["label"]: r["summary"]["val_loss"] for r in results}

    assert losses("cut") == losses("full")


def test_interrupt_in_the_last_step_just_finishes(data, full, tmp_path):
    out = tmp_path / "run"
    hook = _sigint_at(("counted", 6))
    s = T.train(_cfg(data), out, progress=False, adamw_ref=False, on_point=hook)
    assert s["steps_done"] == 6 and s["val_loss"] == full[1]["val_loss"]
    assert (out / "summary.json").exists()
