"""Data: the embedded stdlib corpus, the user's files, batches."""

import os
import pathlib

import numpy as np
import pytest

from galorax import data as D


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GALORAX_CACHE", str(tmp_path / "cache"))


def test_stdlib_corpus_is_deterministic_split_by_file_and_cached(tmp_path):
    files = D.stdlib_files()
    assert files == sorted(files) and sum(f.stat().st_size for f in files) <= D.STDLIB_MAX_BYTES
    a = D.load_stdlib_corpus()
    assert a.n_val_files >= 1 and a.n_train_files > 10 * a.n_val_files
    assert len(a.train) > 1_000_000 and len(a.val) > 10_000
    cached = list((tmp_path / "cache").glob("stdlib-*.npz"))
    assert len(cached) == 1
    assert not list((tmp_path / "cache").glob("*.tmp"))  # atomic write left no temp file
    b = D.load_stdlib_corpus()  # from the cache
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.val, b.val)
    # Split by file: no validation document appears in the training stream.
    val_docs = bytes(a.val).split(D.DOC_SEPARATOR)
    assert all(len(d) < 200 or d not in bytes(a.train) for d in val_docs[:3])


def test_corrupt_cache_is_rebuilt(tmp_path):
    a = D.load_stdlib_corpus()
    (path,) = (tmp_path / "cache").glob("stdlib-*.npz")
    path.write_bytes(b"garbage")
    b = D.load_stdlib_corpus()
    np.testing.assert_array_equal(a.train, b.train)


def test_user_directory(tmp_path):
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    for i in range(5):
        (d / "sub" / f"{i}.txt").write_text(f"document {i} " * 20)
    (d / "blob.bin").write_bytes(b"\x00\x01" * 100)  # binary files are skipped
    c = D.load_corpus(str(d))
    assert c.n_train_files + c.n_val_files == 5 and c.n_val_files == 1
    assert 0 not in set(bytes(c.train).replace(D.DOC_SEPARATOR, b""))


def test_user_file(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("x" * 1000)
    c = D.load_corpus(str(f))
    assert len(c.train) == 950 and len(c.val) == 50


@pytest.mark.parametrize("kind", ["missing", "empty_file", "empty_dir"])
def test_bad_paths(tmp_path, kind):
    p = tmp_path / "x"
    if kind == "empty_file":
        p.write_text("")
    elif kind == "empty_dir":
        p.mkdir()
    with pytest.raises(D.DataError, match="--data"):
        D.load_corpus(str(p))


def test_check_fits(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("x" * 100)
    with pytest.raises(D.DataError, match="--seq-len"):
        D.check_fits(D.load_corpus(str(f)), seq_len=64)


def test_batches_are_pure_functions_of_seed_and_step():
    toks = np.arange(1000, dtype=np.uint8)
    a = D.sample_batch(toks, 4, 16, seed=0, step=3)
    np.testing.assert_array_equal(a, D.sample_batch(toks, 4, 16, seed=0, step=3))
    assert not np.array_equal(a, D.sample_batch(toks, 4, 16, seed=0, step=4))
    assert a.shape == (4, 17) and a.dtype == np.int32
    e = D.eval_batches(toks, 2, 16, 3)
    assert len(e) == 3 and e[0].shape == (2, 17)


def test_hf_fixture(tmp_path):
    pytest.importorskip("datasets")
    f = tmp_path / "c4.jsonl"
    f.write_text(
        "".join(f'{{"text": "doc {i} " }}\n'.replace("doc", "doc" * 30) for i in range(40))
    )
    c = D.load_hf_corpus("json", data_files=str(f))
    assert c.n_train_files + c.n_val_files == 40


def test_hf_without_datasets(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(D.DataError, match="pip install datasets"):
        D.load_corpus("hf:allenai/c4:en")


def test_cache_dir_env(tmp_path):
    assert D.cache_dir() == pathlib.Path(os.environ["GALORAX_CACHE"])
