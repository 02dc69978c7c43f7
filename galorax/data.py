"""Training data: byte-level token streams from an embedded corpus, the user's files, or C4.

The default corpus needs no download: the Python standard library's own ``.py`` sources,
which every Python installation carries. Files are taken in sorted order up to a size cap,
split into train and validation *by file* (so validation text is never seen in training),
tokenized as raw bytes (vocabulary 256) and cached as one ``.npz`` in ``$GALORAX_CACHE``
(default ``~/.cache/galorax``), written atomically so that an interrupted build never leaves
a corrupt cache.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for i in range(4):
    ...     _ = (d / f"f{i}.txt").write_text("hello world " * 50)
    >>> corpus = load_corpus(str(d))
    >>> corpus.n_train_files, corpus.n_val_files, corpus.vocab_size
    (3, 1, 256)
    >>> sample_batch(corpus.train, batch_size=2, seq_len=8, seed=0, step=0).shape
    (2, 9)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import sys
import sysconfig
import tempfile

import numpy as np

#: Size cap of the embedded corpus: ~4 MiB of bytes builds in about a second.
STDLIB_MAX_BYTES = 4 << 20
#: One file in ``VAL_EVERY`` (by sorted position) goes to validation.
VAL_EVERY = 20
#: Separates documents in the token stream (a byte that never occurs in source text).
DOC_SEPARATOR = b"\x00"


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Train and validation token streams (uint8 byte ids).

    Attributes:
        train: Training tokens.
        val: Validation tokens (from files never in ``train``).
        source: Human-readable description of where the text came from.
        n_train_files: Number of documents in ``train``.
        n_val_files: Number of documents in ``val``.
        vocab_size: Size of the token vocabulary (256 for bytes).
    """

    train: np.ndarray
    val: np.ndarray
    source: str
    n_train_files: int
    n_val_files: int
    vocab_size: int = 256


class DataError(ValueError):
    """The data source is missing, empty or unusable (message says which and how to fix)."""


