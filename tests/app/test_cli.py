"""The ``galorax`` command line: train, compare, errors, its list of subcommands."""

import argparse
import errno
import os
import pathlib

import pytest
from test_train import make_text_dir

from galorax.app import cli

MICRO = [
    "--preset",
    "micro",
    "--steps",
    "6",
    "--batch-size",
    "4",
    "--seq-len",
    "32",
    "--eval-batches",
    "1",
    "--no-progress",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(make_text_dir(tmp_path_factory.mktemp("d") / "texts"))


def test_train_prints_summary(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *MICRO, "--data", data, "--out", str(out), "--lr", "0.01"]) == 0
    text = capsys.readouterr().out
    assert "optimizer state" in text and "of AdamW" in text and "tokens/s" in text
    assert (out / "loss_curve.png").exists()
    # The same --out again: refused, named flags, nothing destroyed.
    before = (out / "metrics.jsonl").read_text()
    assert cli.main(["train", *MICRO, "--data", data, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err
    assert (out / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("optimizer, rank", [("apollo", 8), ("apollo-mini", 1)])
def test_train_apollo_prints_summary_and_memory(optimizer, rank, data, tmp_path, capsys):
    """``galorax train --optimizer apollo|apollo-mini``: GaLore's summary and memory record."""
    import json

    out = tmp_path / "run"
    argv = ["train", *MICRO, "--data", data, "--out", str(out), "--optimizer", optimizer]
    assert cli.main([*argv, "--seed", "3", "--update-proj-gap", "2"]) == 0
    text = capsys.readouterr().out
    assert ["sizes", optimizer] in [line.split()[:2] for line in text.splitlines()]
    assert "of AdamW" in text and "tokens/s" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer"] == optimizer and summary["rank"] == rank  # micro's paper rank
    assert summary["val_loss"] < summary["val_loss_start"]
    assert summary["opt_state_bytes"] < summary["adamw"]["opt_state_bytes"]
    assert summary["step_memory"]["peak"] > 0 and summary["refreshes"] is None  # no SVD
    saved = json.loads((out / "config.json").read_text())["train"]
    assert saved["optimizer"] == optimizer and saved["seed"] == 3
    assert saved["rank"] == (8 if optimizer == "apollo" else None)  # APOLLO-Mini's: fixed
    assert saved["scale"] == {"apollo": 1.0, "apollo-mini": 128.0}[optimizer]


def test_train_help_lists_apollo(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "apollo-mini8bit" in text and "apollo 1, apollo-mini 128" in text  # --scale's
    assert "apollo 0.01" in text  # --lr's defaults


def test_compare_gives_the_shared_rank_to_the_runs_that_take_it():
    from galorax.app import compare
    from galorax.app.config import TrainConfig

    base = TrainConfig(rank=4, scale=2.0)
    specs = [compare.parse_spec(s) for s in ("apollo", "apollo-mini8bit", "galore:rank=8")]
    compare._check_specs(base, specs)
    cfgs = [compare._run_config(base, s, None) for s in specs]
    assert [(c.rank, c.scale) for c in cfgs] == [(4, 2.0), (None, 2.0), (8, 2.0)]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--preset", "huge"], "--preset"),
        (["--data", "/nonexistent/path"], "--data"),
        (["--resume", "--out", "/nonexistent/run"], "--resume"),
        (["--resume"], "--resume needs --out"),
    ],
)
def test_bad_inputs_exit_nonzero(argv, needle, capsys):
    assert cli.main(["train", "--no-progress", *argv]) == 2
    assert needle in capsys.readouterr().err


def test_argparse_rejects_nonsense(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--steps", "0"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["train", "--optimizer", "sgd"])
    with pytest.raises(SystemExit):
        cli.main(["train", "--adaptive", "maybe"])
    assert "--adaptive: expected true or false, got 'maybe'" in capsys.readouterr().err


def test_subcommands_are_listed_and_can_be_extended(capsys):
    assert [c.name for c in cli.SUBCOMMANDS] == ["train", "compare", "memory"]

    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--x", type=int, default=1)

    hello = cli.Subcommand("hello", "say hello", add, lambda a: print("hi", a.x) or 0)
    assert cli.main(["hello", "--x", "5"], subcommands=[*cli.SUBCOMMANDS, hello]) == 0
    assert "hi 5" in capsys.readouterr().out


def test_compare_writes_report_and_png(data, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = [
        "compare",
        *MICRO,
        "--data",
        data,
        "--out",
        str(out),
        "--runs",
        "adamw:lr=1e-2,1e10",
        "galore:lr=1e-2",
    ]
    assert cli.main(argv) == 0
    md = (out / "compare.md").read_text()
    assert (out / "compare.png").stat().st_size > 10_000
    assert "| adamw | 0.01 |" in md and "| galore | 0.01 |" in md
    assert "diverged" in md  # the absurd lr is reported, not fatal
    assert "galorax compare" in md
    capsys.readouterr()
    assert cli.main(argv) == 2  # refuses to clobber
    assert cli.main([*argv, "--resume"]) == 0  # reuses the finished runs
    assert "reusing" in capsys.readouterr().out


def test_compare_bad_spec(capsys):
    assert cli.main(["compare", "--runs", "sgd:lr=1"]) == 2
    assert "unknown optimizer" in capsys.readouterr().err
    assert cli.main(["compare", "--runs", "galore:stagger=maybe"]) == 2
    assert "'stagger=maybe': expected true or false" in capsys.readouterr().err


def _app_imports() -> dict[str, set[str]]:
    """Each galorax.app module's imports of other galorax.app modules (function-local too)."""
    import ast
    import pathlib

    app = pathlib.Path(cli.__file__).parent
    names = {p.stem for p in app.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name in names:
        found: set[str] = set()
        for node in ast.walk(ast.parse((app / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            found |= {m.split(".")[2] for m in mods if m.startswith("galorax.app.")} & names
        graph[name] = found - {name}
    return graph


def test_no_import_cycle_in_the_application():
    graph, done, path = _app_imports(), set(), []

    def visit(mod: str) -> None:
        assert mod not in path, f"import cycle: {' -> '.join(path[path.index(mod) :] + [mod])}"
        if mod in done:
            return
        path.append(mod)
        for dep in sorted(graph[mod]):
            visit(dep)
        path.pop()
        done.add(mod)

    for mod in sorted(graph):
        visit(mod)
    assert "cli" not in set().union(*graph.values())  # nothing imports the command line


def test_planner_and_library_leave_the_cli_unimported():
    import subprocess
    import sys

    code = (
        "import sys, galorax; galorax.plan_memory; import galorax.app.planner; "
        "print('galorax.app.cli' in sys.modules, 'galorax.app.train' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


MEMORY_BAD = [
    (["--max-memory", "24XB"], "--max-memory"),
    (["--config", "d_model=abc"], "--config"),
    (["--config", "foo=1"], "--config"),
    (["--config", "{bad json"], "--config"),
    (["--config", "[1, 2]"], "--config"),
    (["--config", "d_model"], "--config"),
    (["--preset", "huge"], "--preset"),
    (["--rank", "-5"], "--rank"),
    (["--rank", "0"], "--rank"),
    (["--side", "foo"], "--side"),
    (["--config", "d_model=65,n_layers=2,n_heads=2,d_ff=128"], "--config"),
    (["--config", "d_model=0,n_layers=2,n_heads=2,d_ff=128"], "--config"),
    (["--vocab-size", "0"], "--vocab-size"),
    (["--max-memory", "-3GB"], "--max-memory"),
]
COMPARE_BAD = [
    (["--runs", "galore:subspace=foo"], "subspace"),
    (["--runs", "galore:moments=bar"], "moments"),
    (["--runs", "galore:side=up"], "side"),
    (["--runs", "galore:rank=0"], "rank"),
    (["--runs", "galore:gap=0"], "gap"),
    (["--runs", "adamw:rank=4"], "rank"),
    (["--runs", "adamw", "adamw8bit:label=q", "--rank", "4"], "no run in --runs takes it"),
    (["--runs", "apollo-mini", "--rank", "4"], "--rank: no run in --runs takes it"),
    (["--runs", "apollo-mini:rank=4"], "apollo-mini has rank 1; use apollo:rank="),
    (["--runs", "apollo:moments=keep"], "apollo takes no moments; use galore:moments="),
    (["--runs", "apollo8bit:projector_bits=8"], "apollo8bit takes no projector_bits"),
    (["--runs", "adamw:subspace=svd"], "subspace"),
    (["--runs", "optax-galore:moments=keep"], "moments"),
    (["--runs", "galore:label=/x"], "label"),
    (["--runs", "galore:label=../x"], "label"),
    (["--runs", "galore:label=a/b"], "label"),
    (["--runs", "galore:label=."], "label"),
    (["--runs", "galore:lr=nan"], "--lr"),
    (["--runs", "galore:scale=-1"], "--scale"),
    (["--subspace", "svd"], "--subspace"),
    (["--runs", "galore", "galore"], "labels must differ"),
]
TRAIN_BAD = [
    (["--seed", "-1"], "--seed"),
    (["--steps", "99999999999"], "--steps"),
    (["--steps", "abc"], "--steps"),
    (["--scale", "nan"], "--scale"),
    (["--scale", "-1"], "--scale"),
    (["--weight-decay", "nan"], "--weight-decay"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--grad-clip", "-1"], "--grad-clip"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--mesh", "data=3"], "--mesh"),
    (["--data", "/nonexistent/path"], "--data"),
    (["--subspace", "foo"], "--subspace"),
    (["--optimizer", "adamw", "--subspace", "svd"], "--subspace"),
    # GaLore-only flags with AdamW: named, with the fix (only flags the user set count).
    (["--optimizer", "adamw", "--rank", "4"], "--rank applies to GaLore and APOLLO optimizers"),
    (["--optimizer", "adamw", "--scale", "0.5"], "--scale applies to GaLore and APOLLO"),
    (["--optimizer", "adamw", "--update-proj-gap", "5"], "--update-proj-gap applies"),
    (["--optimizer", "adamw8bit", "--rank", "4"], "use --optimizer galore8bit"),
    (["--optimizer", "adamw", "--rank", "4", "--scale", "1"], "--rank, --scale apply"),
    (["--optimizer", "adamw", "--moments", "keep"], "--moments applies to GaLore optimizers"),
    (["--optimizer", "adamw", "--rank", "4", "--moments", "keep"], "apply to GaLore optimizers"),
    # APOLLO: GaLore's own flags refused as for the other optimizers; APOLLO-Mini's rank is 1.
    (["--optimizer", "apollo", "--moments", "keep"], "--moments: only --optimizer galore"),
    (["--optimizer", "apollo8bit", "--projector-bits", "8"], "--projector-bits: only"),
    (["--optimizer", "apollo-mini", "--subspace", "svd"], "--subspace: only --optimizer galore"),
    (["--optimizer", "apollo", "--side", "left"], "--side: only --optimizer galore"),
    (["--optimizer", "apollo-mini", "--rank", "4"], "--rank: apollo-mini has rank 1; drop it"),
    (["--optimizer", "apollo-mini8bit", "--rank", "4"], "--rank: apollo-mini has rank 1"),
    (["--optimizer", "apollo", "--scale", "-1"], "--scale must be a positive number"),
    (["--optimizer", "adamw", "--projector-bits", "8"], "--projector-bits applies"),
    (["--optimizer", "adamw", "--state-bits", "8", "--stagger", "off"], "--stagger applies"),
    (["--warmup", "1000"], "--warmup"),
    (["--resume"], "--resume"),
    (["--init-from", "/nonexistent", "--resume", "--out", "x"], "--init-from"),
]


def _status(argv):
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


@pytest.mark.parametrize(
    "argv, needle",
    [(["memory", *a], n) for a, n in MEMORY_BAD]
    + [(["compare", *MICRO, *a], n) for a, n in COMPARE_BAD]
    + [(["train", *MICRO, *a], n) for a, n in TRAIN_BAD],
    ids=lambda x: " ".join(x) if isinstance(x, list) else None,
)
def test_every_bad_input_is_one_line_exit_2(argv, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _status(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert needle in lines[0] and lines[0].startswith(f"galorax {argv[0]}: error: ")
    assert "Traceback" not in captured.err + captured.out
    assert "--optimizer" not in lines[0] or argv[0] == "train"  # compare has no --optimizer
    assert os.listdir(tmp_path) == []  # nothing written


def _write_fails(monkeypatch, err):
    """Every directory creation under the run fails with ``err`` (root ignores chmod)."""
    real = pathlib.Path.mkdir

    def mkdir(self, *a, **k):
        if "ro" in self.parts:
            raise OSError(err, os.strerror(err), str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)


@pytest.mark.parametrize(
    "err, needle",
    [(errno.EACCES, "choose a writable --out"), (errno.EROFS, "choose a writable --out")],
)
def test_read_only_out_is_one_line_exit_1(err, needle, data, tmp_path, monkeypatch, capsys):
    _write_fails(monkeypatch, err)
    out = tmp_path / "ro" / "run"
    assert cli.main(["train", *MICRO, "--data", data, "--out", str(out)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and str(out) in lines[0]


def test_full_disk_is_one_line_exit_1_and_keeps_no_half_files(data, tmp_path, monkeypatch, capsys):
    from galorax.app import rundir

    def full(self, rec):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(rundir.MetricsLog, "append", full)
    out = tmp_path / "run"
    assert cli.main(["train", *MICRO, "--data", data, "--out", str(out)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "no space left" in lines[0]
    assert not out.exists()  # failed before it was under way: nothing left behind


def test_debug_shows_the_traceback(capsys):
    assert _status(["memory", "--config", "foo=1", "--debug"]) == 2
    assert "error: --config" in capsys.readouterr().err


def test_version_prints_the_package_version(capsys):
    import galorax

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"galorax {galorax.__version__}" == "galorax 0.1.0"
