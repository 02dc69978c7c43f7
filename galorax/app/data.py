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
from collections.abc import Iterable, Mapping
from typing import Any

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
        if not _is_text(data):  # as in a directory, where binary files are skipped
            raise DataError(f"--data {path}: a binary file, not text; pass a text file")
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


#: ``datasets``' packaged builders: ``hf:BUILDER:PATH`` reads local files with one of them.
HF_FILE_BUILDERS = ("json", "csv", "text", "parquet", "arrow")
#: Default byte budget of a ``datasets`` corpus' train split (``c4``: about 30k documents).
HF_MAX_BYTES = 64 << 20


def _hf_take(
    stream: Iterable[Mapping[str, Any]],
    label: str,
    split: str,
    text_field: str,
    max_bytes: int,
    max_docs: int | None,
) -> list[bytes]:
    """The first documents of a streamed split, up to ``max_bytes`` (or ``max_docs``)."""
    docs: list[bytes] = []
    total = 0
    if max_docs is not None and max_docs <= 0:
        return docs
    for row in stream:
        if text_field not in row:
            raise DataError(
                f"--data {label}: the {split} split has no {text_field!r} field "
                f"(its fields: {', '.join(map(str, row))}); give each record a {text_field!r}"
            )
        text = row[text_field]
        if text is None or not str(text).strip():
            continue  # empty records carry no text (as empty files are skipped)
        b = str(text).encode("utf-8")
        docs.append(b)
        total += len(b)
        if total >= max_bytes or (max_docs is not None and len(docs) >= max_docs):
            break
    return docs


def _hf_missing_path(spec: str) -> bool:
    if any(c in spec for c in "*?["):
        return False  # a glob: datasets resolves it (and says so if it matches nothing)
    return not pathlib.Path(spec).expanduser().exists()


