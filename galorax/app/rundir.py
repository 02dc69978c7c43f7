"""A run's output directory: checking ``--out`` against ``--resume``/``--overwrite``
(:func:`prepare_out_dir`), atomic writes (:func:`atomic_write_text`) and the metrics log
``metrics.jsonl`` (:class:`MetricsLog`).

Example:
    >>> import pathlib, tempfile
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "run"
    >>> prepare_out_dir(out, resume=False, overwrite=False).commit()
    >>> with MetricsLog(out / "metrics.jsonl") as log:
    ...     log.append({"step": 1, "loss": 2.5})
    ...     log.append({"step": 2, "loss": 2.0})
    >>> MetricsLog(out / "metrics.jsonl").keep_until(1)
    >>> MetricsLog(out / "metrics.jsonl").read()
    [{'step': 1, 'loss': 2.5}]
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import shutil
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

from galorax.app.config import UsageError

#: Files a run writes into ``--out``; ``--overwrite`` removes these and nothing else.
RUN_FILES = ("config.json", "metrics.jsonl", "loss_curve.png", "summary.json", "checkpoints")


def atomic_write_text(path: pathlib.Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file: never a half-written file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_path(path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A temporary path to write ``path``'s new content to; it replaces ``path`` when the
    block ends without error, and is removed otherwise (a full disk leaves the old file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: pathlib.Path, obj: Any) -> None:
    """``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _holds_run(out: pathlib.Path) -> bool:
    return any((out / f).exists() for f in RUN_FILES)


def check_out_dir(out: pathlib.Path, resume: bool, overwrite: bool) -> None:
    """Checks ``--out`` against ``--resume``/``--overwrite`` without touching anything.

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
    elif _holds_run(out) and not overwrite:
        raise UsageError(
            f"--out {out} already holds a run; pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out"
        )


#: The hidden folder of ``--out`` an :class:`Aside` moves an old run into (``<prefix><pid>``).
ASIDE_PREFIX = ".galorax-replaced-"
#: Inside it: what was there (written before anything moves), locked by the owner process
#: while it runs (``flock``: the kernel drops a dead process's lock, SIGKILL included).
_MANIFEST = ".galorax-aside.json"
#: The folder's suffix once the new run is under way (its deletion may not have finished).
_DONE = ".done"


class Aside:
    """A run's files moved out of the way while a new run starts in their place.

    The named entries of ``out`` are renamed into a hidden folder of ``out``
    (:data:`ASIDE_PREFIX`; nothing is copied or deleted); :meth:`commit` deletes them once
    the new run is under way, :meth:`restore` puts them back (and removes what the new run
    wrote, and the folders it created) if it fails first. A process killed in between
    leaves the folder; :func:`recover_asides` finishes the job at the next command.

    Args:
        out: The directory.
        names: The entries to move (those that exist).
    """

    def __init__(self, out: pathlib.Path, names: Sequence[str]) -> None:
        self.out = out
        self.names = tuple(names)
        self.created = [p for p in (out, *out.parents) if not p.exists()]
        out.mkdir(parents=True, exist_ok=True)
        self.folder = out / f"{ASIDE_PREFIX}{os.getpid()}"
        self.done = False
        self._lock: int | None = None
        present = [n for n in self.names if (out / n).exists()]
        if not present:
            return
        self.folder.mkdir()
        try:  # the manifest first: a kill while moving leaves a folder that says what was where
            write_json(self.folder / _MANIFEST, {"pid": os.getpid(), "names": present})
            self._lock = os.open(self.folder / _MANIFEST, os.O_RDONLY)
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until commit/restore
            for name in present:
                os.rename(out / name, self.folder / name)
        except BaseException:
            self.restore()
            raise

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    def commit(self) -> None:
        """The new run is under way: deletes the old files (idempotent)."""
        if not self.done:
            self.done = True
            _finish(self.folder)
            self._unlock()

    def restore(self) -> None:
        """The new run failed before it was under way: the old files come back."""
        if self.done:
            return
        self.done = True
        self._unlock()
        if self.folder.exists():
            _put_back(self.out, self.folder, self.names)
        else:  # nothing was there: what the new run wrote goes
            for name in self.names:
                _remove(self.out / name)
        for d in self.created:  # deepest first: only the folders this run made, if empty
            with contextlib.suppress(OSError):
                d.rmdir()


def _finish(folder: pathlib.Path) -> None:
    """Deletes a set-aside run: renamed ``.done`` first, so a kill while deleting is told
    from a kill before the new run was under way."""
    if folder.exists():
        done = folder.with_name(folder.name + _DONE)
        shutil.rmtree(done, ignore_errors=True)  # a stale one of a reused pid
        os.rename(folder, done)
        shutil.rmtree(done, ignore_errors=True)


def _manifest(folder: pathlib.Path) -> dict[str, Any]:
    try:
        found = json.loads((folder / _MANIFEST).read_text())
        return found if isinstance(found, dict) else {}
    except (OSError, ValueError):
        return {}  # killed while writing it: nothing was moved yet


def _put_back(out: pathlib.Path, folder: pathlib.Path, names: Sequence[str]) -> None:
    """Moves the old run in ``folder`` back into ``out``, in place of the new run's files.

    Entries the manifest lists but the folder lacks were never moved (a kill while moving):
    they stay. The new run's others are removed.
    """
    old = set(_manifest(folder).get("names", []))
    for name in names:
        if (folder / name).exists() or (name not in old and (folder / _MANIFEST).exists()):
            _remove(out / name)
        if (folder / name).exists():
            os.rename(folder / name, out / name)
    (folder / _MANIFEST).unlink(missing_ok=True)
    folder.rmdir()


def _owner_alive(folder: pathlib.Path) -> bool:
    """Whether the process that set ``folder`` aside still runs: it holds the manifest's
    lock (no pid to be reused, in this process too). No manifest: it died before writing it."""
    try:
        fd = os.open(folder / _MANIFEST, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # and with it the lock just taken
    return False


def _new_checkpoint(out: pathlib.Path, folder: pathlib.Path) -> bool:
    """Whether ``out/checkpoints`` is the new run's (the old one's is aside, or it had none)
    and holds a finished checkpoint (orbax's ``<step>`` folder)."""
    ckpts = out / "checkpoints"
    old = _manifest(folder).get("names")
    theirs = (folder / "checkpoints").exists() or (old is not None and "checkpoints" not in old)
    return theirs and ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())


