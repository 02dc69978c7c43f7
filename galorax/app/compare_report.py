"""What ``galorax compare`` writes: ``compare.md`` (:func:`format_report`, the best run per
spec beside AdamW, then the whole sweep) and ``compare.png`` (:func:`plot_comparison`).

Example:
    >>> mib(3 * 2**20), mib(None)
    ('3.00', '-')
"""

from __future__ import annotations

import math
import os
import pathlib
import platform
from typing import Any

import jax

from galorax.app.config import RunConfig
from galorax.app.report import save_figure


def best_runs(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The run with the lowest final validation loss per label."""
    best: dict[str, dict[str, Any]] = {}
    for r in results:
        v = r["summary"].get("val_loss", math.inf)
        if r["label"] not in best or v < best[r["label"]]["summary"].get("val_loss", math.inf):
            best[r["label"]] = r
    return best


def mib(n: float | None) -> str:
    """``n`` bytes in MiB (``-`` for None)."""
    return "-" if n is None else f"{n / 2**20:.2f}"


def format_report(
    results: list[dict[str, Any]], base: RunConfig, command: str, elapsed_s: float
) -> str:
    """The markdown report: best run per spec vs AdamW, then the whole sweep."""
    best = best_runs(results)
    ref = next((r for r in best.values() if r["summary"].get("optimizer") == "adamw"), None)
    rs = ref["summary"] if ref else {}

    def rel(a: float | None, b: float | None, fmt: str) -> str:
        return format(a / b, fmt) if a is not None and b and math.isfinite(a) else "-"

    any_s: dict[str, Any] = next((r["summary"] for r in results if "n_params" in r["summary"]), {})
    lines = [
        f"Model `{base.preset}` ({any_s.get('n_params', 0):,} parameters, {base.dtype}), "
        f"{base.steps} steps x {base.batch_size} x {base.seq_len} tokens, seed {base.seed}, "
        f"data: {any_s.get('data_source', '?')}.",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}; "
        f"jax {jax.__version__}; whole comparison {elapsed_s / 60:.1f} min.",
        "",
        "| run | best lr | final val loss | vs AdamW | opt state MiB | vs AdamW "
        "| step memory MiB (XLA) | tokens/s | vs AdamW | tokens/CPU-s | vs AdamW | refreshes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in best.items():
        s = r["summary"]
        mem = (s.get("step_memory") or {}).get("peak")
        ref_mem = (rs.get("step_memory") or {}).get("peak")
        lines.append(
            f"| {label} | {r['lr']:g} | {s.get('val_loss', math.inf):.4f} "
            f"| {rel(s.get('val_loss'), rs.get('val_loss'), '.3f')} "
            f"| {mib(s.get('opt_state_bytes'))} "
            f"| {rel(s.get('opt_state_bytes'), rs.get('opt_state_bytes'), '.0%')} "
            f"| {mib(mem)} ({rel(mem, ref_mem, '.0%')}) | {s.get('tokens_per_s', math.nan):.0f} "
            f"| {rel(s.get('tokens_per_s'), rs.get('tokens_per_s'), '.2f')}x "
            f"| {s.get('tokens_per_cpu_s', math.nan):.0f} "
            f"| {rel(s.get('tokens_per_cpu_s'), rs.get('tokens_per_cpu_s'), '.2f')}x "
            f"| {s.get('refreshes') if s.get('refreshes') is not None else '-'} |"
            if s.get("n_params")
            else f"| {label} | {r['lr']:g} | diverged | - | - | - | - | - | - | - | - | - |"
        )
    lines += ["", "Sweep (final validation loss per learning rate):", ""]
    lines += ["| run | lr | final val loss | tokens/s |", "|---|---|---|---|"]
    for r in results:
        s = r["summary"]
        v = s.get("val_loss", math.inf)
        lines.append(
            f"| {r['label']} | {r['lr']:g} | {'diverged' if not math.isfinite(v) else f'{v:.4f}'} "
            f"| {s.get('tokens_per_s', math.nan):.0f} |"
        )
    lines += [
        "",
        "Loss is nats per byte; tokens/s is the mean over all steps but the first of each run "
        "(projector refreshes included, amortized at their real frequency); tokens/CPU-s "
        "divides by the CPU time of all the process's threads, which other jobs on a shared "
        "machine do not inflate.",
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
    ]
    return "\n".join(lines) + "\n"


def comparison_figure(results: list[dict[str, Any]], title: str) -> Any:
    """The figure :func:`plot_comparison` saves (a matplotlib ``Figure``; close it after use):
    every spec's best run (AdamW's among them) as a labelled validation curve and a thin train
    EMA, over a memory/speed table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_runs(results)
    fig, (ax, tab) = plt.subplots(2, 1, figsize=(9, 7.5), gridspec_kw={"height_ratios": [3, 1]})
    for i, (label, r) in enumerate(best.items()):
        c = f"C{i}"
        tr = [(x["step"], x["loss"]) for x in r["metrics"] if "loss" in x]
        if tr:
            ema, sm = tr[0][1], []
            for _, v in tr:
                ema = 0.9 * ema + 0.1 * v if math.isfinite(v) else ema
                sm.append(ema)
            ax.plot([s for s, _ in tr], sm, color=c, alpha=0.5, lw=1)
        va = [(x["step"], x["val_loss"]) for x in r["metrics"] if "val_loss" in x]
        if va:
            ax.plot(
                *zip(*va, strict=True), "o-", color=c, ms=3, label=f"{label} (lr {r['lr']:g}) val"
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte); thin: train EMA")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    finite = [
        x["val_loss"]
        for r in best.values()
        for x in r["metrics"]
        if "val_loss" in x and x.get("step", 0) > 0 and math.isfinite(x["val_loss"])
    ]
    if finite:
        ax.set_ylim(min(finite) * 0.97, min(max(finite), min(finite) * 2.0))
    tab.axis("off")
    rows = []
    for label, r in best.items():
        s = r["summary"]
        rows.append(
            [
                label,
                f"{r['lr']:g}",
                f"{s.get('val_loss', math.inf):.4f}",
                mib(s.get("opt_state_bytes")),
                mib((s.get("step_memory") or {}).get("peak")),
                f"{s.get('tokens_per_s', math.nan):.0f}",
            ]
        )
    if rows:
        t = tab.table(
            cellText=rows,
            colLabels=["run", "lr", "val loss", "opt state MiB", "step mem MiB", "tokens/s"],
            loc="center",
        )
        t.scale(1, 1.3)
    fig.tight_layout()
    return fig


def plot_comparison(results: list[dict[str, Any]], path: pathlib.Path, title: str) -> None:
    """One PNG (written atomically): the best runs' curves (top) and a memory/speed table
    (bottom), as :func:`comparison_figure` draws them."""
    save_figure(comparison_figure(results, title), path)
