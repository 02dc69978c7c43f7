"""End-to-end training on a micro config: loss falls, files written, bad inputs rejected."""

import dataclasses
import json
import pathlib
import tempfile
import warnings

import jax
import pytest

from galorax.app import config as C
from galorax.app import model as M
from galorax.app import optimizers as O
from galorax.app import report as R
from galorax.app import train as T

# Identical programs compiled by several tests (and test runs) are compiled once: the tests
# share one micro setting (6 steps, lr 1e-2) so that most runs hit this cache.
jax.config.update(
    "jax_compilation_cache_dir", str(pathlib.Path(tempfile.gettempdir()) / "galorax-test-xla")
)

WORDS = "the quick brown fox jumps over the lazy dog while a small cat sleeps".split()


def make_text_dir(path: pathlib.Path, n_files: int = 6, seed: int = 0) -> pathlib.Path:
    """A directory of repetitive (learnable) text files."""
    import random

    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(60)]
        (path / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
    return path


def micro_config(data: pathlib.Path, **kw):
    base = dict(
        preset="micro",
        steps=6,
        batch_size=4,
        seq_len=32,
        eval_batches=1,
        eval_every=3,
        checkpoint_every=3,
        data=str(data),
        optimizer="galore",
        lr=1e-2,
    )
    base.update(kw)
    return C.TrainConfig(**base)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_text_dir(tmp_path_factory.mktemp("data") / "texts")


@pytest.fixture(scope="module")
def galore_run(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("runs") / "galore"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a user's file: not a run, so not refused
    summary = T.train(micro_config(data), out, progress=False)
    return out, summary


def test_loss_decreases_and_files_written(galore_run):
    out, s = galore_run
    assert s["val_loss"] < s["val_loss_start"] - 0.5
    for f in ("config.json", "metrics.jsonl", "loss_curve.png", "summary.json", "notes.txt"):
        assert (out / f).exists(), f
    assert (out / "checkpoints" / "6").is_dir()
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 7))
    assert recs[0] == {"step": 0, "val_loss": s["val_loss_start"]}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["optimizer"] == "galore" and cfg["model"]["d_model"] == 32


def test_summary_compares_with_adamw(galore_run):
    _, s = galore_run
    ref = s["adamw"]
    assert s["opt_state_bytes"] < 0.8 * ref["opt_state_bytes"]
    assert s["step_memory"]["peak"] > 0 and ref["step_memory"]["peak"] > 0
    assert s["tokens_per_s"] > 0
    table = R.format_summary(s)
    assert "optimizer state" in table and "% of AdamW" in table and "->" in table


def test_projects_stacked_matrices_only(galore_run):
    dn = O.galore_dimension_numbers(M.abstract_params(M.get_preset("micro")))
    flat = {
        jax.tree_util.keystr(p): v
        for p, v in jax.tree_util.tree_flatten_with_path(
            dn, is_leaf=lambda x: x is None or hasattr(x, "reduction_axis")
        )[0]
    }
    projected = {k for k, v in flat.items() if v is not None}
    assert projected == {f"['layers']['{n}']" for n in M.MATRIX_NAMES}


def test_init_from_finetunes_with_fresh_optimizer(galore_run, tmp_path):
    src, first = galore_run
    other = make_text_dir(tmp_path / "other", seed=1)
    s = T.train(
        micro_config(other), tmp_path / "ft", init_from=str(src), progress=False, adamw_ref=False
    )
    assert s["init_from"] == str(src)
    assert s["val_loss_start"] < first["val_loss_start"] - 0.5  # starts from trained weights
    assert s["val_loss"] <= s["val_loss_start"]


@pytest.mark.parametrize("optimizer", ["adamw", "optax-galore"])
def test_peer_optimizers_run(optimizer, data, tmp_path):
    s = T.train(micro_config(data, optimizer=optimizer), tmp_path, progress=False, adamw_ref=False)
    assert s["val_loss"] < s["val_loss_start"]