def recover_asides(
    out: pathlib.Path, names: Sequence[str] = RUN_FILES, log: Callable[[str], None] = print
) -> None:
    """Finishes an ``--overwrite`` whose process was killed (SIGKILL, power loss).

    An :class:`Aside` folder of ``out`` whose owner is gone means: the new run was not
    under way yet (the old run comes back, what the new one wrote goes), or its deletion
    was cut short (``.done``, or the new run already holds a finished checkpoint: the
    deletion is finished). One line says which. A live owner's folder is left alone.

    Example:
        >>> import pathlib, tempfile
        >>> recover_asides(pathlib.Path(tempfile.mkdtemp()))  # nothing set aside: no-op
    """
    if not out.is_dir():
        return
    for folder in sorted(out.glob(ASIDE_PREFIX + "*")):
        if not folder.is_dir():
            continue
        if folder.name.endswith(_DONE):
            shutil.rmtree(folder, ignore_errors=True)
            log(f"{out}: removed {folder.name}, the rest of a run --overwrite replaced")
        elif _owner_alive(folder):
            log(f"note: {folder} holds a run set aside by a process still running; left as is")
        elif _new_checkpoint(out, folder):
            _finish(folder)
            log(
                f"{out}: removed {folder.name}, the run an interrupted --overwrite replaced "
                "(the new run had saved a checkpoint)"
            )
        else:
            _put_back(out, folder, names)
            log(
                f"{out}: restored the run an interrupted --overwrite had set aside in "
                f"{folder.name} (its process is gone; the new run had not started)"
            )


def _remove(p: pathlib.Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def prepare_out_dir(out: pathlib.Path, resume: bool, overwrite: bool) -> Aside | None:
    """Checks ``--out`` (:func:`check_out_dir`) and makes it ready for a new run.

    Returns:
        None for ``resume``; otherwise an :class:`Aside` holding the old run's files (if
        any): the caller commits it once the new run is under way, or restores it.
    """
    check_out_dir(out, resume, overwrite)
    if resume:
        return None
    return Aside(out, RUN_FILES)  # only our own files: anything else the user put there stays


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
    """A run's ``--out``: where its files go, and whether this process writes them
    (process 0 alone under ``jax.distributed``; checkpoints: every process its shards).

    Attributes:
        path: The directory.
        primary: Whether this process writes the run's files.
        metrics: Its :class:`MetricsLog`.
        aside: An old run moved aside for this one (``--overwrite``) or the folders this
            run created, until :meth:`started`; None once committed, or for a resume.
        on_started: Called once, when the run is under way.
    """

    def __init__(self, path: pathlib.Path, primary: bool = True) -> None:
        self.path = path
        self.primary = primary
        self.metrics = MetricsLog(path / "metrics.jsonl", writer=primary)
        self.aside: Aside | None = None
        self.on_started: Callable[[], None] | None = None

    def write_json(self, name: str, obj: Any) -> None:
        """Writes ``name`` (primary process only), atomically."""
        if self.primary:
            write_json(self.path / name, obj)

    def config_json(self) -> dict[str, Any]:
        """``config.json``: the run's settings, model and provenance."""
        try:
            return dict(json.loads((self.path / "config.json").read_text()))
        except (ValueError, TypeError) as e:
            raise UsageError(
                f"{self.path}/config.json is not a galorax config ({e}); restore it, or start "
                "the run over with --overwrite"
            ) from None

    def saved_config(self) -> dict[str, Any]:
        """``config.json``'s ``train`` section: the saved run's settings."""
        train = self.config_json().get("train")
        if not isinstance(train, dict):
            raise UsageError(
                f"{self.path}/config.json has no 'train' settings; restore it, or start the "
                "run over with --overwrite"
            )
        return train

    def started(self) -> None:
        """The run is under way: an old run set aside for it is deleted."""
        if self.aside is not None:
            self.aside.commit()
            self.aside = None
        if self.on_started is not None:
            self.on_started()
            self.on_started = None

    def abandon(self) -> None:
        """The run failed before it was under way: the old run (if any) comes back, and
        what this one wrote is removed."""
        if self.aside is not None:
            self.aside.restore()
            self.aside = None
