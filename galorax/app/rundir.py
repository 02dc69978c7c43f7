"""A run's output directory: checking ``--out`` against ``--resume``/``--overwrite``
(:func:`prepare_out_dir`), atomic writes (:func:`atomic_write_text`) and the metrics log
``metrics.jsonl`` (:class:`MetricsLog`).

Example:
    >>> import pathlib, tempfile
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "run"
    >>> prepare_out_dir(out, resume=False, overwrite=False)
    >>> with MetricsLog(out / "metrics.jsonl") as log:
    ...     log.append({"step": 1, "loss": 2.5})
    ...     log.append({"step": 2, "loss": 2.0})
    >>> MetricsLog(out / "metrics.jsonl").keep_until(1)
    >>> MetricsLog(out / "metrics.jsonl").read()
    [{'step': 1, 'loss': 2.5}]
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import IO, Any

from galorax.app.config import UsageError

#: Files a run writes into ``--out``; ``--overwrite`` removes these and nothing else.
RUN_FILES = ("config.json", "metrics.jsonl", "loss_curve.png", "summary.json", "checkpoints")


def atomic_write_text(path: pathlib.Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file: never a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: pathlib.Path, obj: Any) -> None:
    """``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _holds_run(out: pathlib.Path) -> bool:
    return any((out / f).exists() for f in RUN_FILES)


def prepare_out_dir(out: pathlib.Path, resume: bool, overwrite: bool) -> None:
    """Checks ``--out`` against ``--resume``/``--overwrite``; clears old run files if told.

    Raises:
        UsageError: ``out`` holds another run and neither flag was given, or ``--resume``
            has nothing to resume, or both flags were given.
    """
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pass one of them")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory; choose another --out")
    if resume:
        if not (out / "checkpoints").is_dir() or not (out / "config.json").exists():
            raise UsageError(
                f"--resume: {out} holds no run to resume (no config.json/checkpoints); "
                "drop --resume to start a new run there"
            )
        return
    if _holds_run(out):
        if not overwrite:
            raise UsageError(
                f"--out {out} already holds a run; pass --resume to continue it, "
                "--overwrite to replace it, or choose another --out"
            )
        for name in RUN_FILES:  # only our own files: anything else the user put there stays
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


class MetricsLog:
    """``metrics.jsonl``: one JSON record per line, appended as a run goes.

    Args:
        path: The log file.
        writer: Whether this process writes (under ``jax.distributed`` process 0 alone
            does; the others read the same file).
    """

    def __init__(self, path: pathlib.Path, writer: bool = True) -> None:
        self.path = path
        self.writer = writer
        self._file: IO[str] | None = None

    def read(self) -> list[dict[str, Any]]:
        """All records (none if the file does not exist)."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def start(self) -> None:
        """Creates the (empty) log of a new run."""
        if self.writer:
            self.path.touch()

    def keep_until(self, step: int) -> None:
        """Drops the records past ``step`` (a resumed run re-runs them), atomically."""
        recs = [r for r in self.read() if r.get("step", 0) <= step]
        if self.writer:
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in recs))

    def append(self, rec: dict[str, Any]) -> None:
        """Appends one record (flushed at once)."""
        if not self.writer:
            return
        if self._file is None:
            self._file = open(self.path, "a")  # noqa: SIM115 - closed by close()
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Closes the file (appending again reopens it)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RunDir:
    """A run's ``--out`` once prepared: where its files go, and whether this process writes
    them (process 0 alone under ``jax.distributed``; checkpoints: every process its shards).

    Attributes:
        path: The directory.
        primary: Whether this process writes the run's files.
        metrics: Its :class:`MetricsLog`.
    """

    def __init__(self, path: pathlib.Path, primary: bool = True) -> None:
        self.path = path
        self.primary = primary
        self.metrics = MetricsLog(path / "metrics.jsonl", writer=primary)

    def write_json(self, name: str, obj: Any) -> None:
        """Writes ``name`` (primary process only), atomically."""
        if self.primary:
            write_json(self.path / name, obj)

    def saved_config(self) -> dict[str, Any]:
        """``config.json``'s ``train`` section: the saved run's settings."""
        return json.loads((self.path / "config.json").read_text())["train"]
