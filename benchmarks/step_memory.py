"""XLA's memory analysis of the compiled train step (issue 13, points 1 and 2).

Compiles ``galorax.app.step``'s train step on abstract inputs (CPU, compile only: nothing is
allocated) for AdamW, 8-bit AdamW, GaLore and 8-bit GaLore, and prints peak, temporaries and
argument bytes of each, beside the figures recorded before the chunked GaLore update and
chunked 8-bit moments (issue 13's table).

Rows named ``apollo...`` are APOLLO and APOLLO-Mini (rank as GaLore's; ``8bit``: 8-bit
moments). Rows named ``...+pl`` use per-layer updates (``--per-layer-updates``), ``+int8P`` int8
projectors. Every row compiles the step ``galorax train`` runs with those flags
(:func:`galorax.app.planner.compiled_step_memory`, gradient clipping included).

Rows named ``optax...`` are the peers, in the step an optax user writes: ``value_and_grad``,
``update``, ``apply_updates``, params and state donated, on the same model and batch:
``optax.adamw`` and ``optax.contrib.galore`` behind ``optax.clip_by_global_norm(1.0)`` (as
``galorax train`` clips), and ``optax.adamw-noclip`` without it. optax's GaLore cannot take
a stacked layer axis, so its layer matrices are folded (one projector per stack: the app's
``optax-galore``); embeddings, head and norms stay unprojected, as in galorax.

``--target h100`` (or ``h200``, ``rtx4090``: :mod:`galorax.app.targets`) compiles every row
for that GPU instead of the CPU: XLA:GPU's analysis, no GPU needed, but JAX's CUDA plugin
(``pip install "jax[cuda13]"``; run with ``JAX_PLATFORMS=cpu``).

``--devices 8`` compiles every row FSDP-sharded over 8 devices (``galorax train --mesh
fsdp=8``'s placement; the peers' params and state placed the same way), one sequence per
device: the bytes are per device. With ``--target``, 8 compile-only GPUs; without, as many
simulated CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``).

Run:
    python benchmarks/step_memory.py                    # tiny..130m, 350m (f32, 4 x 256), 1b, 7b
    JAX_PLATFORMS=cpu python benchmarks/step_memory.py --target h100   # compiled for an H100
    JAX_PLATFORMS=cpu python benchmarks/step_memory.py --target h100 --devices 8 --presets 7b
    python benchmarks/step_memory.py --presets 1b       # one preset
    python benchmarks/step_memory.py --json             # one JSON object per row
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

from galorax import step_memory
from galorax.app import model as model_lib
from galorax.app.distributed import TrainPlacement
from galorax.app.flat_state import with_shardings
from galorax.app.optimizers import galore_dimension_numbers
from galorax.app.planner import compiled_step_memory
from galorax.app.targets import TARGETS, target_devices
from galorax.sharding import make_mesh

#: Peak bytes (GB) of issue 13's table, before chunking: preset -> optimizer -> GB.
BEFORE_GB: dict[str, dict[str, float]] = {
    "350m": {"adamw": 9.60, "adamw8bit": 10.94, "galore": 8.12, "galore8bit": 8.15},
    "1b": {"adamw": 16.05, "adamw8bit": 26.70, "galore": 14.41, "galore8bit": 14.58},
}

#: Each preset's setting: dtype, remat, batch size, sequence length, GaLore rank.
SMALL = dict(dtype=jnp.bfloat16, remat=True, batch_size=1, seq_len=256)
SETTINGS: dict[str, dict[str, Any]] = {
    "tiny": dict(SMALL, rank=64),
    "60m": dict(SMALL, rank=128),
    "130m": dict(SMALL, rank=256),
    "350m": dict(dtype=jnp.float32, remat=False, batch_size=4, seq_len=256, rank=256),
    "1b": dict(dtype=jnp.bfloat16, remat=True, batch_size=1, seq_len=256, rank=512),
    "7b": dict(dtype=jnp.bfloat16, remat=True, batch_size=1, seq_len=256, rank=1024),
}

#: The peers' rows (:func:`peer_memory`).
PEERS = ("optax.adamw", "optax.adamw-noclip", "optax.contrib.galore")
#: Rows: ``optimizer[+pl][+int8P]`` (per-layer updates, int8 projectors), then the peers.
OPTIMIZERS = (
    "adamw",
    "adamw8bit",
    "galore",
    "galore8bit",
    "galore+pl",
    "galore8bit+pl",
    "galore8bit+pl+int8P",
    "apollo",
    "apollo8bit",
    "apollo-mini",
    "apollo-mini8bit",
    "apollo+pl",
    "apollo8bit+pl",
    "apollo-mini+pl",
    "apollo-mini8bit+pl",
    *PEERS,
)
#: The rows the ratios are taken against: galorax's AdamW, then optax's (with clipping).
BASES = ("adamw", "optax.adamw")
#: The rows each preset compiles by default (7b: the plain rows and the paper's 8-bit runs).
PLAIN = ("adamw", "adamw8bit", "galore", "galore8bit")
DEFAULT_ROWS = {
    "tiny": PLAIN,
    "60m": PLAIN,
    "130m": PLAIN,
    "7b": (
        *PLAIN,
        "galore8bit+pl",
        "galore8bit+pl+int8P",
        "apollo",
        "apollo-mini",
        "apollo8bit+pl",
        "apollo-mini+pl",
        "apollo-mini8bit+pl",
        *PEERS,
    ),
}


def peer_optimizer(name: str, params: Any, rank: int) -> optax.GradientTransformation:
    """A peer of :data:`PEERS` as an optax user builds it (learning rate 1e-3)."""
    if name == "optax.adamw-noclip":
        return optax.adamw(1e-3)
    if name == "optax.adamw":
        opt = optax.adamw(1e-3)
    else:
        dims = galore_dimension_numbers(params, folded=True)
        opt = optax.contrib.galore(1e-3, rank=rank, weight_dimension_numbers=dims)
    return optax.chain(optax.clip_by_global_norm(1.0), opt)


def peer_step(cfg: model_lib.ModelConfig, opt: optax.GradientTransformation, remat: bool) -> Any:
    """The plain optax train step ``(params, state, batch) -> (params, state, loss)``,
    jitted with params and state donated (as ``galorax train``'s)."""

    def step(params: Any, state: Any, batch: jax.Array) -> Any:
        loss, grads = jax.value_and_grad(model_lib.loss_fn)(params, batch, cfg, remat)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def peer_memory(
    preset: str, name: str, cfg: model_lib.ModelConfig, devices: list | None = None
) -> dict[str, int]:
    """XLA's memory analysis of the plain optax train step with the peer ``name``, compiled
    for ``devices`` (None: the default device; several: FSDP-sharded over them)."""
    s = setting(preset, devices)
    params = model_lib.abstract_params(cfg, s["dtype"])
    opt = peer_optimizer(name, params, s["rank"])
    state = jax.eval_shape(opt.init, params)
    batch = jax.ShapeDtypeStruct((s["batch_size"], s["seq_len"] + 1), jnp.int32)
    plan = fsdp_placement(params, devices)
    if plan is not None:
        # optax.contrib.galore's init cannot be traced with sharded types (its reshapes do
        # not say their output sharding): its state stays replicated, what a user gets.
        galore = name == "optax.contrib.galore"
        state = with_shardings(state, plan.replicated if galore else plan.state(opt, params))
        params = with_shardings(params, plan.params)
        batch = plan.abstract_batch(batch.shape, jnp.int32)
    elif devices is not None:
        one = jax.sharding.SingleDeviceSharding(devices[0])
        params, state, batch = with_shardings((params, state, batch), one)
    compiled = peer_step(cfg, opt, s["remat"]).lower(params, state, batch).compile()
    memory = step_memory(compiled)
    if memory is None:
        raise RuntimeError("this backend reports no memory analysis")
    return memory.as_dict()


def setting(preset: str, devices: list | None) -> dict[str, Any]:
    """:data:`SETTINGS`' ``preset``, with a sequence for each of several ``devices``."""
    n = len(devices or [None])
    return dict(SETTINGS[preset], batch_size=max(SETTINGS[preset]["batch_size"], n))


def fsdp_placement(params: Any, devices: list | None) -> TrainPlacement | None:
    """``galorax train --mesh fsdp=N``'s placement over several ``devices``, else None."""
    if devices is None or len(devices) == 1:
        return None
    return TrainPlacement.create(
        make_mesh({"fsdp": len(devices)}, explicit=False, devices=devices), params
    )


def measure(
    preset: str, option: str, vocab_size: int = 32000, devices: list | None = None
) -> dict[str, Any]:
    """One row: the compiled step's bytes for ``option`` on ``preset`` (see :data:`SETTINGS`),
    compiled for ``devices`` (see :func:`peer_memory`)."""
    s = setting(preset, devices)
    cfg = model_lib.get_preset(preset, vocab_size=vocab_size)
    start = time.perf_counter()
    if option in PEERS:
        return {
            "preset": preset,
            "optimizer": option,
            "before_peak_gb": None,
            **peer_memory(preset, option, cfg, devices),
            "compile_s": round(time.perf_counter() - start, 1),
        }
    mem = compiled_step_memory(
        cfg,
        option.split("+")[0],
        s["rank"],
        dtype=s["dtype"],
        batch_size=s["batch_size"],
        seq_len=s["seq_len"],
        remat=s["remat"],
        per_layer_updates="+pl" in option,
        projector_bits=8 if "+int8P" in option else None,
        device=devices[0] if devices else None,
        placement=fsdp_placement(model_lib.abstract_params(cfg, s["dtype"]), devices),
    )
    return {
        "preset": preset,
        "optimizer": option,
        "before_peak_gb": BEFORE_GB.get(preset, {}).get(option),
        "compile_s": round(time.perf_counter() - start, 1),
        **mem,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, help="default: all")
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    parser.add_argument("--target", help=f"compile for this GPU: {', '.join(TARGETS)} or a file")
    parser.add_argument("--devices", type=int, default=1, help="FSDP over this many devices")
    args = parser.parse_args()
    devices = target_devices(args.target, args.devices) if args.target else None
    if devices is None and args.devices > 1:
        devices = jax.devices()[: args.devices]
    where = devices[0].device_kind if devices else "CPU"
    if args.devices > 1:
        where = f"{where} x {args.devices}, FSDP, bytes per device"
    print(
        f"# {platform.node()} {platform.processor() or platform.machine()}, compile only ({where})"
    )
    if not args.json:
        print(
            f"{'preset':<6} {'optimizer':<20} {'before':>7} {'peak':>7} {'temp':>7} "
            f"{'argument':>8} {'vs adamw':>8} {'vs optax':>8} {'compile s':>9}"
        )
    for preset in args.presets:
        options = args.optimizers or DEFAULT_ROWS.get(preset, OPTIMIZERS)
        # The peer first, so every row can print its ratio to it.
        options = sorted(options, key=lambda o: o != "optax.adamw")
        base: dict[str, float] = {}
        for option in options:
            row = measure(preset, option, devices=devices)
            if option in BASES:
                base[option] = row["peak"]
            if args.json:
                print(json.dumps(row), flush=True)
                continue
            before = row["before_peak_gb"]
            ratios = [f"{row['peak'] / base[b]:.0%}" if b in base else "" for b in BASES]
            print(
                f"{preset:<6} {option:<20} {'-' if before is None else f'{before:.2f}':>7} "
                f"{row['peak'] / 1e9:>7.2f} {row['temp'] / 1e9:>7.2f} "
                f"{row['argument'] / 1e9:>8.2f} {ratios[0]:>8} {ratios[1]:>8} "
                f"{row['compile_s']:>9}",
                flush=True,
            )


if __name__ == "__main__":
    main()
