"""The run directory: --out checks, the old run kept aside by --overwrite, atomic writes."""

import errno
import hashlib
import os

import pytest
from test_cli import MICRO
from test_train import make_text_dir, micro_config

from galorax.app import cli
from galorax.app import train as T
from galorax.app.config import UsageError
from galorax.app.rundir import (
    ASIDE_PREFIX,
    RUN_FILES,
    Aside,
    atomic_path,
    atomic_write_text,
    check_out_dir,
    recover_asides,
)


def snapshot(root):
    """Every file under ``root`` (hidden ones too) with its content's hash."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_text_dir(tmp_path_factory.mktemp("d") / "texts")


@pytest.fixture(scope="module")
def old_run(tmp_path_factory, data):
    """A finished run, copied fresh for each test by ``old``."""
    out = tmp_path_factory.mktemp("old") / "run"
    T.train(micro_config(data, steps=3), out, progress=False, adamw_ref=False)
    (out / "notes.txt").write_text("mine")
    return out


@pytest.fixture
def old(old_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(old_run, out)
    return out


def test_aside_restores_and_commits(tmp_path):
    out = tmp_path / "a" / "b"
    out.mkdir(parents=True)
    (out / "config.json").write_text("old")
    (out / "keep.txt").write_text("user's")
    aside = Aside(out, ["config.json", "checkpoints"])
    assert not (out / "config.json").exists()
    (out / "config.json").write_text("new")
    (out / "checkpoints").mkdir()
    aside.restore()
    assert (out / "config.json").read_text() == "old" and not (out / "checkpoints").exists()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "keep.txt"]
    aside = Aside(out, ["config.json"])
    (out / "config.json").write_text("new")
    aside.commit()
    aside.restore()  # after a commit: a no-op
    assert (out / "config.json").read_text() == "new"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "keep.txt"]


def test_aside_of_a_new_dir_removes_the_folders_it_made(tmp_path):
    aside = Aside(tmp_path / "runs" / "x", ["config.json"])
    (tmp_path / "runs" / "x" / "config.json").write_text("new")
    aside.restore()
    assert list(tmp_path.iterdir()) == []


def test_check_out_dir_touches_nothing(tmp_path):
    with pytest.raises(UsageError, match="no run to resume"):
        check_out_dir(tmp_path / "nope", resume=True, overwrite=False)
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        check_out_dir(tmp_path / "f", resume=False, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write_text(path, "old")
    with pytest.raises(OSError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


@pytest.mark.parametrize(
    "bad",
    [
        ["--data", "typo.txt"],
        ["--lr", "nan"],
        ["--mesh", "data=3"],
        ["--scale", "-1"],
        ["--seed", "-1"],
        ["--steps", "99999999999"],
        ["--grad-clip", "-1"],
    ],
    ids=lambda a: " ".join(a),
)
def test_failed_overwrite_leaves_the_old_run_byte_identical(bad, old, data, capsys):
    before = snapshot(old)
    argv = ["train", *MICRO, "--data", str(data), "--out", str(old), "--overwrite", *bad]
    try:
        status = cli.main(argv)
    except SystemExit as e:  # argparse's own checks
        status = e.code
    assert status == 2
    assert snapshot(old) == before
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_overwrite_failing_before_the_first_step_restores_the_old_run(old, data, monkeypatch):
    before = snapshot(old)

    def broken(*a, **k):
        raise RuntimeError("out of device memory")

    monkeypatch.setattr(T, "compile_run", broken)
    with pytest.raises(RuntimeError):
        T.train(micro_config(data), old, overwrite=True, progress=False, adamw_ref=False)
    assert snapshot(old) == before


def test_overwrite_replaces_once_under_way(old, data):
    s = T.train(micro_config(data, steps=4), old, overwrite=True, progress=False, adamw_ref=False)
    assert s["steps_done"] == 4 and (old / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (old / "checkpoints").iterdir()) == ["3", "4"]
    assert not [p for p in old.iterdir() if p.name.startswith(".")]


def test_failed_compare_overwrite_leaves_the_old_comparison(data, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", *MICRO, "--data", str(data), "--out", str(out), "--runs", "adamw:lr=1e-2"]
    assert cli.main(argv) == 0
    before = snapshot(out)
    for bad in (["galore:subspace=foo"], ["galore:label=../x"], ["galore:rank=0"]):
        assert cli.main([*argv[:-1], *bad, "--overwrite"]) == 2
        assert snapshot(out) == before
    assert cli.main([*argv[:-2], "--data", "typo.txt", "--overwrite"]) == 2
    assert snapshot(out) == before
    assert not (tmp_path / "x").exists()


def test_rejected_runs_leave_no_folders(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for bad in (["--lr", "nan"], ["--data", "typo.txt"], ["--mesh", "data=3"]):
        assert cli.main(["train", *MICRO, "--data", str(data), *bad]) == 2
    assert cli.main(["compare", *MICRO, "--runs", "galore:side=up"]) == 2
    assert os.listdir(tmp_path) == []


def test_resuming_a_finished_run_changes_nothing(old, capsys):
    before = snapshot(old)
    s = T.train(T.TrainConfig(), old, resume=True, progress=False)
    assert s["steps_done"] == 3 and snapshot(old) == before
    assert "nothing changed" in capsys.readouterr().out


def test_resume_of_a_run_without_a_finished_checkpoint_starts_over(old, data, capsys):
    import shutil

    ref = T.train(micro_config(data, steps=3), old.parent / "ref", progress=False, adamw_ref=False)
    for p in (old / "checkpoints").iterdir():  # as a kill during the first save leaves it
        shutil.rmtree(p)
    (old / "summary.json").unlink()
    stale = old / "checkpoints" / "3.orbax-checkpoint-tmp-123"
    (stale / "params").mkdir(parents=True)
    s = T.train(T.TrainConfig(), old, resume=True, progress=False, adamw_ref=False)
    text = capsys.readouterr().out
    assert "no finished checkpoint: starting the run over" in text and "removed 3.orbax" in text
    assert s["val_loss"] == ref["val_loss"] and not stale.exists()


# ---- a SIGKILL during --overwrite: the next command finishes the job -------------------


def _orphan(aside):
    """``aside``'s folder as a killed process leaves it: its lock released by the kernel,
    nothing committed or restored (the same pid: as a reused pid would be)."""
    aside._unlock()
    return aside.folder


def _killed_overwrite(out, *, moved=None, done=False):
    """``out`` as a process SIGKILLed during ``--overwrite`` leaves it: the old run in the
    Aside folder (its owner gone), the new run's first files in place."""
    import json
    import shutil

    folder = _orphan(Aside(out, RUN_FILES))
    manifest = json.loads((folder / ".galorax-aside.json").read_text())
    for name in set(manifest["names"]) - set(moved or manifest["names"]):
        os.rename(folder / name, out / name)  # killed while moving: these never left
    if moved is None:  # the new run had begun writing
        (out / "config.json").write_text('{"train": {}}')
        (out / "metrics.jsonl").write_text('{"step": 0, "val_loss": 9.0}\n')
        (out / "checkpoints" / "1.orbax-checkpoint-tmp-7").mkdir(parents=True)
    if done:  # killed while deleting the old run, once the new one was under way
        folder = folder.rename(folder.with_name(folder.name + ".done"))
        shutil.rmtree(folder / "checkpoints")
    return folder


