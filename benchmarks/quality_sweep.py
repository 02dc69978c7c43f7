"""Validation loss per optimizer on a small LLaMA-style LM: a learning-rate sweep, several
seeds (issue 27's quality proof: APOLLO vs GaLore vs tuned AdamW).

The app's model (RMSNorm, RoPE, SwiGLU, layers under ``lax.scan``) on its default corpus (the
Python standard library's sources, bytes), trained with each optimizer of the library as a
user would write the step (``value_and_grad``, ``update``, ``apply_updates``, global-norm
clipping 1.0, cosine schedule with 10% warmup); every optimizer projects the same leaves
(the stacked layer matrices, :func:`galorax.app.optimizers.galore_dimension_numbers`).
For each optimizer, the best learning rate's mean final validation loss over the seeds.

    OMP_NUM_THREADS=1 python benchmarks/quality_sweep.py                 # the default grid
    python benchmarks/quality_sweep.py --steps 100 --optimizers adamw apollo --lrs 1e-2
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import jax.numpy as jnp
import numpy as np
import optax

import galorax
from galorax.app import data as data_lib
from galorax.app import model as model_lib
from galorax.app.optimizers import galore_dimension_numbers


def make(
    name: str, lr: optax.Schedule, params, rank: int, gap: int
) -> optax.GradientTransformation:
    dims = galore_dimension_numbers(params)
    opts = {
        "adamw": lambda: galorax.adamw(lr, weight_decay=0.0),
        "galore": lambda: galorax.galore(
            lr, rank=rank, update_proj_gap=gap, weight_dimension_numbers=dims
        ),
        "apollo": lambda: galorax.apollo(
            lr, rank=rank, update_proj_gap=gap, weight_dimension_numbers=dims
        ),
        "apollo-mini": lambda: galorax.apollo_mini(
            lr, update_proj_gap=gap, weight_dimension_numbers=dims
        ),
    }
    return optax.chain(optax.clip_by_global_norm(1.0), opts[name]())


def run(name: str, lr: float, seed: int, args: argparse.Namespace, corpus) -> float:
    cfg = model_lib.ModelConfig(
        vocab_size=256, d_model=args.d_model, n_layers=args.layers, n_heads=4,
        d_ff=int(args.d_model * 8 / 3) // 8 * 8,
    )  # fmt: skip
    params = model_lib.init_params(cfg, jax.random.key(seed))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, max(1, args.steps // 10), args.steps, lr * 0.1
    )
    tx = make(name, schedule, params, args.rank, args.gap)
    state = tx.init(params)

    @jax.jit
    def step(params, state, batch):
        loss, grads = jax.value_and_grad(model_lib.loss_fn)(params, batch, cfg)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    evaluate = jax.jit(lambda p, b: model_lib.loss_fn(p, b, cfg))
    for t in range(args.steps):
        batch = data_lib.sample_batch(corpus.train, args.batch, args.seq, seed, t)
        params, state, _ = step(params, state, jnp.asarray(batch))
    val = data_lib.eval_batches(corpus.val, args.batch, args.seq, args.eval_batches)
    return float(np.mean([evaluate(params, jnp.asarray(b)) for b in val]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--optimizers", nargs="+", default=["adamw", "galore", "apollo", "apollo-mini"]
    )
    parser.add_argument("--lrs", nargs="+", type=float, default=[3e-3, 1e-2, 3e-2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--gap", type=int, default=50)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--json", help="write every run's loss here")
    args = parser.parse_args()
    corpus = data_lib.load_corpus(None)
    print(f"# {corpus.source}; d {args.d_model}, {args.layers} layers, rank {args.rank}, "
          f"gap {args.gap}, {args.steps} steps of {args.batch} x {args.seq}")  # fmt: skip
    losses: dict[tuple[str, float], list[float]] = {}
    for seed, lr, name in itertools.product(args.seeds, args.lrs, args.optimizers):
        start = time.process_time()
        loss = run(name, lr, seed, args, corpus)
        losses.setdefault((name, lr), []).append(loss)
        cpu = time.process_time() - start
        print(f"{name:12} lr {lr:<7g} seed {seed}: {loss:.4f} ({cpu:.0f} CPU-s)", flush=True)
    print("\noptimizer     best lr   mean val loss (seeds)   all lrs")
    for name in args.optimizers:
        means = {lr: float(np.mean(losses[name, lr])) for lr in args.lrs}
        best = min(means, key=means.get)
        cells = "  ".join(f"{lr:g}: {m:.4f}" for lr, m in means.items())
        print(f"{name:12} {best:<8g} {means[best]:.4f} ({len(args.seeds)})      {cells}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"optimizer": n, "lr": lr, "losses": v} for (n, lr), v in losses.items()], f)


if __name__ == "__main__":
    main()
