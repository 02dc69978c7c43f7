"""Data: the embedded stdlib corpus, the user's files, batches."""

import json
import os
import pathlib
import sys
import types

import numpy as np
import pytest

from galorax.app import data as D


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


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    """``datasets``, offline, with its cache in tmp_path: nothing is downloaded or left behind."""
    datasets = pytest.importorskip("datasets")
    hf_home = tmp_path / "hf"
    for var, value in [
        ("HF_DATASETS_OFFLINE", "1"),
        ("HF_HUB_OFFLINE", "1"),
        ("HF_HOME", str(hf_home)),
        ("HF_DATASETS_CACHE", str(hf_home / "datasets")),
    ]:
        monkeypatch.setenv(var, value)
    # datasets reads these at import, which an earlier test may have done already.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf_home / "datasets", raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    return datasets


def _docs(prefix, n):
    return [f"{prefix} document {i}: " + "lorem ipsum " * (5 + i % 7) for i in range(n)]


def _write_jsonl(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t, "url": "x"}) + "\n" for t in texts))
    return path


def _split_docs(tokens):
    return [d.decode() for d in bytes(tokens).split(D.DOC_SEPARATOR)]


def test_hf_json_file_offline(hf_offline, tmp_path):
    texts = _docs("jsonl", 40)
    f = _write_jsonl(tmp_path / "corpus.jsonl", texts)
    c = D.load_corpus(f"hf:json:{f}")
    assert c.source.startswith(f"hf:json:{f} (38 train / 2 val docs")
    assert (c.n_train_files, c.n_val_files, c.vocab_size) == (38, 2, 256)
    assert c.train.dtype == np.uint8 and c.val.dtype == np.uint8
    train, val = _split_docs(c.train), _split_docs(c.val)
    assert sorted(train + val) == sorted(texts) and not set(train) & set(val)
    assert train == [t for t in texts if t not in val]  # stream order is kept
    # The same corpus through the function, and training batches from it.
    d = D.load_hf_corpus("json", data_files=str(f))
    np.testing.assert_array_equal(c.train, d.train)
    np.testing.assert_array_equal(c.val, d.val)
    D.check_fits(c, seq_len=16)
    b = D.sample_batch(c.train, batch_size=4, seq_len=16, seed=0, step=0)
    assert b.shape == (4, 17) and b.dtype == np.int32 and b.max() < c.vocab_size
    assert D.eval_batches(c.val, 2, 16, 2)[0].shape == (2, 17)
    assert not list((tmp_path / "hf").rglob("*.arrow"))  # streamed: nothing materialized


@pytest.mark.parametrize("form", ["builder_dir", "local_dir"])
def test_hf_local_dir_uses_its_validation_split(hf_offline, tmp_path, form):
    d = tmp_path / "c4_fixture"
    train_texts, val_texts = _docs("train", 12), _docs("validation", 3)
    _write_jsonl(d / "train.jsonl", train_texts)
    _write_jsonl(d / "validation.jsonl", val_texts)
    c = D.load_corpus(f"hf:json:{d}" if form == "builder_dir" else f"hf:{d}")
    assert _split_docs(c.train) == train_texts and _split_docs(c.val) == val_texts
    assert (c.n_train_files, c.n_val_files) == (12, 3)
    assert "validation split" in c.source


def test_hf_takes_the_first_documents_of_each_split(hf_offline, tmp_path):
    d = tmp_path / "big"
    train_texts, val_texts = _docs("train", 100), _docs("validation", 30)
    _write_jsonl(d / "train.jsonl", train_texts)
    _write_jsonl(d / "validation.jsonl", val_texts)
    c = D.load_hf_corpus("json", data_files=str(d), max_docs=40)
    assert _split_docs(c.train) == train_texts[:40]
    assert _split_docs(c.val) == val_texts[: 40 // D.VAL_EVERY]
    # A byte budget stops at the document that reaches it.
    budget = sum(len(t) for t in train_texts[:10])
    c = D.load_hf_corpus("json", data_files=str(d), max_bytes=budget)
    assert _split_docs(c.train) == train_texts[:10]
    assert _split_docs(c.val) == val_texts[:1]  # budget / VAL_EVERY: the first document


def test_hf_text_builder_skips_blank_lines(hf_offline, tmp_path):
    f = tmp_path / "lines.txt"
    f.write_text("".join(f"line {i} of the corpus\n\n" for i in range(25)))
    c = D.load_corpus(f"hf:text:{f}")
    assert (c.n_train_files, c.n_val_files) == (24, 1)
    assert "" not in _split_docs(c.train) + _split_docs(c.val)


def test_hf_wrong_text_field(hf_offline, tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps({"content": f"doc {i}"}) + "\n" for i in range(5)))
    with pytest.raises(D.DataError, match="no 'text' field.*content"):
        D.load_corpus(f"hf:json:{f}")


@pytest.mark.parametrize("spec", ["hf:json:{tmp}/missing.jsonl", "hf:{tmp}/missing_dir"])
def test_hf_missing_fixture_path(tmp_path, spec):
    with pytest.raises(D.DataError, match="no such"):
        D.load_corpus(spec.format(tmp=tmp_path))


@pytest.mark.parametrize("spec", ["hf:", "hf:json"])
def test_hf_incomplete_spec(spec):
    with pytest.raises(D.DataError, match="--data"):
        D.load_corpus(spec)


@pytest.mark.parametrize("spec", ["c4", "hf:allenai/c4:en", "hf:json:{tmp}/c.jsonl"])
def test_hf_without_datasets(monkeypatch, tmp_path, spec):
    f = _write_jsonl(tmp_path / "c.jsonl", _docs("x", 3))
    assert f.exists()
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(D.DataError, match=r'pip install -e "\.\[c4\]"') as e:
        D.load_corpus(spec.format(tmp=tmp_path))
    assert "pip install datasets" not in str(e.value)  # one install command: the README's


class _Stream:
    """An endless streamed split: reading it must stop at the budget."""

    def __init__(self, split):
        self.split = split

    def __iter__(self):
        i = 0
        while True:
            yield {"text": f"{self.split} doc {i} " + "c4 " * 300, "url": "u"}
            i += 1


def test_c4_streams_train_and_validation_of_allenai_c4_en(monkeypatch):
    calls = []

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return {"train": _Stream("train"), "validation": _Stream("validation")}

    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(D, "HF_MAX_BYTES", 100_000)
    c = D.load_corpus("c4")
    assert calls == [("allenai/c4", "en", {"streaming": True})]
    train, val = _split_docs(c.train), _split_docs(c.val)
    assert [t.split()[:3] for t in train] == [["train", "doc", str(i)] for i in range(len(train))]
    assert all(v.startswith("validation doc") for v in val) and len(val) >= 1
    doc = len(train[0])
    assert 100_000 <= sum(map(len, train)) < 100_000 + 2 * doc  # bounded by the budget
    assert 100_000 // D.VAL_EVERY <= sum(map(len, val)) < 100_000 // D.VAL_EVERY + 2 * doc
    assert c.source.startswith("hf:allenai/c4:en (") and "validation split" in c.source


def test_hf_dataset_that_cannot_be_loaded(monkeypatch):
    def load_dataset(path, name=None, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)")

    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(D.DataError, match="could not load the dataset.*Couldn't reach"):
        D.load_corpus("c4")


def test_cache_dir_env(tmp_path):
    assert D.cache_dir() == pathlib.Path(os.environ["GALORAX_CACHE"])