@pytest.mark.parametrize("command", ["resume", "overwrite", "plain"])
def test_next_command_restores_a_run_a_killed_overwrite_set_aside(command, old, data, capsys):
    before = snapshot(old)
    folder = _killed_overwrite(old)
    assert snapshot(old) != before
    argv = ["train", *MICRO, "--data", str(data), "--out", str(old)]
    if command == "resume":  # the old run is back, and finished: nothing to do
        assert cli.main(["train", "--out", str(old), "--resume", "--no-progress"]) == 0
        assert snapshot(old) == before
    elif command == "plain":  # back, and refused as any run is
        assert cli.main(argv) == 2
        assert snapshot(old) == before
    else:  # back, then replaced as asked
        assert cli.main([*argv, "--overwrite", "--steps", "3"]) == 0
        assert (old / "notes.txt").read_text() == "mine"
    out = capsys.readouterr().out.splitlines()
    said = [line for line in out if folder.name in line]
    assert len(said) == 1 and "restored the run an interrupted --overwrite" in said[0]
    assert not [p for p in old.iterdir() if p.name.startswith(".")]


def test_a_kill_while_moving_restores_what_was_moved(old):
    before = snapshot(old)
    _killed_overwrite(old, moved=["config.json", "metrics.jsonl"])
    assert not (old / "config.json").exists() and (old / "checkpoints").exists()
    logged = []
    recover_asides(old, log=logged.append)
    assert snapshot(old) == before and len(logged) == 1


