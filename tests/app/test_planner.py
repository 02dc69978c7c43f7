"""Tests of the memory planner (galorax.app.planner)."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
import pytest

from galorax.accounting import tree_bytes
from galorax.app import model as model_lib
from galorax.app.config import PLANNED_OPTIMIZERS
from galorax.app.memory import add_memory_arguments, run_memory
from galorax.app.optimizers import make_optimizer
from galorax.app.planner import (
    OPTIONS,
    PAPER_GB,
    format_table,
    parse_bytes,
    plan_memory,
)

SMALL = model_lib.ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=2, d_ff=128)


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_planned_state_bytes_equal_the_real_state(option, dtype):
    """The planner (eval_shape, no allocation) agrees with a real ``opt.init(params)``."""
    est = plan_memory(SMALL, option, rank=16, dtype=dtype)
    params = model_lib.init_params(SMALL, jax.random.key(0), dtype)
    state = make_optimizer(option, params, rank=16).init(params)
    assert est.state == tree_bytes(state)
    assert est.weights == est.grads == tree_bytes(params)
    assert est.n_params == model_lib.count_params(params)
    assert est.total == est.weights + est.grads + est.state


@pytest.mark.parametrize("option", ["galore", "galore8bit"])
@pytest.mark.parametrize("bits", [8, 4])
def test_planned_quantized_projectors_equal_the_real_state(option, bits):
    """With projector_bits the planner sizes the state that galorax.galore really holds."""
    from galorax.accounting import find_galore_states
    from galorax.quantization import is_quantized

    est = plan_memory(SMALL, option, rank=16, dtype=jnp.float32, projector_bits=bits)
    params = model_lib.init_params(SMALL, jax.random.key(0), jnp.float32)
    state = make_optimizer(option, params, rank=16, projector_bits=bits).init(params)
    (galore,) = find_galore_states(state)
    assert est.state == tree_bytes(state)
    assert est.projectors == tree_bytes(galore.projector)
    assert est.option == f"{option}+int{bits}P"
    leaves = jax.tree.leaves(galore.projector, is_leaf=is_quantized)
    assert leaves and all(is_quantized(q) and q.bits == bits for q in leaves)


def test_orderings_and_8bit_ratio():
    cfg = model_lib.get_preset("60m", vocab_size=32000)
    est = {o: plan_memory(cfg, o, rank=128, dtype=jnp.float32) for o in OPTIONS}
    assert est["adamw"].state == 2 * est["adamw"].weights + 4  # f32 mu, nu; int32 count
    assert est["adamw8bit"].state <= 0.30 * est["adamw"].state
    assert est["galore"].state < est["adamw"].state
    assert est["galore8bit"].state < est["galore"].state
    assert est["galore"].projectors > 0 and est["adamw"].projectors == 0


def test_apollo_rows():
    """APOLLO: the rank asked for, no stored projector; APOLLO-Mini rank 1 whatever is asked."""
    est = {o: plan_memory(SMALL, o, rank=16) for o in OPTIONS if o.startswith("apollo")}
    assert [e.rank for e in est.values()] == [16, 1, 16, 1]  # OPTIMIZERS' order
    assert all(e.projectors == 0 for e in est.values())
    assert est["apollo-mini"].state < est["apollo"].state
    big = model_lib.get_preset("60m", vocab_size=32000)
    full, q8 = (plan_memory(big, o, rank=128) for o in ("apollo", "apollo8bit"))
    # Every moment of 4096 values or more in 8 bits: 1 byte and a scale per block where the
    # bf16 params' full-rank moments take 2 and the low-rank ones (f32) 4.
    assert q8.state < 0.5 * full.state


def test_cli_sizes_apollo_by_default(capsys):
    assert _run(["--preset", "60m"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    rows = {r[2]: r[3] for r in lines if r[:1] == ["60m"]}
    assert list(rows) == list(PLANNED_OPTIMIZERS)
    assert rows["apollo"] == rows["galore"] == "128" and rows["apollo-mini8bit"] == "1"
    assert _run(["--preset", "60m", "--max-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "apollo r512, apollo8bit r64" in out and "apollo-mini r1, apollo-mini8bit r1" in out
    assert "-> largest APOLLO rank that fits: 512 (apollo8bit)" in out  # the smallest total
    assert "-> largest GaLore rank that fits: 512 (galore8bit)" in out


def test_projector_bits_shrink_only_the_projectors():
    base = plan_memory(SMALL, "galore", rank=16)
    for bits in (8, 4):
        q = plan_memory(SMALL, "galore", rank=16, projector_bits=bits)
        assert q.option == f"galore+int{bits}P"
        assert q.projectors < base.projectors * (bits / 32 + 0.1)
        assert base.state - q.state == base.projectors - q.projectors


def test_per_layer_updates_hold_one_layer_of_gradients():
    cfg = model_lib.get_preset("60m", vocab_size=32000)
    full = plan_memory(cfg, "adamw", per_layer_updates=False)
    one = plan_memory(cfg, "adamw", per_layer_updates=True)
    assert one.weights == full.weights and one.grads < full.grads / 3
    assert one.grads == 32000 * 512 * 2  # the largest single gradient: embedding (bf16)


def test_7b_is_sized_without_allocating_and_near_the_paper():
    """7B: eval_shape only. 8-bit Adam weights + state within 10% of the paper's 26 GB."""
    cfg = model_lib.get_preset("7b", vocab_size=32000)
    est = plan_memory(cfg, "adamw8bit")
    assert 6.6e9 < est.n_params < 6.8e9
    assert abs((est.weights + est.state) / 1e9 - PAPER_GB["7b"]["adamw8bit"]) < 2.6


