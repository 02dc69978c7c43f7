"""Refreshes spread over data-parallel devices (``refresh_axes``) vs every device doing all.

Run: ``python benchmarks/spread.py --devices 2`` (it sets, unless already set, that many
simulated CPU devices and ``OPENBLAS_NUM_THREADS=1`` before JAX starts).

One stacked weight ``(L, M, N)`` (L layers, one projector each), replicated over a
``data=DEVICES`` mesh (data parallelism: every device holds the same gradient),
``update_proj_gap=1`` (every step refreshes), ``stagger=False``. Each optimizer's jitted
update, outputs pinned to the inputs' shardings, is timed in interleaved rounds (one step
of each per round): median wall and process CPU time per step (the CPU time of all
simulated devices together). Rows:

- galorax without ``refresh_axes``: every device factorizes all L slices (on a mesh the
  range finder orthonormalizes with the matmul-only Gram method; also shown with
  Householder QR forced, the method the spread run uses on its whole local matrices);
- galorax with ``refresh_axes="data"``: each device factorizes L / DEVICES slices, then the
  projectors are gathered;
- optax.adam and optax.contrib.galore (which has no per-slice projectors: the stack is one
  ``(L*M, N)`` matrix and its exact SVD).
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":  # device count and BLAS threads must be fixed before JAX starts
    _ap = argparse.ArgumentParser(add_help=False)
    _ap.add_argument("--devices", type=int, default=2)
    _n = _ap.parse_known_args(sys.argv[1:])[0].devices
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={_n}")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

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


def optimizers(rank: int, svd: bool) -> dict:
    stacked = galorax.GaLoreDimensionNumbers(reduction_axis=1, output_axis=2)
    flat = optax.contrib.GaLoreDimensionNumbers(reduction_axis=(0, 1), output_axis=2)

    def ours(axes, **kw):
        return galorax.scale_by_galore(
            rank, 1, weight_dimension_numbers=stacked, stagger=False, refresh_axes=axes, **kw
        )

    txs = {
        "optax.adam": lambda: optax.scale_by_adam(),
        "galorax randomized, every device all slices": lambda: ours(None),
        "galorax randomized (householder), every device all slices": lambda: ours(
            None, subspace=galorax.Randomized(qr="householder")
        ),
        'galorax randomized, refresh_axes="data"': lambda: ours("data"),
    }
    if svd:
        txs["galorax svd, every device all slices"] = lambda: ours(None, subspace="svd")
        txs['galorax svd, refresh_axes="data"'] = lambda: ours("data", subspace="svd")
        txs["optax.contrib.galore (svd of the (L*M, N) stack)"] = lambda: (
            optax.contrib.scale_by_galore(rank, 1, weight_dimension_numbers=flat)
        )
    return txs


def compiled_step(tx, params: dict, grad: dict, mesh):
    rep = NamedSharding(mesh, P())
    state_sh = sharding.state_shardings(tx, params, mesh)
    state = jax.jit(tx.init, out_shardings=state_sh)(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "svd on a mesh gathers" (here: nothing to gather)
        update = jax.jit(tx.update, out_shardings=({"w": rep}, state_sh))
        step = update.lower(grad, state).compile()
    _, state = step(grad, state)  # warm-up, a refresh too
    jax.block_until_ready(state)
    return step, state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=2, help="simulated CPU devices (data axis)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--m", type=int, default=1024)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--svd", action="store_true", help="also the exact-SVD refreshes")
    a = ap.parse_args()
    mesh = sharding.make_mesh(f"data={jax.device_count()}", explicit=False)
    rep = NamedSharding(mesh, P())
    shape = (a.layers, a.m, a.n)
    params = {"w": jax.device_put(jnp.zeros(shape), rep)}
    grad = {"w": jax.device_put(jax.random.normal(jax.random.key(0), shape), rep)}
    steps = {}
    for name, make in optimizers(a.rank, a.svd).items():
        t = time.perf_counter()
        steps[name] = [*compiled_step(make(), params, grad, mesh), [], []]
        print(f"compiled {name} in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    for _ in range(a.rounds):  # interleaved: machine load hits every optimizer alike
        for entry in steps.values():
            step, state, wall, cpu = entry
            t, c = time.perf_counter(), time.process_time()
            u, entry[1] = step(grad, state)
            jax.block_until_ready((u, entry[1]))
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    med = {k: (statistics.median(v[2]), statistics.median(v[3])) for k, v in steps.items()}
    base = med['galorax randomized, refresh_axes="data"']
    print(f"jax {jax.__version__}, optax {optax.__version__}; {jax.device_count()} devices")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS')}; rounds {a.rounds}\n")
    print(
        f"| ({a.layers}, {a.m}, {a.n}) f32, rank {a.rank}, data={jax.device_count()} "
        "| step, wall | CPU | wall / spread randomized | CPU / spread randomized |"
    )
    print("|---|---|---|---|---|")
    for name, (w, c) in med.items():
        ratios = f"{w / base[0]:.2f} | {c / base[1]:.2f}"
        print(f"| {name} | {w * 1e3:.0f} ms | {c * 1e3:.0f} ms | {ratios} |")


if __name__ == "__main__":
    main()