@pytest.mark.parametrize("how", ["deleting", "checkpoint"])
def test_a_kill_once_the_new_run_was_under_way_finishes_the_replacement(how, old):
    folder = _killed_overwrite(old, done=how == "deleting")
    if how == "checkpoint":  # the new run saved a checkpoint; the aside was never deleted
        (old / "checkpoints" / "3").mkdir()
    new = {k: v for k, v in snapshot(old).items() if not k.startswith(".")}
    logged = []
    recover_asides(old, log=logged.append)
    assert snapshot(old) == new and not folder.exists()
    assert (
        len(logged) == 1 and "removed" in logged[0] and folder.name.split(".done")[0] in logged[0]
    )


def test_a_live_owners_aside_is_left_alone(old):
    aside = Aside(old, RUN_FILES)  # this process's: still running
    logged = []
    recover_asides(old, log=logged.append)
    assert aside.folder.exists() and len(logged) == 1 and "still running" in logged[0]
    aside.restore()


def test_a_real_sigkill_during_overwrite_is_recovered(old, data, tmp_path, capsys):
    """A real SIGKILL at the last point before the new run's first step (from ``on_point``)."""
    import signal
    import subprocess
    import sys

    before = snapshot(old)
    argv = ["train", *MICRO, "--data", str(data), "--out", str(old), "--overwrite"]
    code = (
        "import os, signal, sys; from galorax.app import cli\n"
        "hook = lambda point, step: point == 'ready' and os.kill(os.getpid(), signal.SIGKILL)\n"
        f"sys.exit(cli.main({argv!r}, on_point=hook))\n"
    )
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert [p.name for p in old.iterdir() if p.name.startswith(ASIDE_PREFIX)]
    assert snapshot(old) != before
    assert cli.main(["train", "--out", str(old), "--resume", "--no-progress"]) == 0
    assert snapshot(old) == before
    assert "restored the run an interrupted --overwrite" in capsys.readouterr().out


def test_a_killed_compare_overwrite_is_restored(data, tmp_path, capsys):
    from galorax.app.compare import COMPARE_FILES

    out = tmp_path / "cmp"
    argv = ["compare", *MICRO, "--data", str(data), "--out", str(out), "--runs", "adamw:lr=1e-2"]
    assert cli.main(argv) == 0
    before = snapshot(out)
    _orphan(Aside(out, COMPARE_FILES))  # as a SIGKILL leaves it
    (out / "runs").mkdir()  # the new comparison had begun
    capsys.readouterr()
    assert cli.main([*argv, "--resume"]) == 0
    assert "reusing" in capsys.readouterr().out  # the old runs are back, and reused
    assert {k: v for k, v in snapshot(out).items() if not k.startswith("compare.")} == {
        k: v for k, v in before.items() if not k.startswith("compare.")
    }