def _hf_splits(
    splits: Any, label: str, text_field: str, max_bytes: int, max_docs: int | None
) -> tuple[list[bytes], list[bytes], str]:
    """The train and validation documents of streamed ``splits`` and how val was chosen."""
    if "train" not in splits:
        raise DataError(
            f"--data {label}: the dataset has no 'train' split (it has "
            f"{', '.join(map(str, splits)) or 'none'})"
        )
    train = _hf_take(splits["train"], label, "train", text_field, max_bytes, max_docs)
    if "validation" in splits:
        val = _hf_take(
            splits["validation"],
            label,
            "validation",
            text_field,
            max(max_bytes // VAL_EVERY, 1),
            None if max_docs is None else max(max_docs // VAL_EVERY, 1),
        )
        how = "validation split"
    else:
        if len(train) < 2:
            raise DataError(
                f"--data {label}: {len(train)} document(s), need at least two to split "
                "train/validation; add documents"
            )
        how = f"1 doc in {min(VAL_EVERY, len(train))} for val"
        train, val = _split_by_file(train)
    return train, val, how


def load_hf_corpus(
    name: str,
    config: str | None = None,
    data_files: str | None = None,
    max_bytes: int | None = None,
    text_field: str = "text",
    max_docs: int | None = None,
) -> Corpus:
    """A Hugging Face ``datasets`` corpus (the paper's C4, a Hub dataset, local files), as bytes.

    Needs the ``c4`` extra (``pip install -e ".[c4]"``). The dataset is opened with
    ``datasets.load_dataset(name, config, streaming=True)``, so nothing but the documents read
    is downloaded, and the first documents of each split are taken in stream order
    (deterministic): ``train`` up to ``max_bytes`` bytes (default ``HF_MAX_BYTES``; and
    ``max_docs`` documents, if given), ``validation``, when the dataset has that split (C4
    does), up to ``1/VAL_EVERY`` of that. A dataset without a ``validation`` split gives every
    ``VAL_EVERY``-th of its train documents to validation, as :func:`load_text_path` does with
    files. Each record's ``text_field`` is one document; records with empty text are skipped.

    Sources, as in ``datasets``:

    * a Hub dataset: ``name="allenai/c4", config="en"`` (needs network access);
    * local files through a packaged builder (``json``, ``csv``, ``text``, ``parquet``,
      ``arrow``): ``name="json", data_files="corpus.jsonl"`` (one ``{"text": ...}`` per line;
      ``text`` takes one document per line). ``data_files`` is a file, a glob, or a directory;
      in a directory, files named like ``train.jsonl`` / ``validation.jsonl`` (or in
      ``train/`` / ``validation/`` folders) become those splits;
    * a local directory of data files as ``name`` (same split naming).

    Raises:
        DataError: ``datasets`` is not installed, the local path is missing, the dataset cannot
            be loaded (offline, unknown name or config), has no ``train`` split, no
            ``text_field``, or too few documents.
    """
    label = f"hf:{name}" + (f":{data_files}" if data_files else f":{config}" if config else "")
    if data_files is not None and _hf_missing_path(data_files):
        raise DataError(f"--data {label}: no such file or directory; pass an existing path")
    if name.startswith((".", "/", "~")) and not pathlib.Path(name).expanduser().exists():
        raise DataError(f"--data {label}: no such directory; pass an existing path")
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as e:
        raise DataError(
            f'--data {label} needs the `datasets` library: pip install -e ".[c4]" (the c4 extra)'
        ) from e

    if max_bytes is None:
        max_bytes = HF_MAX_BYTES
    kwargs: dict[str, str] = {}
    if data_files is not None:
        p = pathlib.Path(data_files).expanduser()
        kwargs["data_dir" if p.is_dir() else "data_files"] = str(p)
    path = str(pathlib.Path(name).expanduser()) if name.startswith("~") else name
    try:
        splits = datasets.load_dataset(path, config, streaming=True, **kwargs)
        train, val, how = _hf_splits(splits, label, text_field, max_bytes, max_docs)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (network, offline, missing config, ...)
        raise DataError(
            f"--data {label}: could not load the dataset ({type(e).__name__}: {e}); a Hub "
            "dataset needs network access (or the Hugging Face cache), local files "
            "hf:json:PATH"
        ) from e
    if not train or not val:
        raise DataError(
            f"--data {label}: the {'train' if not train else 'validation'} split has no text"
        )
    return Corpus(
        _to_tokens(train),
        _to_tokens(val),
        f"{label} ({len(train)} train / {len(val)} val docs, {how})",
        len(train),
        len(val),
    )


def load_corpus(data: str | None = None) -> Corpus:
    """Resolves ``--data``: None, ``c4``, ``hf:NAME[:CONFIG]``, ``hf:BUILDER:PATH``, or a path.

    * None: the embedded stdlib corpus (:func:`load_stdlib_corpus`).
    * ``c4``: the paper's setting, ``allenai/c4`` config ``en`` streamed from the Hub: its
      first ``HF_MAX_BYTES`` of ``train`` and the first ``HF_MAX_BYTES / VAL_EVERY`` of
      ``validation`` (:func:`load_hf_corpus`; needs ``pip install -e ".[c4]"`` and network).
    * ``hf:NAME[:CONFIG]``: a Hugging Face Hub dataset (``hf:allenai/c4:en``), or a local
      directory of data files (``hf:./my_corpus``, with ``train.jsonl`` / ``validation.jsonl``).
    * ``hf:BUILDER:PATH`` with BUILDER one of ``json csv text parquet arrow``: local files read
      by that ``datasets`` builder, offline (``hf:json:corpus.jsonl``, one ``{"text": ...}``
      per line; PATH may be a glob or a directory).
    * anything else: a text file or a directory of them (:func:`load_text_path`).

    Raises:
        DataError: on a missing or empty source.
    """
    if data is None:
        return load_stdlib_corpus()
    if data == "c4":
        return load_hf_corpus("allenai/c4", "en")
    if data.startswith("hf:"):
        name, _, rest = data[3:].partition(":")
        if not name:
            raise DataError(f"--data {data}: name a dataset, e.g. hf:allenai/c4:en")
        if name in HF_FILE_BUILDERS:
            if not rest:
                raise DataError(f"--data {data}: name the files to read, e.g. hf:{name}:PATH")
            return load_hf_corpus(name, data_files=rest)
        return load_hf_corpus(name, rest or None)
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
