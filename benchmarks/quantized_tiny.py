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

import numpy as np
import tinyrun

from galorax.accounting import tree_bytes
from galorax.app.config import EIGHT_BIT, PLANNED_OPTIMIZERS
from galorax.app.optimizers import run_optimizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--optimizer", nargs="+", default=list(PLANNED_OPTIMIZERS), choices=PLANNED_OPTIMIZERS
    )
    args = ap.parse_args()
    bench = tinyrun.Bench.create(preset="tiny", steps=args.steps, seed=args.seed)
    print(bench.describe())
    print(
        f"{'optimizer':<11} {'state bytes':>12} {'vs adamw':>8} {'train loss':>10} "
        f"{'val loss':>8} {'s/step':>7}"
    )
    ref = None
    for option in args.optimizer:
        # galorax train's optimizer for ``option``, at the run's (GaLore's) lr
        run = dataclasses.replace(
            bench.run,
            optimizer=EIGHT_BIT.get(option, option),
            state_bits=8 if option in EIGHT_BIT else 32,
        )
        opt = run_optimizer(run, bench.init_params())
        result = tinyrun.train(bench, opt)
        nbytes = tree_bytes(result.state)
        ref = ref or (nbytes if option == "adamw" else None)
        ratio = f"{nbytes / ref:.2f}" if ref else "-"
        print(
            f"{option:<11} {nbytes:>12,} {ratio:>8} {np.mean(result.losses[-20:]):>10.4f} "
            f"{bench.val_loss(result.params):>8.4f} {result.wall_s_per_step:>7.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
