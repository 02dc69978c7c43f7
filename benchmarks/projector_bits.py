"""GaLore with float32 vs int8 vs int4 projectors (``projector_bits``) on the ``tiny`` preset.

Same model, data, seed and schedule for every run (the ``galorax train --preset tiny`` GaLore
defaults: lr 1e-2, scale 0.25, rank 64, clip 1.0, cosine with 10% warmup, randomized refresh
seeded by the run's seed, rotated moments, staggered refreshes), 400 steps with
``update_proj_gap=200`` so every layer refreshes (and rotates its moments) at least once after
step 0. Only ``projector_bits`` changes. Reports the final validation loss, the optimizer-state
and projector bytes, and the reconstruction error of quantizing the float run's final
projectors (``galorax.projector_error`` against the gradient at the final parameters). Usage::

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
        python benchmarks/projector_bits.py --steps 400 --update-proj-gap 200
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tinyrun

from galorax import GaLoreState
from galorax.accounting import find_galore_states, tree_bytes
from galorax.app.optimizers import galore_dimension_numbers, run_optimizer
from galorax.dimension_numbers import MatrixView, resolve_dimension_numbers
from galorax.quantization import ProjectorError, projector_error, quantize_projector
from galorax.schedule import count_refreshes

BITS = ("32", "8", "4")


def galore_state(state: Any) -> GaLoreState:
    (found,) = find_galore_states(state)
    return found


def _matrix_errors(p: jax.Array, g: jax.Array, d: Any, bits: int) -> list[list[float]]:
    """Errors of quantizing each projector slice of one leaf, measured on its gradient."""
    g2 = MatrixView.of(g.shape, d).to_matrix(g).astype(jnp.float32)
    p = p.reshape((-1,) + p.shape[-2:])
    g2 = g2.reshape((-1,) + g2.shape[-2:])
    rows = []
    for pi, gi in zip(p, g2, strict=True):
        if pi.shape[0] != gi.shape[0]:  # right projection: P spans the columns
            gi = gi.T
        e = projector_error(pi, quantize_projector(pi, bits=bits), gi)
        rows.append([float(x) for x in e])
    return rows


def reconstruction(params: Any, state: Any, grads: Any) -> dict[str, dict[str, float]]:
    """Quantizes every projector of ``state`` (float) and measures it on ``grads``.

    Errors are averaged over all projected matrices (each layer of each stacked leaf).
    """
    dims = resolve_dimension_numbers(params, galore_dimension_numbers(params))
    projs = jax.tree.leaves(
        galore_state(state).projector, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
    )
    out: dict[str, dict[str, float]] = {}
    for bits in (8, 4):
        rows: list[list[float]] = []
        for p, g, d in zip(projs, jax.tree.leaves(grads), dims, strict=True):
            if d is not None and not isinstance(p, optax.MaskedNode):
                rows += _matrix_errors(p, g, d, bits)
        mean = np.mean(np.asarray(rows), axis=0)
        out[str(bits)] = dict(zip(ProjectorError._fields, mean.tolist(), strict=True))
        out[str(bits)]["matrices"] = len(rows)
    return out


def _print_reconstruction(errors: dict[str, dict[str, float]]) -> None:
    for b, e in errors.items():
        print(
            f"  int{b} of the final f32 projectors ({e['matrices']} matrices, mean): "
            f"||Q-P||/||P|| {e['relative']:.4f}, ||Q^TQ-I||/sqrt(r) "
            f"{e['orthogonality']:.4f}, energy {e['energy']:.4f} -> "
            f"{e['energy_quantized']:.4f}, update error {e['update_relative']:.4f}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--update-proj-gap", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bits", nargs="+", default=list(BITS), choices=BITS)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    bench = tinyrun.Bench.create(
        preset="tiny",
        optimizer="galore",
        steps=args.steps,
        seed=args.seed,
        update_proj_gap=args.update_proj_gap,
    )
    run = bench.run
    print(f"{bench.describe()}, gap {run.update_proj_gap}, rank {run.rank}, lr {run.lr}")
    print(
        f"{'projector':<9} {'state bytes':>12} {'proj bytes':>11} {'train loss':>10} "
        f"{'val loss':>8} {'cpu s/step':>10}",
        flush=True,
    )
    results: dict[str, Any] = {"config": dataclasses.asdict(run), "runs": {}}
    for name in args.bits:
        bits = int(name)  # 32: float projectors
        opt = run_optimizer(dataclasses.replace(run, projector_bits=bits), bench.init_params())
        r = tinyrun.train(bench, opt)
        g = galore_state(r.state)
        results["runs"][name] = row = {
            "state_bytes": tree_bytes(r.state),
            "projector_bytes": tree_bytes(g.projector),
            "train_loss_last20": float(np.mean(r.losses[-20:])),
            "val_loss": bench.val_loss(r.params),
            "cpu_s_per_step": r.cpu_s_per_step,
            "wall_s": r.wall_s_per_step * run.steps,
            "refreshes": count_refreshes(r.state),
        }
        print(
            f"{'f32' if bits == 32 else f'int{bits}':<9} {row['state_bytes']:>12,} "
            f"{row['projector_bytes']:>11,} {row['train_loss_last20']:>10.4f} "
            f"{row['val_loss']:>8.4f} {r.cpu_s_per_step:>10.3f}",
            flush=True,
        )
        if bits == 32:  # quantize the float run's final projectors: what would be lost?
            grads = bench.grad(r.params, bench.evals[0])
            results["reconstruction"] = reconstruction(r.params, r.state, grads)
            _print_reconstruction(results["reconstruction"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
