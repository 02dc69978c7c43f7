"""Refresh cost: galorax's randomized finder vs optax.contrib.galore's full SVD.

For each shape and rank, in one run: the time of optax's refresh (the thin SVD it runs
inside its cond) and of galorax's default refresh (``randomized_basis``: one power
iteration, 8 oversampling columns), their ratio, and the fraction of the exact top-r
gradient energy each captures on a gradient-like spectrum (singular values 1/i) and on a
flat one (1/sqrt(i), the worst case).

    python benchmarks/refresh.py            # the full table (~2 min on 2 cores)
    python benchmarks/refresh.py --quick    # 1024x1024 and 2048x2048 only

Times are this process's CPU time (all threads) by default: on a shared machine the wall
clock swings with other jobs, the work done does not. ``--clock wall`` for wall time.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from galorax import captured_energy, exact_basis, randomized_basis

SHAPES = [(1024, 1024), (2048, 2048), (1024, 4096), (4096, 4096)]
RANKS = [128, 256]


def with_spectrum(m: int, n: int, spectrum, seed: int = 0) -> jax.Array:
    key = jax.random.key(seed)
    k = min(m, n)
    u = jnp.linalg.qr(jax.random.normal(key, (m, k)))[0]
    v = jnp.linalg.qr(jax.random.normal(jax.random.fold_in(key, 1), (n, k)))[0]
    return (u * spectrum(jnp.arange(1, k + 1, dtype=jnp.float32))) @ v.T


CLOCK = time.process_time


def best_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = CLOCK()
        jax.block_until_ready(fn(*args))
        times.append(CLOCK() - start)
    return min(times)  # shared machine: the minimum is the least noisy estimate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shapes", nargs="*", default=None, help="e.g. 4096x4096")
    parser.add_argument("--clock", choices=["process", "wall"], default="process")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    shapes = SHAPES[:2] if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes]
    print(
        f"jax {jax.__version__}, {jax.devices()[0].platform}, {jax.device_count()} device(s), "
        f"{args.clock} time, best of repeats"
    )
    print(
        "| shape | rank | optax SVD (s) | galorax (s) | speed-up | energy 1/i: optax / galorax "
        "| energy flat: optax / galorax |"
    )
    print("|---|---|---|---|---|---|---|")
    for m, n in shapes:
        # optax runs the full thin SVD and slices: its cost does not depend on the rank.
        left = m >= n
        svd = jax.jit(lambda g, left=left: exact_basis(g, 1, left=left))
        grad = with_spectrum(m, n, lambda i: 1.0 / i)
        flat = with_spectrum(m, n, lambda i: 1.0 / jnp.sqrt(i), seed=3)
        t_svd = best_time(svd, grad, repeats=1 if m * n > 4e6 else 3)
        for rank in RANKS:
            ours = jax.jit(
                lambda g, key, rank=rank, left=left: randomized_basis(g if left else g.T, rank, key)
            )
            key = jax.random.key(0)
            t_ours = best_time(ours, grad, key, repeats=5)
            exact_fn = jax.jit(
                lambda g, rank=rank, left=left: exact_basis(g if left else g.T, rank)
            )
            energies = []
            for a in (grad, flat):
                a_l = a if left else a.T
                energies.append(
                    (
                        float(captured_energy(a_l, exact_fn(a))),
                        float(captured_energy(a_l, ours(a, key))),
                    )
                )
            (e1, r1), (e2, r2) = energies
            print(
                f"| {m}x{n} | {rank} | {t_svd:.3f} | {t_ours:.4f} | {t_svd / t_ours:.1f}x "
                f"| {e1:.4f} / {r1:.4f} ({r1 / e1:.2%}) | {e2:.4f} / {r2:.4f} ({r2 / e2:.2%}) |",
                flush=True,
            )


if __name__ == "__main__":
    main()
