"""XLA's memory analysis of the compiled train step (issue 13, points 1 and 2).

Compiles ``galorax.app.step``'s train step on abstract inputs (CPU, compile only: nothing is
allocated) for AdamW, 8-bit AdamW, GaLore and 8-bit GaLore, and prints peak, temporaries and
argument bytes of each, beside the figures recorded before the chunked GaLore update and
chunked 8-bit moments (issue 13's table).

Rows named ``...+pl`` use per-layer updates (``--per-layer-updates``), ``+int8P`` int8
projectors. Every row compiles the step ``galorax train`` runs with those flags
(:func:`galorax.app.planner.compiled_step_memory`, gradient clipping included).

Run:
    python benchmarks/step_memory.py                    # tiny..130m, 350m (f32, 4 x 256), 1b, 7b
    python benchmarks/step_memory.py --presets 1b       # one preset
    python benchmarks/step_memory.py --json             # one JSON object per row
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import jax.numpy as jnp

from galorax.app import model as model_lib
from galorax.app.planner import compiled_step_memory

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

#: Rows: ``optimizer[+pl][+int8P]`` (per-layer updates, int8 projectors).
OPTIMIZERS = (
    "adamw",
    "adamw8bit",
    "galore",
    "galore8bit",
    "galore+pl",
    "galore8bit+pl",
    "galore8bit+pl+int8P",
)
#: The rows each preset compiles by default (7b: the plain rows and the paper's 8-bit runs).
PLAIN = ("adamw", "adamw8bit", "galore", "galore8bit")
DEFAULT_ROWS = {
    "tiny": PLAIN,
    "60m": PLAIN,
    "130m": PLAIN,
    "7b": (*PLAIN, "galore8bit+pl", "galore8bit+pl+int8P"),
}


def measure(preset: str, option: str, vocab_size: int = 32000) -> dict[str, Any]:
    """One row: the compiled step's bytes for ``option`` on ``preset`` (see :data:`SETTINGS`)."""
    s = SETTINGS[preset]
    cfg = model_lib.get_preset(preset, vocab_size=vocab_size)
    start = time.perf_counter()
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
    args = parser.parse_args()
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, compile only (CPU)")
    if not args.json:
        print(
            f"{'preset':<6} {'optimizer':<20} {'before':>7} {'peak':>7} {'temp':>7} "
            f"{'argument':>8} {'vs adamw':>8} {'compile s':>9}"
        )
    for preset in args.presets:
        adamw = None
        for option in args.optimizers or DEFAULT_ROWS.get(preset, OPTIMIZERS):
            row = measure(preset, option)
            if option == "adamw":
                adamw = row["peak"]
            if args.json:
                print(json.dumps(row), flush=True)
                continue
            before = row["before_peak_gb"]
            ratio = "" if adamw is None else f"{row['peak'] / adamw:.0%}"
            print(
                f"{preset:<6} {option:<20} {'-' if before is None else f'{before:.2f}':>7} "
                f"{row['peak'] / 1e9:>7.2f} {row['temp'] / 1e9:>7.2f} "
                f"{row['argument'] / 1e9:>8.2f} {ratio:>8} {row['compile_s']:>9}",
                flush=True,
            )


if __name__ == "__main__":
    main()
