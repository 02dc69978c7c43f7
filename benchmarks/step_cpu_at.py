"""CPU time per step of `galorax train`'s plain step (tiny, f32, 16 x 128, gap 50) for the
galorax checked out at a given path: the same step before and after a change, run in turns.

    git worktree add /tmp/old <commit>
    for i in 1 2; do for r in /tmp/old .; do
        OMP_NUM_THREADS=1 python benchmarks/step_cpu_at.py $r galore; done; done

Prints the mean CPU and wall milliseconds of 60 steps after the first (compiled) one. The
editable install's import hook is dropped so that ``galorax`` comes from the path given.
"""

from __future__ import annotations

import importlib
import os
import sys
import time


def load(root: str):
    """``galorax``'s app modules from ``root`` (not from the editable install)."""
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path.insert(0, os.path.abspath(root))
    galorax = importlib.import_module("galorax")
    if not galorax.__file__.startswith(os.path.abspath(root)):
        raise SystemExit(f"galorax came from {galorax.__file__}, not {root}")
    names = ("model", "config", "optimizers", "step")
    return [importlib.import_module(f"galorax.app.{n}") for n in names]


def main() -> None:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as `galorax train`
    root, name = sys.argv[1], sys.argv[2]
    model, config, optimizers, step_lib = load(root)
    import jax
    import jax.numpy as jnp
    import numpy as np

    run = config.TrainConfig(
        preset="tiny", optimizer=name, batch_size=16, seq_len=128, update_proj_gap=50
    )
    cfg, mcfg = config.resolve_config(run), model.get_preset("tiny")
    params = model.init_params(mcfg, jax.random.key(0))
    opt = optimizers.run_optimizer(cfg, params)
    state, step = opt.init(params), step_lib.make_train_step(mcfg, opt, cfg.remat)
    rng = np.random.default_rng(0)
    batches = [
        jnp.asarray(rng.integers(0, mcfg.vocab_size, (16, 129)), jnp.int32) for _ in range(8)
    ]
    params, state, loss = step(params, state, batches[0])
    loss.block_until_ready()
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(60):
        params, state, loss = step(params, state, batches[i % 8])
    loss.block_until_ready()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(f"{root} {name}: cpu/step {cpu / 60 * 1e3:.1f} ms, wall/step {wall / 60 * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
