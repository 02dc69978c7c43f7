"""Sharded vs unsharded GaLore update: per-device memory, refresh time, gathers.

Run: ``python benchmarks/sharding.py`` (it sets, unless already set, 8 simulated CPU
devices, single-threaded XLA and ``OPENBLAS_NUM_THREADS=1`` before JAX starts).

One ``M x N`` f32 weight, rank ``R``, ``update_proj_gap=1`` (every step refreshes). On one
device (no mesh), and FSDP over its rows on an automatic 8-device mesh. For each: the
compiled update's per-device temporary and argument bytes and their sum with the outputs
(``compiled.memory_analysis()``: what one device holds while the update runs), whether
its HLO all-gathers a whole gradient matrix, the compile time, and the median refresh
step's wall and CPU time (CPU time of the whole process: with simulated devices, every
device's work on the same cores).

Why OpenBLAS is pinned to one thread: jaxlib's LAPACK kernels (SVD, QR, eigh) run on
scipy's OpenBLAS, whose own thread pool ignores XLA's thread flags. With several
simulated devices calling it at once on a 2-core machine, its spinning threads make a
1024x512 SVD 80x slower (130 s instead of 1.6 s, 8 devices).
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 "
    "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import galorax  # noqa: E402
from galorax import sharding  # noqa: E402


def _gathers_a_matrix(text: str, m: int, n: int) -> bool:
    """Whether the compiled HLO all-gathers an array as large as the gradient."""
    for shape in re.findall(r"= f32\[([\d,]*)\]\{[^}]*\} all-gather", text):
        size = 1
        for d in filter(None, shape.split(",")):
            size *= int(d)
        if size >= m * n:
            return True
    return False


def measure(tx, mesh, m: int, n: int, reps: int) -> dict:
    params = {"w": jnp.ones((m, n))}
    grads = [{"w": jax.random.normal(jax.random.key(i), (m, n))} for i in range(reps + 1)]
    if mesh is not None:
        shard = {"w": NamedSharding(mesh, P("fsdp"))}
        params = jax.device_put(params, shard)
        grads = [jax.device_put(g, shard) for g in grads]
        state_sh = sharding.state_shardings(tx, params)
        state = jax.jit(tx.init, out_shardings=state_sh)(params)
        # Outputs pinned to the inputs' shardings, as in a training loop's step.
        update = jax.jit(tx.update, out_shardings=(shard, state_sh))
    else:
        state = jax.jit(tx.init)(params)
        update = jax.jit(tx.update)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # galorax's "svd on a mesh gathers" warning
        compiled = update.lower(grads[0], state).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    _, state = compiled(grads[0], state)  # warm-up (a refresh too)
    jax.block_until_ready(state)
    wall, cpu = [], []
    for g in grads[1:]:  # update_proj_gap=1: every step refreshes
        t, c = time.perf_counter(), time.process_time()
        u, state = compiled(g, state)
        jax.block_until_ready((u, state))
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {
        "temp": mem.temp_size_in_bytes,
        "args": mem.argument_size_in_bytes,
        "out": mem.output_size_in_bytes,
        "peak": mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes,
        "gathers": _gathers_a_matrix(compiled.as_text(), m, n),
        "compile_s": compile_s,
        "wall": statistics.median(wall),
        "cpu": statistics.median(cpu),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", help="run only the optimizers whose name contains this")
    a = ap.parse_args()
    mesh = sharding.make_mesh("fsdp=-1", explicit=False)
    txs = {
        "galorax, randomized (default)": lambda: galorax.scale_by_galore(a.rank, 1, stagger=False),
        "galorax, svd": lambda: galorax.scale_by_galore(a.rank, 1, subspace="svd", stagger=False),
        "optax.contrib.galore (svd)": lambda: optax.contrib.scale_by_galore(a.rank, 1),
    }
    print(f"jax {jax.__version__}, optax {optax.__version__}; XLA_FLAGS={os.environ['XLA_FLAGS']}")
    print(f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}\n")
    print(
        f"| {a.m}x{a.n} f32, rank {a.rank} | devices | temp / device | args / device "
        "| args + out + temp / device | gathers the gradient | compile | refresh step, wall | CPU |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    mib = 2**20
    for name, make in txs.items():
        if a.only and a.only not in name:
            continue
        for label, mh in (("1", None), (f"{jax.device_count()} (fsdp)", mesh)):
            r = measure(make(), mh, a.m, a.n, a.reps)
            print(
                f"| {name} | {label} | {r['temp'] / mib:.2f} MiB | {r['args'] / mib:.2f} MiB "
                f"| {r['peak'] / mib:.2f} MiB | {'yes' if r['gathers'] else 'no'} "
                f"| {r['compile_s']:.1f} s "
                f"| {r['wall'] * 1e3:.0f} ms | {r['cpu'] * 1e3:.0f} ms |",
                flush=True,
            )


if __name__ == "__main__":
    main()
