"""AdamW vs 8-bit AdamW vs GaLore vs 8-bit GaLore on the ``tiny`` preset: final loss, state bytes.

Same data, schedule, clipping and defaults as ``galorax train --preset tiny`` but one peak
lr for every optimizer, GaLore's 1e-2 (scale 0.25, rank 64, gap 200, cosine with 10%
warmup); the 8-bit variants swap in ``galorax.adamw_8bit`` /
``scale_by_adam_8bit`` and change nothing else. Usage::

    python benchmarks/quantized_tiny.py --steps 300
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np
import optax

from galorax.app import data as data_lib
from galorax.app import model as model_lib
from galorax.app import train as train_lib
from galorax.app.planner import tree_bytes

OPTIONS = ("adamw", "adamw8bit", "galore", "galore8bit")


def make(option: str, cfg: train_lib.TrainConfig, params) -> optax.GradientTransformation:
    """``galorax train``'s optimizer for ``option`` (``adamw8bit``/``galore8bit``: 8-bit Adam)."""
    c = train_lib.resolve_config(dataclasses.replace(cfg, optimizer=option))
    return train_lib.make_optimizer(c, params)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--optimizer", nargs="+", default=list(OPTIONS), choices=OPTIONS)
    args = ap.parse_args()
    cfg = train_lib.resolve_config(
        train_lib.TrainConfig(preset="tiny", steps=args.steps, seed=args.seed)
    )
    mcfg = model_lib.get_preset("tiny")
    corpus = data_lib.load_corpus(cfg.data)
    evals = data_lib.eval_batches(corpus.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    eval_loss = jax.jit(lambda p, b: model_lib.loss_fn(p, b, mcfg))
    print(
        f"tiny: {model_lib.count_params(model_lib.abstract_params(mcfg)) / 1e6:.2f}M params, "
        f"{args.steps} steps, batch {cfg.batch_size} x {cfg.seq_len}, seed {args.seed}"
    )
    print(
        f"{'optimizer':<11} {'state bytes':>12} {'vs adamw':>8} {'train loss':>10} "
        f"{'val loss':>8} {'s/step':>7}"
    )
    ref = None
    for option in args.optimizer:
        params = model_lib.init_params(mcfg, jax.random.key(cfg.seed))
        opt = make(option, cfg, params)
        state = opt.init(params)
        nbytes = tree_bytes(state)
        ref = ref or (nbytes if option == "adamw" else None)
        step = train_lib.make_train_step(mcfg, opt)
        losses, t0 = [], time.time()
        for i in range(args.steps):
            batch = data_lib.sample_batch(corpus.train, cfg.batch_size, cfg.seq_len, cfg.seed, i)
            params, state, loss = step(params, state, batch)
            losses.append(float(loss))
        dt = (time.time() - t0) / args.steps
        val = float(np.mean([eval_loss(params, b) for b in evals]))
        ratio = f"{nbytes / ref:.2f}" if ref else "-"
        print(
            f"{option:<11} {nbytes:>12,} {ratio:>8} {np.mean(losses[-20:]):>10.4f} "
            f"{val:>8.4f} {dt:>7.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
