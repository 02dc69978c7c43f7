"""Step times and update continuity: galorax vs optax.contrib.galore vs optax.adam.

Trains a 4-layer MLP regression (1024-wide, ReLU) for a few refresh periods with each
optimizer, in one run, and reports: median and max step time (the max is the step that
pays the refreshes), amortized time per step, and the cosine between consecutive updates
at refresh steps (1 = the refresh does not jolt the trajectory) against elsewhere.

    python benchmarks/steps.py                  # ~3 min on 2 cores
    python benchmarks/steps.py --width 512      # quicker

Step times are this process's CPU time (all threads) by default: robust on a shared
machine; ``--clock wall`` for wall time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import galorax


def mlp_loss(params, x, y):
    h = x
    for i in range(len(params) - 1):
        h = jax.nn.relu(h @ params[f"w{i}"])
    return jnp.mean((h @ params[f"w{len(params) - 1}"] - y) ** 2)


CLOCK = time.process_time


def run(tx, params, batches, gap):
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(mlp_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    jax.block_until_ready(step(params, state, *batches[0]))  # compile
    times, flats = [], []
    for x, y in batches:
        start = CLOCK()
        params, state, updates = jax.block_until_ready(step(params, state, x, y))
        times.append(CLOCK() - start)
        flats.append(jnp.concatenate([u.ravel() for u in jax.tree.leaves(updates)]))
    cos = [
        float(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-30))
        for a, b in zip(flats, flats[1:], strict=False)
    ]
    at_refresh = [c for t, c in enumerate(cos, start=1) if t % gap == 0]
    elsewhere = [c for t, c in enumerate(cos, start=1) if t % gap]
    return times, at_refresh, elsewhere, float(mlp_loss(params, *batches[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--gap", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--clock", choices=["process", "wall"], default="process")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    w, key = args.width, jax.random.key(0)
    params = {
        f"w{i}": jax.random.normal(jax.random.fold_in(key, i), (w, w)) / jnp.sqrt(w)
        for i in range(4)
    }
    teacher = jax.tree.map(
        lambda p: p + 0.5 * jax.random.normal(key, p.shape) / jnp.sqrt(w), params
    )
    batches = []
    for t in range(args.steps):
        x = jax.random.normal(jax.random.fold_in(key, 1000 + t), (256, w))
        batches.append((x, jax.lax.stop_gradient(_teacher_out(teacher, x))))
    lr, r, gap = 1e-3, args.rank, args.gap
    optimizers = {
        "optax.adam": optax.adam(lr),
        "optax.contrib.galore": optax.contrib.galore(lr, rank=r, update_proj_gap=gap),
        "galorax (seed config: svd, keep, no stagger)": galorax.galore(
            lr, rank=r, update_proj_gap=gap, subspace="svd", moments="keep", stagger=False
        ),
        "galorax (defaults)": galorax.galore(lr, rank=r, update_proj_gap=gap),
        "galorax (defaults, stagger=False)": galorax.galore(
            lr, rank=r, update_proj_gap=gap, stagger=False
        ),
    }
    print(
        f"jax {jax.__version__}, {jax.devices()[0].platform}; MLP 4x{w}x{w}, batch 256, "
        f"rank {r}, gap {gap}, {args.steps} steps"
    )
    print(
        "| optimizer | median step (ms) | max step (ms) | mean step (ms) | cos at refresh "
        "(mean / min) | cos elsewhere (mean) | final loss |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, tx in optimizers.items():
        times, at, other, loss = run(tx, params, batches, gap)
        print(
            f"| {name} | {statistics.median(times) * 1e3:.1f} | {max(times) * 1e3:.1f} | "
            f"{statistics.mean(times) * 1e3:.1f} | {statistics.mean(at):.3f} / {min(at):.3f} | "
            f"{statistics.mean(other):.3f} | {loss:.4f} |",
            flush=True,
        )


def _teacher_out(teacher, x):
    h = x
    for i in range(len(teacher) - 1):
        h = jax.nn.relu(h @ teacher[f"w{i}"])
    return h @ teacher[f"w{len(teacher) - 1}"]


if __name__ == "__main__":
    main()