def cache_dir() -> pathlib.Path:
    """The cache directory: ``$GALORAX_CACHE`` or ``~/.cache/galorax``."""
    env = os.environ.get("GALORAX_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "galorax"


def _split_by_file(docs: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Every ``VAL_EVERY``-th document (at least one, if there are two) goes to validation."""
    if len(docs) < 2:
        raise DataError("need at least two files to split train/validation by file")
    every = min(VAL_EVERY, len(docs))
    val_idx = {i for i in range(len(docs)) if i % every == every // 2}
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def _to_tokens(docs: list[bytes]) -> np.ndarray:
    return np.frombuffer(DOC_SEPARATOR.join(docs), dtype=np.uint8).copy()


def _atomic_savez(path: pathlib.Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def stdlib_files(max_bytes: int = STDLIB_MAX_BYTES) -> list[pathlib.Path]:
    """The standard library's top-level ``.py`` files, sorted, up to ``max_bytes`` in total."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for f in sorted(root.glob("*.py")):
        size = f.stat().st_size
        if total + size > max_bytes:
            continue  # skip big ones, keep filling with smaller files: deterministic either way
        files.append(f)
        total += size
    return files


def load_stdlib_corpus(max_bytes: int = STDLIB_MAX_BYTES) -> Corpus:
    """The embedded default corpus (built once, then read from the cache)."""
    files = stdlib_files(max_bytes)
    if len(files) < 2:
        raise DataError("the Python standard library sources were not found; pass --data PATH")
    key = hashlib.sha256(
        repr([(f.name, f.stat().st_size) for f in files] + [sys.version, VAL_EVERY]).encode()
    ).hexdigest()[:16]
    path = cache_dir() / f"stdlib-py{sys.version_info[0]}{sys.version_info[1]}-{key}.npz"
    n_val = len(_split_by_file([b""] * len(files))[1])
    source = f"python {sys.version.split()[0]} stdlib ({len(files)} files)"
    if path.exists():
        try:
            with np.load(path) as z:
                return Corpus(z["train"], z["val"], source, len(files) - n_val, n_val)
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache (foreign or truncated): rebuild it below
    train, val = _split_by_file([f.read_bytes() for f in files])
    corpus = Corpus(_to_tokens(train), _to_tokens(val), source, len(train), len(val))
    try:
        _atomic_savez(path, train=corpus.train, val=corpus.val)
    except OSError:
        pass  # a read-only home only costs a rebuild next time
    return corpus


def _is_text(data: bytes) -> bool:
    return b"\x00" not in data[:8192]


def load_text_path(path: str) -> Corpus:
    """The user's text: one file (last 5% of bytes is validation) or a directory (split by file).

    Raises:
        DataError: the path is missing, has no text, or is too small to split.
    """
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise DataError(f"--data {path}: no such file or directory; pass an existing path")
    if p.is_file():
        data = p.read_bytes()
        if not data.strip():
            raise DataError(f"--data {path}: the file is empty; pass a file with text in it")
        cut = max(1, int(len(data) * 0.95))
        return Corpus(
            _to_tokens([data[:cut]]), _to_tokens([data[cut:]]), f"{p} (last 5% for val)", 1, 1
        )
    files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    docs = [d for d in (f.read_bytes() for f in files) if d.strip() and _is_text(d)]
    if not docs:
        raise DataError(f"--data {path}: the directory holds no text files; add some")
    if len(docs) == 1:
        data = docs[0]
        cut = max(1, int(len(data) * 0.95))
        return Corpus(_to_tokens([data[:cut]]), _to_tokens([data[cut:]]), str(p), 1, 1)
    train, val = _split_by_file(docs)
    return Corpus(
        _to_tokens(train), _to_tokens(val), f"{p} ({len(docs)} files)", len(train), len(val)
    )


def load_hf_corpus(
    name: str,
    config: str | None = None,
    data_files: str | None = None,
    max_bytes: int = 64 << 20,
    text_field: str = "text",
) -> Corpus:
    """A Hugging Face ``datasets`` corpus (e.g. the paper's C4), byte-tokenized.

    Streams the ``train`` split up to ``max_bytes``; validation is the ``validation`` split
    when the dataset has one, else every ``VAL_EVERY``-th document.

    Raises:
        DataError: ``datasets`` is not installed or the dataset cannot be loaded.
    """
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as e:
        raise DataError(f"--data hf:{name} needs `pip install datasets`") from e

    def take(split: str, budget: int) -> list[bytes]:
        ds = datasets.load_dataset(name, config, data_files=data_files, split=split, streaming=True)
        docs, total = [], 0
        for row in ds:
            b = str(row[text_field]).encode()
            docs.append(b)
            total += len(b)
            if total >= budget:
                break
        return docs

    try:
        train = take("train", max_bytes)
        try:
            val = take("validation", max(max_bytes // 20, 1))
        except (ValueError, KeyError):
            train, val = _split_by_file(train)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (network, missing config, ...)
        raise DataError(f"--data hf:{name}: could not load the dataset: {e}") from e
    if not train or not val:
        raise DataError(f"--data hf:{name}: the dataset is empty")
    return Corpus(_to_tokens(train), _to_tokens(val), f"hf:{name}", len(train), len(val))


def load_corpus(data: str | None = None) -> Corpus:
    """Resolves ``--data``: None (embedded stdlib), ``c4``, ``hf:NAME[:CONFIG]``, or a path.

    Raises:
        DataError: on a missing or empty source.
    """
    if data is None:
        return load_stdlib_corpus()
    if data == "c4":
        return load_hf_corpus("allenai/c4", "en")
    if data.startswith("hf:"):
        name, _, config = data[3:].partition(":")
        return load_hf_corpus(name, config or None)
    return load_text_path(data)


def check_fits(corpus: Corpus, seq_len: int) -> None:
    """Raises DataError if a split is shorter than one training window."""
    for split, toks in (("train", corpus.train), ("validation", corpus.val)):
        if len(toks) < seq_len + 2:
            raise DataError(
                f"the {split} split of {corpus.source} has {len(toks)} tokens, fewer than "
                f"--seq-len {seq_len} + 2; use more text or a smaller --seq-len"
            )


def sample_batch(
    tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int
) -> np.ndarray:
    """Random windows of ``seq_len + 1`` tokens, a pure function of ``(seed, step)``.

    Being stateless is what makes ``--resume`` bit-identical: no data-loader state to save.
    """
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    return np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int32)


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, n_batches: int
) -> list[np.ndarray]:
    """Fixed, evenly spaced validation windows (the same for every run and optimizer)."""
    n = batch_size * n_batches
    starts = np.linspace(0, len(tokens) - seq_len - 1, n).astype(np.int64)
    windows = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int32)
    return list(windows.reshape(n_batches, batch_size, seq_len + 1))
