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
from galorax.app.rundir import Aside, atomic_path, atomic_write_text, check_out_dir


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
