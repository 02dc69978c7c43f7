"""What a run reports: the end-of-run table (:func:`format_summary`: what the run measured,
and its sizes beside AdamW's computed ones) and the loss curves (:func:`plot_curves`,
``loss_curve.png``). Neither shows an AdamW figure it did not measure or compute: both point
to ``galorax compare`` (:func:`adamw_pointer`), which trains AdamW beside.

Example:
    >>> fmt_bytes(512), fmt_bytes(3 * 2**20)
    ('512 B', '3.00 MiB')
    >>> adamw_pointer("tiny")
    'AdamW not trained here: `galorax compare --preset tiny` trains it beside, measured'
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from galorax.app.rundir import atomic_path


def fmt_bytes(n: float | None) -> str:
    """``n`` bytes in B, KiB, MiB or GiB (``-`` for None)."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def adamw_pointer(preset: str | None = None) -> str:
    """The line that says AdamW was not trained, and which command trains it beside."""
    cmd = "galorax compare" + (f" --preset {preset}" if preset else "")
    return f"AdamW not trained here: `{cmd}` trains it beside, measured"


def _ratio(a: float | None, b: float | None) -> str:
    return f" ({a / b:.0%} of AdamW)" if a is not None and b else ""


def _table(title: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    """Aligned columns under ``title`` (a header line and a rule)."""
    widths = [max(len(r[i]) for r in [title, *rows]) for i in range(len(title))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(f"{c:<{w}}" for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(title), line(tuple("-" * w for w in widths)), *map(line, rows)]


def format_summary(s: dict[str, Any]) -> str:
    """The end-of-run table: what this run measured, then its sizes beside AdamW's.

    AdamW is not trained: its optimizer state (``jax.eval_shape``) and train step memory
    (XLA's analysis of its compiled step) are computed, and labelled so; a measured side by
    side is ``galorax compare``'s (the last line says how).
    """
    trained = s["optimizer"] == "adamw"  # AdamW itself: no computed AdamW beside it
    ref = {} if trained else s.get("adamw") or {}
    mem = (s.get("step_memory") or {}).get("peak")
    ref_mem = (ref.get("step_memory") or {}).get("peak")
    measured: list[tuple[str, ...]] = [
        ("val loss (start -> end)", f"{s['val_loss_start']:.4f} -> {s['val_loss']:.4f}"),
        ("val perplexity (per byte)", f"{s['val_ppl']:.3f}"),
        ("tokens/s (refreshes incl.)", f"{s['tokens_per_s']:.0f}"),
    ]
    sizes: list[tuple[str, ...]] = [
        ("parameters", f"{s['n_params']:,} ({fmt_bytes(s['param_bytes'])})", "same"),
        (
            "optimizer state",
            fmt_bytes(s["opt_state_bytes"])
            + _ratio(s["opt_state_bytes"], ref.get("opt_state_bytes")),
            fmt_bytes(ref.get("opt_state_bytes")),
        ),
        ("train step memory (XLA)", fmt_bytes(mem) + _ratio(mem, ref_mem), fmt_bytes(ref_mem)),
    ]
    head: tuple[str, ...] = ("sizes", s["optimizer"], "adamw (computed, not trained)")
    if not ref:
        sizes, head = [r[:2] for r in sizes], head[:2]
    lines = [*_table(("measured", s["optimizer"]), measured), "", *_table(head, sizes)]
    if not trained:
        lines += ["", adamw_pointer(s["preset"])]
    return "\n".join(lines)


def curves_figure(runs: dict[str, list[dict[str, Any]]], title: str = "") -> Any:
    """The figure :func:`plot_curves` saves (a matplotlib ``Figure``; close it after use).

    Each run's curves are labelled with its name; without an ``adamw`` run, a caption says
    AdamW was not trained here and which command trains it beside (:func:`adamw_pointer`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (label, recs) in enumerate(runs.items()):
        color = f"C{i}"
        tr = [(r["step"], r["loss"]) for r in recs if "loss" in r and math.isfinite(r["loss"])]
        if tr:
            s, loss = np.array(tr).T
            ema, out = loss[0], []
            for v in loss:  # exponential smoothing: per-step losses are noisy
                ema = 0.9 * ema + 0.1 * v
                out.append(ema)
            ax.plot(s, out, color=color, alpha=0.6, lw=1, label=f"{label} train (EMA)")
        va = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
        if va:
            s, v = np.array(va).T
            ax.plot(s, v, "o-", color=color, lw=2, ms=4, label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if "adamw" not in runs:  # the README's figures stand beside AdamW's: say where those are
        fig.text(0.5, 0.01, adamw_pointer(), ha="center", va="bottom", fontsize=8)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
    else:
        fig.tight_layout()
    return fig


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: pathlib.Path, title: str = "") -> None:
    """Train loss (smoothed) and validation loss per step for each run, to one PNG.

    Args:
        runs: Each run's ``metrics.jsonl`` records, by the label its curves get.
        path: The PNG to write (atomically: a full disk leaves the old one, never a 0-byte one).
        title: The plot's title.
    """
    save_figure(curves_figure(runs, title), path)


def save_figure(fig: Any, path: pathlib.Path) -> None:
    """Writes ``fig`` to ``path`` as a PNG, atomically, and closes it (even on failure)."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
