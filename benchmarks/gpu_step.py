"""The real peak of ``galorax train``'s step on an accelerator, next to XLA's analysis.

For each configuration: XLA's memory analysis of the compiled step (what ``galorax memory
--xla`` reports), then the step run on real (random) parameters a few times, the device's
``memory_stats()["peak_bytes_in_use"]`` and tokens/s. Run by ``benchmarks/gpu.sh``; on CPU
(no ``memory_stats``) it runs the ``micro`` smoke configuration and prints ``n/a``.

    python benchmarks/gpu_step.py --config 1b:galore8bit+pl --steps 5
    python benchmarks/gpu_step.py --config 1b:optax.adamw --steps 5   # a peer's plain step

A peer (``optax.adamw``, ``optax.adamw-noclip``, ``optax.contrib.galore``) runs in the plain
optax step of ``benchmarks/step_memory.py``.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from step_memory import PEERS, peer_optimizer, peer_step  # this folder's script

from galorax import step_memory
from galorax.app import model as model_lib
from galorax.app.config import DTYPES, TrainConfig, resolve_config
from galorax.app.optimizers import run_optimizer
from galorax.app.step import compile_step

RANKS = {"micro": 8, "tiny": 64, "350m": 256, "1b": 512, "7b": 1024}


def run_one(spec: str, steps: int, vocab: int) -> dict:
    """``preset:optimizer[+pl][+int8P]``: compile, run ``steps`` steps, measure."""
    preset, _, option = spec.partition(":")
    peer = option in PEERS
    name = "adamw" if peer else option.split("+")[0]  # a peer: the run's settings only
    train = TrainConfig(
        preset=preset,
        optimizer=name,
        rank=RANKS[preset] if name.startswith("galore") else None,
        dtype="bfloat16",
        remat=True,
        batch_size=1,
        seq_len=256,
        per_layer_updates="+pl" in option,
        projector_bits=8 if "+int8P" in option else None,
    )
    run = resolve_config(train)
    mcfg = model_lib.get_preset(preset, vocab_size=vocab)
    params = model_lib.init_params(mcfg, jax.random.key(0), DTYPES[run.dtype])
    opt = peer_optimizer(option, params, RANKS[preset]) if peer else run_optimizer(run, params)
    state = opt.init(params)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (1, 257), dtype=np.int32))
    if peer:
        compiled = peer_step(mcfg, opt, run.remat).lower(params, state, batch).compile()
    else:
        compiled = compile_step(mcfg, opt, params, state, batch, run.remat)
    xla = step_memory(compiled)
    params, state, loss = compiled(params, state, batch)  # first call: projectors, warm-up
    loss.block_until_ready()
    start = time.perf_counter()
    for _ in range(steps):
        params, state, loss = compiled(params, state, batch)
    loss.block_until_ready()
    seconds = (time.perf_counter() - start) / max(steps, 1)
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "config": spec,
        "device": jax.devices()[0].device_kind,
        "xla_peak_gb": None if xla is None else round(xla.peak / 1e9, 2),
        "real_peak_gb": round(stats["peak_bytes_in_use"] / 1e9, 2) if stats else None,
        "tokens_per_s": round(256 / seconds, 1),
        "loss": float(loss),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="preset:optimizer[+pl][+int8P]")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--vocab-size", type=int, default=32000)
    args = parser.parse_args()
    print(json.dumps(run_one(args.config, args.steps, args.vocab_size)), flush=True)


if __name__ == "__main__":
    main()
