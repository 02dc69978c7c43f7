"""The optimizer step alone (update + apply) on one LLaMA-1B layer's matrices, single-threaded
CPU, the contenders interleaved (issue 27's speed proof).

One layer of the paper's 1B model (d 2048, MLP 5461): q, k, v, o ``2048 x 2048``, gate and
up ``2048 x 5461``, down ``5461 x 2048``, f32. Each optimizer's jitted
``update`` + ``apply_updates`` (params and state donated) is timed in CPU seconds, one call
of each in turn, the order rotating every round. Refreshes are amortized over
``update_proj_gap`` steps: the steady step ``T`` and the step that refreshes ``R`` are timed
apart and reported as ``T + (R - T) / gap`` (galorax's GaLore staggers its refreshes, so
its ``R`` is taken with every matrix due at once: ``stagger=False`` here).

    python benchmarks/optimizer_step.py                # rank 512, gap 200, 5 rounds
    python benchmarks/optimizer_step.py --rounds 2 --rank 128
"""

from __future__ import annotations

import os

# One thread: XLA's CPU backend and OpenBLAS (set before JAX starts).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
    " intra_op_parallelism_threads=1"
).strip()
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import galorax

SHAPES = {
    "q": (2048, 2048), "k": (2048, 2048), "v": (2048, 2048), "o": (2048, 2048),
    "gate": (2048, 5461), "up": (2048, 5461), "down": (5461, 2048),
}  # fmt: skip


def contenders(rank: int, gap: int) -> dict[str, optax.GradientTransformation]:
    dims = galorax.GaLoreDimensionNumbers(0, 1)
    return {
        "adamw": optax.adamw(1e-3),
        "optax-galore": optax.contrib.galore(1e-3, rank=rank, update_proj_gap=gap),
        "galorax-galore": galorax.galore(1e-3, rank=rank, update_proj_gap=gap, stagger=False),
        "apollo": galorax.apollo(
            1e-3, rank=rank, update_proj_gap=gap, weight_dimension_numbers=dims
        ),
        "apollo-mini": galorax.apollo_mini(
            1e-3, update_proj_gap=gap, weight_dimension_numbers=dims
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=512)
    parser.add_argument("--gap", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    keys = jax.random.split(jax.random.key(0), len(SHAPES))
    params = {
        n: 0.02 * jax.random.normal(k, s) for (n, s), k in zip(SHAPES.items(), keys, strict=True)
    }
    grads = jax.tree.map(lambda p: p * 0.1 + 1e-3, params)
    runs = {}
    for name, tx in contenders(args.rank, args.gap).items():

        def step(p, s, g, tx=tx):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        fn = jax.jit(step, donate_argnums=(0, 1))
        p = jax.tree.map(jnp.copy, params)
        s = tx.init(p)
        p, s = fn(p, s, grads)  # compile; step 0 refreshes
        jax.block_until_ready(p)
        runs[name] = [fn, p, s, [], []]  # steady and refresh CPU seconds
    names = list(runs)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, p, s, steady, refresh = runs[name]
            for _ in range(2):  # steps 1, 2 ... inside the gap: steady
                t = time.process_time()
                p, s = fn(p, s, grads)
                jax.block_until_ready(p)
                steady.append(time.process_time() - t)
            runs[name][1:3] = p, s
    # A refresh step of each: a fresh state at its step 0 (every matrix due).
    for name in names:
        fn, _, _, _, refresh = runs[name]
        tx = contenders(args.rank, args.gap)[name]
        for _ in range(2):
            p = jax.tree.map(jnp.copy, params)
            s = tx.init(p)
            t = time.process_time()
            p, s = fn(p, s, grads)
            jax.block_until_ready(p)
            refresh.append(time.process_time() - t)
    base = None
    print(f"# one LLaMA-1B layer (7 matrices, f32), rank {args.rank}, gap {args.gap}, 1 thread")
    print("optimizer        steady ms  refresh ms  amortized ms  vs adamw")
    for name in names:
        steady, refresh = np.median(runs[name][3]), np.median(runs[name][4])
        amortized = steady + (refresh - steady) / args.gap
        base = amortized if base is None else base
        print(
            f"{name:16} {steady * 1e3:9.1f} {refresh * 1e3:11.1f} {amortized * 1e3:13.1f}"
            f"  {amortized / base:6.2f}x"
        )


if __name__ == "__main__":
    main()
