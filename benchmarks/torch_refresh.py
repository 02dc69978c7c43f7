"""galorax.torch vs galore-torch 1.0: refresh time and optimizer step time, one run.

For each shape (rank 128 by default), on the same synthetic gradient (spectrum 1/i):

* refresh: galore-torch's ``GaLoreProjector.get_orthogonal_matrix`` (full SVD) vs
  ``galorax.torch.projector.find_subspace`` with ``'svd'`` and ``'randomized'`` (cold, and
  warm-started from the previous projector), plus the gradient energy each basis captures;
* step: ``GaLoreAdamW.step()`` of both libraries on a step that refreshes and on one that
  does not (galore-torch's ``proj_type='std'`` for both; galorax with its defaults:
  randomized refresh, rotated moments).

Usage::

    pip install torch==2.13.0 && pip install galore-torch --no-deps
    python benchmarks/torch_refresh.py [--shapes 1024x1024,2048x2048,1024x4096] [--rank 128]

Prints a Markdown table (the one in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "torch"))
from galorax_torch_testlib import load_galore_torch  # noqa: E402  (the tests' loader)

from galorax.torch import GaLoreAdamW  # noqa: E402
from galorax.torch.projector import find_subspace, resolve_side  # noqa: E402


def _gradient(m: int, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    s = 1.0 / torch.arange(1, k + 1, dtype=torch.float32)
    a = torch.randn(m, k, generator=gen) / m**0.5
    b = torch.randn(n, k, generator=gen) / n**0.5
    return (a * s) @ b.T


# Wall clock by default; `--clock process` takes this process's CPU time instead, which with
# `--threads 1` measures the work itself and is robust to other processes on a shared machine.
_CLOCK = time.perf_counter


def _time(fn, repeat: int) -> float:
    fn()  # warm-up (allocations, lazy init)
    times = []
    for _ in range(repeat):
        t0 = _CLOCK()
        fn()
        times.append(_CLOCK() - t0)
    return statistics.median(times)


def _energy(g: torch.Tensor, basis: torch.Tensor, side: str) -> float:
    inside = basis.T @ g if side == "left" else g @ basis
    return float(inside.square().sum() / g.square().sum())


def bench_shape(m: int, n: int, rank: int, repeat: int, gt) -> dict[str, float]:
    g = _gradient(m, n)
    side = resolve_side((m, n), "std")
    out: dict[str, float] = {}

    # --- refresh alone
    ref_proj = gt.galore_projector.GaLoreProjector(rank, proj_type="std")
    out["refresh_galore_torch"] = _time(
        lambda: ref_proj.get_orthogonal_matrix(g, rank, type=side), repeat
    )
    out["refresh_svd"] = _time(lambda: find_subspace(g, rank, side, "svd"), repeat)
    out["refresh_rand"] = _time(lambda: find_subspace(g, rank, side, "randomized"), repeat)
    exact = find_subspace(g, rank, side, "svd")
    drifted = g + 0.05 * _gradient(m, n, seed=1)
    out["refresh_rand_warm"] = _time(
        lambda: find_subspace(drifted, rank, side, "randomized", warm=exact), repeat
    )
    rand = find_subspace(g, rank, side, "randomized")
    out["energy_exact"] = _energy(g, exact, side)
    out["energy_rand"] = _energy(g, rand, side)

    # --- optimizer steps (one matrix parameter)
    def make(kind: str):
        p = torch.nn.Parameter(torch.zeros(m, n))
        group = {
            "params": [p],
            "rank": rank,
            "update_proj_gap": 10**6,
            "scale": 0.25,
            "proj_type": "std",
        }
        if kind == "galore-torch":
            opt = gt.GaLoreAdamW([group], lr=1e-3, no_deprecation_warning=True)
        elif kind == "svd":
            opt = GaLoreAdamW([group], lr=1e-3, subspace="svd", moments="keep", stagger=False)
        else:
            opt = GaLoreAdamW([group], lr=1e-3)
        p.grad = g.clone()
        return p, opt

    for kind in ("galore-torch", "svd", "randomized"):
        # A refresh step: the first step of a fresh optimizer.
        def first_step(kind=kind):
            _, opt = make(kind)
            opt.step()

        out[f"step_refresh_{kind}"] = _time(first_step, repeat)
        _, opt = make(kind)
        opt.step()  # step 0 refreshes; the next ones do not (gap 1e6)
        out[f"step_plain_{kind}"] = _time(opt.step, max(repeat, 5))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1024x1024,2048x2048,1024x4096")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    global _CLOCK
    _CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    gt = load_galore_torch()
    if gt is None:
        sys.exit("galore-torch is needed: pip install galore-torch --no-deps")

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        f"(1-min load average at start {load:.1f}); rank {args.rank}; median of {args.repeat}; "
        f"{args.clock} clock"
    )
    print()
    print(
        "| shape | refresh: galore-torch SVD | galorax svd | galorax randomized "
        "(q=1, p=8) | warm-started | energy rand / exact | step w/ refresh: galore-torch "
        "| galorax svd | galorax default | step w/o refresh: galore-torch | galorax svd "
        "| galorax default |"
    )
    print("|" + "---|" * 12)
    for spec in args.shapes.split(","):
        m, n = (int(x) for x in spec.split("x"))
        r = bench_shape(m, n, args.rank, args.repeat, gt)

        def ms(key: str, r=r) -> str:
            return f"{1e3 * r[key]:.1f} ms"

        print(
            f"| {m}x{n} | {ms('refresh_galore_torch')} | {ms('refresh_svd')} "
            f"| {ms('refresh_rand')} | {ms('refresh_rand_warm')} "
            f"| {r['energy_rand']:.4f} / {r['energy_exact']:.4f} "
            f"| {ms('step_refresh_galore-torch')} | {ms('step_refresh_svd')} "
            f"| {ms('step_refresh_randomized')} | {ms('step_plain_galore-torch')} "
            f"| {ms('step_plain_svd')} | {ms('step_plain_randomized')} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
