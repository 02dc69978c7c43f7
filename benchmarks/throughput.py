"""Training throughput of `galorax train`'s step: GaLore vs AdamW vs optax.contrib.galore.

Compiles the real train step (model forward/backward + clipping + optimizer) of each
optimizer on the same model and batch, then runs them **interleaved** (one step of each in
turn, the order rotating every round) so that whatever else the machine does slows them
all alike. Refreshes are amortized at their real frequency: every step of every round is
timed, refresh steps included (only each program's first call is left out, as in
``galorax train``). A gap shorter than the default (``--gap 50`` vs 200) makes the
refresh cost weigh four times more than in a default run: a conservative figure.

    python benchmarks/throughput.py                        # tiny, 100 rounds: ~10 min
    python benchmarks/throughput.py --rounds 20 --gap 10   # quicker

Reports tokens per second of wall time and per CPU-second (all of this process's
threads), each as a ratio to AdamW's from the same run.
"""

from __future__ import annotations

import argparse
import os
import time

# As `galorax train` does: one OpenBLAS thread for jaxlib's QR/eigh (see galorax/app/cli.py).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import numpy as np

from galorax.app import model as model_lib
from galorax.app.config import TrainConfig, resolve_config
from galorax.app.optimizers import clip_rank, run_optimizer
from galorax.app.step import compile_step
from galorax.schedule import count_refreshes


def build(name: str, args: argparse.Namespace, mcfg: model_lib.ModelConfig, params, batch):
    opt_name, _, variant = name.partition("+")
    # "+residual": residual compensation; "+pl": per-layer updates (--per-layer-updates).
    extra: dict = {"residual": {"residual": "channel"}, "pl": {"per_layer_updates": True}}.get(
        variant, {}
    )
    run = resolve_config(
        TrainConfig(
            preset=args.preset,
            optimizer=opt_name,
            steps=args.rounds + 1,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            update_proj_gap=args.gap,
            **extra,
        )
    )
    opt = run_optimizer(clip_rank(run, params), params)
    p = jax.tree.map(np.array, params)  # each optimizer its own copy (the step donates)
    state = opt.init(p)
    step = compile_step(mcfg, opt, p, state, batch)
    p, state, loss = step(p, state, batch)  # first call: caches warm, initial projectors
    loss.block_until_ready()
    return {"step": step, "params": p, "state": state, "wall": 0.0, "cpu": 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--gap", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument(
        "--optimizers", nargs="+", default=["adamw", "galore", "galore+residual", "optax-galore"]
    )
    args = ap.parse_args()

    mcfg = model_lib.get_preset(args.preset, 256)
    params = model_lib.init_params(mcfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (args.batch_size, args.seq_len + 1), dtype=np.int32)
    runs = {n: build(n, args, mcfg, params, batch) for n in args.optimizers}
    names = list(runs)
    for i in range(args.rounds):
        order = names[i % len(names) :] + names[: i % len(names)]
        for n in order:
            r = runs[n]
            t, c = time.perf_counter(), time.process_time()
            r["params"], r["state"], loss = r["step"](r["params"], r["state"], batch)
            loss.block_until_ready()
            r["wall"] += time.perf_counter() - t
            r["cpu"] += time.process_time() - c

    tokens = args.rounds * args.batch_size * args.seq_len
    ref = runs.get("adamw")
    print(
        f"preset {args.preset}, {args.rounds} interleaved steps each of "
        f"{args.batch_size}x{args.seq_len} tokens, update_proj_gap {args.gap}, "
        f"jax {jax.__version__}, {jax.devices()[0].platform}\n"
    )
    print("| optimizer | tokens/s | vs AdamW | tokens/CPU-s | vs AdamW | refreshes |")
    print("|---|---|---|---|---|---|")
    for n, r in runs.items():
        tps, tpc = tokens / r["wall"], tokens / r["cpu"]
        rel_w = f"{tps / (tokens / ref['wall']):.3f}x" if ref else "-"
        rel_c = f"{tpc / (tokens / ref['cpu']):.3f}x" if ref else "-"
        refr = count_refreshes(r["state"]) if n.startswith("galore") else "-"
        print(f"| {n} | {tps:.0f} | {rel_w} | {tpc:.0f} | {rel_c} | {refr} |")


if __name__ == "__main__":
    main()
