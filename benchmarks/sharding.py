"""Sharded vs unsharded GaLore update: per-device temporary memory and refresh time.

Run: ``XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/sharding.py``
(one ``M x N`` weight, FSDP over its rows on an automatic 8-device mesh, or one device).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import galorax
from galorax import sharding


def measure(tx, mesh, m, n, reps):
    params = {"w": jnp.ones((m, n))}
    grads = [{"w": jax.random.normal(jax.random.key(i), (m, n))} for i in range(reps + 1)]
    if mesh is not None:
        shard = {"w": NamedSharding(mesh, P("fsdp"))}
        params = jax.device_put(params, shard)
        grads = [jax.device_put(g, shard) for g in grads]
        state = jax.jit(tx.init, out_shardings=sharding.state_shardings(tx, params))(params)
    else:
        state = jax.jit(tx.init)(params)
    compiled = jax.jit(tx.update).lower(grads[0], state).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    u, _ = compiled(grads[0], state)  # warm-up (a refresh: count 0)
    jax.block_until_ready(u)
    times = []
    for g in grads[1:]:  # update_proj_gap=1: every step refreshes
        t = time.perf_counter()
        jax.block_until_ready(compiled(g, state)[0])
        times.append(time.perf_counter() - t)
    return temp, sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    mesh = sharding.make_mesh("fsdp=-1", explicit=False)
    txs = {
        "galorax (randomized)": galorax.scale_by_galore(a.rank, 1, stagger=False),
        "optax.contrib.galore (svd)": optax.contrib.scale_by_galore(a.rank, 1),
    }
    print(f"| {a.m}x{a.n}, rank {a.rank} | devices | temp / device | refresh step |")
    print("|---|---|---|---|")
    for name, tx in txs.items():
        for label, mh in (("1", None), (str(jax.device_count()), mesh)):
            temp, t = measure(tx, mh, a.m, a.n, a.reps)
            print(f"| {name} | {label} | {temp / 2**20:.1f} MiB | {t * 1e3:.0f} ms |", flush=True)


if __name__ == "__main__":
    main()