@pytest.mark.parametrize(
    "extra",
    [
        {"residual": "matrix"},
        {"adaptive": True, "update_proj_gap": 2},
        {"state_bits": 8},
        {"optimizer": "adamw8bit"},
        {"projector_bits": 8},
        {"optimizer": "apollo", "update_proj_gap": 2},
        {"optimizer": "apollo-mini8bit", "per_layer_updates": True},
    ],
    ids=[
        "residual",
        "adaptive",
        "galore-8bit",
        "adamw8bit",
        "projector-bits",
        "apollo",
        "apollo-mini-8bit-per-layer",
    ],
)
def test_extensions_train(extra, data, tmp_path):
    import galorax

    cfg = micro_config(data, **extra)
    s = T.train(cfg, tmp_path, progress=False)
    assert s["val_loss"] < s["val_loss_start"]
    # The AdamW column is plain f32 AdamW's, whatever this run's options.
    assert 0 <= s["adamw"]["opt_state_bytes"] - 2 * s["param_bytes"] <= 64  # mu, nu, counts
    assert s["opt_state_bytes"] < s["adamw"]["opt_state_bytes"]
    opt = O.run_optimizer(C.resolve_config(cfg), M.abstract_params(M.get_preset("micro")))
    leaves = jax.tree.leaves(
        jax.eval_shape(opt.init, M.abstract_params(M.get_preset("micro"))),
        is_leaf=galorax.quantization.is_quantized,
    )
    assert any(galorax.quantization.is_quantized(x) for x in leaves) == ("8" in str(extra))


def test_bfloat16(data, tmp_path):
    s = T.train(
        micro_config(data, dtype="bfloat16", steps=3), tmp_path, progress=False, adamw_ref=False
    )
    assert s["param_bytes"] == 2 * s["n_params"]
    assert s["val_loss"] < s["val_loss_start"]


def test_rank_larger_than_matrices_is_clipped(data):
    params = M.abstract_params(M.get_preset("micro"))
    with pytest.warns(UserWarning, match="--rank 1000 exceeds .* clipped to 32"):
        cfg = O.clip_rank(C.resolve_config(micro_config(data, rank=1000)), params)
    assert cfg.rank == 32
    for opt in ("galore", "optax-galore", "apollo"):
        O.run_optimizer(dataclasses.replace(cfg, optimizer=opt), params)  # builds fine
    with pytest.warns(UserWarning, match="--rank 1000 exceeds"):
        O.clip_rank(C.resolve_config(micro_config(data, optimizer="apollo", rank=1000)), params)


def test_out_holding_a_run_is_refused_and_kept(data, tmp_path):
    (tmp_path / "config.json").write_text("precious")
    with pytest.raises(C.UsageError, match="--resume .* --overwrite"):
        T.train(micro_config(data), tmp_path, progress=False)
    assert (tmp_path / "config.json").read_text() == "precious"
    with pytest.raises(C.UsageError, match="contradict"):
        T.train(micro_config(data), tmp_path, resume=True, overwrite=True)
    assert (tmp_path / "config.json").read_text() == "precious"


def test_resume_without_a_run(data, tmp_path):
    with pytest.raises(C.UsageError, match="--resume: .* no run to resume"):
        T.train(micro_config(data), tmp_path / "empty", resume=True)
    assert not (tmp_path / "empty").exists()


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"preset": "huge"}, "--preset 'huge' is unknown"),
        ({"optimizer": "sgd"}, "--optimizer"),
        ({"warmup": 100}, "--warmup"),
        ({"lr": -1.0}, "--lr"),
        ({"optimizer": "adamw", "residual": "channel"}, "--residual: only --optimizer galore"),
        ({"optimizer": "adamw", "adaptive": True}, "--adaptive: only --optimizer galore"),
        ({"residual": "row"}, "--residual 'row': choose channel or matrix"),
        ({"state_bits": 4}, "--state-bits 4: choose 32 or 8"),
        ({"optimizer": "optax-galore", "state_bits": 8}, "--state-bits 8: use"),
        ({"projector_bits": 2}, "--projector-bits 2"),
    ],
)
def test_bad_config(data, tmp_path, kw, match):
    with pytest.raises(C.UsageError, match=match):
        T.train(micro_config(data, **kw), tmp_path / "x")


def test_missing_data(tmp_path):
    from galorax.app.data import DataError

    with pytest.raises(DataError, match="--data .*no such file"):
        T.train(micro_config(tmp_path / "nope"), tmp_path / "x")


def test_binary_data_file_is_refused_like_in_a_directory(tmp_path):
    from galorax.app.data import DataError

    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 64)
    with pytest.raises(DataError, match="--data .*binary file"):
        T.train(micro_config(tmp_path / "blob.bin"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_no_warnings_on_default_rank(data, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        C.resolve_config(micro_config(data))
