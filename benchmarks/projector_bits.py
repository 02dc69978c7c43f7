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
import resource
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import galorax
from galorax.app import data as data_lib
from galorax.app import model as model_lib
from galorax.app import train as train_lib
from galorax.app.planner import _find_galore_states, tree_bytes
from galorax.dimension_numbers import MatrixView, resolve_dimension_numbers
from galorax.quantization import ProjectorError, projector_error, quantize_projector
from galorax.transform import GaLoreState

BITS = ("32", "8", "4")


def make(bits: int | None, cfg: train_lib.TrainConfig, params: Any) -> optax.GradientTransformation:
    """``galorax train``'s GaLore optimizer (clip, then GaLore) with ``projector_bits``."""
    assert cfg.lr is not None and cfg.warmup is not None and cfg.steps is not None
    assert cfg.rank is not None
    opt = galorax.galore(
        train_lib.make_schedule(cfg.lr, cfg.warmup, cfg.steps),
        rank=cfg.rank,
        update_proj_gap=cfg.update_proj_gap,
        scale=cfg.scale,
        weight_decay=cfg.weight_decay,
        weight_dimension_numbers=train_lib.galore_dimension_numbers(params),
        subspace=galorax.Randomized(seed=cfg.seed),
        projector_bits=bits,
    )
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)


def galore_state(state: Any) -> GaLoreState:
    (found,) = _find_galore_states(state)
    return found


def reconstruction(params: Any, state: Any, grads: Any) -> dict[str, dict[str, float]]:
    """Quantizes every projector of ``state`` (float) and measures it on ``grads``.

    Errors are averaged over all projected matrices (each layer of each stacked leaf).
    """
    dims = resolve_dimension_numbers(params, train_lib.galore_dimension_numbers(params))
    projs = jax.tree.leaves(
        galore_state(state).projector, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
    )
    out: dict[str, dict[str, float]] = {}
    for bits in (8, 4):
        rows: list[list[float]] = []
        for p, g, d in zip(projs, jax.tree.leaves(grads), dims, strict=True):
            if d is None or isinstance(p, optax.MaskedNode):
                continue
            g2 = MatrixView.of(g.shape, d).to_matrix(g).astype(jnp.float32)
            p = p.reshape((-1,) + p.shape[-2:])
            g2 = g2.reshape((-1,) + g2.shape[-2:])
            for pi, gi in zip(p, g2, strict=True):
                if pi.shape[0] != gi.shape[0]:  # right projection: P spans the columns
                    gi = gi.T
                e = projector_error(pi, quantize_projector(pi, bits=bits), gi)
                rows.append([float(x) for x in e])
        mean = np.mean(np.asarray(rows), axis=0)
        out[str(bits)] = dict(zip(ProjectorError._fields, mean.tolist(), strict=True))
        out[str(bits)]["matrices"] = len(rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--update-proj-gap", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bits", nargs="+", default=list(BITS), choices=BITS)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    cfg = train_lib.resolve_config(
        train_lib.TrainConfig(
            preset="tiny",
            optimizer="galore",
            steps=args.steps,
            seed=args.seed,
            update_proj_gap=args.update_proj_gap,
        )
    )
    cfg = dataclasses.replace(cfg, optimizer="galore")
    mcfg = model_lib.get_preset("tiny")
    corpus = data_lib.load_corpus(cfg.data)
    evals = data_lib.eval_batches(corpus.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    eval_loss = jax.jit(lambda p, b: model_lib.loss_fn(p, b, mcfg))
    grad_fn = jax.jit(jax.grad(lambda p, b: model_lib.loss_fn(p, b, mcfg)))
    print(
        f"tiny: {model_lib.count_params(model_lib.abstract_params(mcfg)) / 1e6:.2f}M params, "
        f"{args.steps} steps, gap {cfg.update_proj_gap}, rank {cfg.rank}, lr {cfg.lr}, "
        f"batch {cfg.batch_size} x {cfg.seq_len}, seed {args.seed}"
    )
    print(
        f"{'projector':<9} {'state bytes':>12} {'proj bytes':>11} {'train loss':>10} "
        f"{'val loss':>8} {'cpu s/step':>10}",
        flush=True,
    )
    results: dict[str, Any] = {"config": dataclasses.asdict(cfg), "runs": {}}
    for name in args.bits:
        bits = None if name == "32" else int(name)
        params = model_lib.init_params(mcfg, jax.random.key(cfg.seed))
        opt = make(bits, cfg, params)
        state = opt.init(params)
        step = train_lib.make_train_step(mcfg, opt)
        losses: list[float] = []
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.time()
        for i in range(args.steps):
            batch = data_lib.sample_batch(corpus.train, cfg.batch_size, cfg.seq_len, cfg.seed, i)
            params, state, loss = step(params, state, batch)
            losses.append(float(loss))
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / args.steps
        val = float(np.mean([eval_loss(params, b) for b in evals]))
        g = galore_state(state)
        run = {
            "state_bytes": tree_bytes(state),
            "projector_bytes": tree_bytes(g.projector),
            "train_loss_last20": float(np.mean(losses[-20:])),
            "val_loss": val,
            "cpu_s_per_step": cpu,
            "wall_s": time.time() - t0,
            "refreshes": int(sum(int(jnp.sum(s.refreshes)) for s in _schedules(g))),
        }
        results["runs"][name] = run
        print(
            f"{'f32' if bits is None else f'int{bits}':<9} {run['state_bytes']:>12,} "
            f"{run['projector_bytes']:>11,} {run['train_loss_last20']:>10.4f} {val:>8.4f} "
            f"{cpu:>10.3f}",
            flush=True,
        )
        if bits is None:  # quantize the float run's final projectors: what would be lost?
            grads = grad_fn(params, evals[0])
            results["reconstruction"] = reconstruction(params, state, grads)
            for b, e in results["reconstruction"].items():
                print(
                    f"  int{b} of the final f32 projectors ({e['matrices']} matrices, mean): "
                    f"||Q-P||/||P|| {e['relative']:.4f}, ||Q^TQ-I||/sqrt(r) "
                    f"{e['orthogonality']:.4f}, energy {e['energy']:.4f} -> "
                    f"{e['energy_quantized']:.4f}, update error {e['update_relative']:.4f}",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


def _schedules(g: GaLoreState) -> list[Any]:
    return [
        s
        for s in jax.tree.leaves(g.schedule, is_leaf=lambda x: hasattr(x, "refreshes"))
        if hasattr(s, "refreshes")
    ]


if __name__ == "__main__":
    main()