@pytest.mark.parametrize(
    "text,expected",
    [("24GB", 24 * 10**9), ("24GiB", 24 * 2**30), ("512 MB", 512 * 10**6), ("100", 100)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_parse_bytes_rejects_garbage():
    with pytest.raises(ValueError, match="24GB"):
        parse_bytes("lots")


def _run(argv):
    parser = argparse.ArgumentParser()
    add_memory_arguments(parser)
    return run_memory(parser.parse_args(argv))


def test_cli_table_with_paper_column_and_budget(capsys):
    assert _run(["--preset", "60m", "--max-memory", "24GB", "--rank", "128"]) == 0
    out = capsys.readouterr().out
    assert "0.36" in out and "0.24" in out  # the paper's figures printed beside ours
    assert "Assumptions" in out and "fits" in out
    assert "60m: adamw, adamw8bit, galore r128, galore8bit r128" in out


def test_cli_custom_config_and_nothing_fits(capsys):
    argv = ["--config", "d_model=64,n_layers=2,n_heads=2,d_ff=128", "--max-memory", "1MB"]
    assert _run(argv + ["--optimizer", "adamw"]) == 0
    assert "custom: nothing fits" in capsys.readouterr().out


def test_cli_rejects_unknown_config_field():
    with pytest.raises(ValueError, match="--config"):
        _run(["--config", "width=3"])


def test_xla_memory_analysis_of_a_tiny_step(capsys):
    argv = ["--config", "vocab_size=256,d_model=32,n_layers=1,n_heads=2,d_ff=64", "--xla"]
    assert _run(argv + ["--optimizer", "adamw", "--batch-size", "2", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "XLA memory analysis" in out and "peak" in out


def test_make_optimizer_rejects_unknown():
    with pytest.raises(ValueError, match="adamw8bit"):
        make_optimizer("sgd", {"w": jnp.zeros((2, 2))})
    assert isinstance(make_optimizer("adamw", {}), optax.GradientTransformation)


def test_optax_galore_is_sized_as_training_builds_it():
    """optax.contrib.galore (one projector per matrix name, the layer axis folded)."""
    from optax.contrib import GaLoreState

    est = plan_memory(SMALL, "optax-galore", rank=16, dtype=jnp.float32)
    params = model_lib.init_params(SMALL, jax.random.key(0), jnp.float32)
    state = make_optimizer("optax-galore", params, rank=16).init(params)
    (galore,) = [s for s in state if isinstance(s, GaLoreState)]
    assert est.rank == 16 and est.state == tree_bytes(state)
    assert est.projectors == tree_bytes(galore.projector) > 0


def test_cli_sizes_optax_galore(capsys):
    assert _run(["--preset", "60m", "--optimizer", "optax-galore", "adamw"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert any(r[0] == "60m" and r[2:4] == ["optax-galore", "128"] for r in rows if len(r) > 4)


def test_table_columns_say_their_units():
    rows = [("60m", plan_memory(model_lib.get_preset("60m", vocab_size=32000), "galore"))]
    head, rule, row = format_table(rows).splitlines()
    for column in ("weights", "grads", "state", "(proj)", "w+state", "paper", "total"):
        assert f"{column} GB" in head
    assert len(head) == len(rule) and row.split()[1].endswith("M")  # parameters in millions
    # Each number sits under its header: the total column ends where its header ends.
    assert row.rstrip().endswith(row.split()[-1]) and len(row.rstrip()) == len(head)


@pytest.mark.parametrize(
    "flags",
    [
        ["--optimizer", "galore"],
        ["--optimizer", "galore8bit", "--projector-bits", "8", "--per-layer-updates"],
        ["--optimizer", "apollo"],
        ["--optimizer", "apollo-mini8bit", "--per-layer-updates"],
    ],
    ids=["galore", "galore8bit-int8-per-layer", "apollo", "apollo-mini8bit-per-layer"],
)
def test_planner_compiles_the_step_train_runs(flags, capsys, tmp_path):
    """``galorax memory --xla --json``'s step peak == what ``galorax train`` reports."""
    import json

    from test_train import make_text_dir, micro_config

    from galorax.app import train as T

    data = make_text_dir(tmp_path / "data")
    extra: dict = {"per_layer_updates": "--per-layer-updates" in flags}
    if "--projector-bits" in flags:
        extra["projector_bits"] = 8
    cfg = micro_config(data, steps=1, optimizer=flags[1], **extra)
    summary = T.train(cfg, tmp_path / "run", progress=False, adamw_ref=False)
    argv = ["--preset", "micro", "--vocab-size", "256", "--dtype", "float32", "--rank", "8"]
    argv += ["--batch-size", "4", "--seq-len", "32", "--xla", "--json", *flags]
    assert _run(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    want = {"model", "optimizer", "rank", "projector_bits", "per_layer_updates", "state_bytes"}
    assert rows and all(want | {"total_bytes", "step_peak_bytes"} <= set(r) for r in rows)
    (row,) = [r for r in rows if r["projector_bits"] == extra.get("projector_bits")]
    assert row["per_layer_updates"] == extra["per_layer_updates"]
    assert row["step_peak_bytes"] == summary["step_memory"]["peak"]
