"""``galorax compare``: several optimizers on the same model, data and seed.

Each run spec is ``OPTIMIZER[:key=value]...``; ``lr`` may list several values (a sweep) and
the best final validation loss is kept. Keys: ``lr``, ``rank``, ``scale``, ``gap``
(``update_proj_gap``), ``subspace``, ``moments``, ``stagger``, ``side``, ``weight_decay``,
``residual``, ``adaptive``, ``state_bits``, ``projector_bits``, ``label``. Writes
``compare.md`` (best run per spec, the whole sweep, the command) and ``compare.png`` (all
curves plus a memory/speed table) into ``--out``; each run's own files are under
``runs/<label>/lr-<lr>/``, and ``--resume`` reuses the finished ones.

Example:
    >>> spec = parse_spec("galore:lr=1e-2,2e-2:scale=0.25:label=g")
    >>> spec.label, spec.optimizer, spec.lrs, spec.overrides
    ('g', 'galore', [0.01, 0.02], {'scale': 0.25})
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import platform
import shlex
import shutil
import sys
import time
from typing import Any

import jax

from galorax.app.config import OPTIMIZERS, RunConfig, TrainConfig, UsageError, resolve_config
from galorax.app.flags import add_model_arguments, config_from_args, parse_bool
from galorax.app.rundir import MetricsLog, atomic_write_text
from galorax.app.train import train

#: The default sweep: each optimizer at a few peak learning rates around its known best.
DEFAULT_RUNS = (
    "adamw:lr=1e-3,2e-3",
    "optax-galore:lr=1e-2,2e-2",
    "galore:lr=1e-2,2e-2",
)

_KEYS: dict[str, Any] = {
    "rank": int,
    "scale": float,
    "gap": int,
    "update_proj_gap": int,
    "subspace": str,
    "moments": str,
    "stagger": parse_bool,
    "side": str,
    "weight_decay": float,
    "residual": str,
    "adaptive": parse_bool,
    "state_bits": int,
    "projector_bits": int,
}


@dataclasses.dataclass
class RunSpec:
    """One compared configuration: an optimizer, its overrides and its lr sweep."""

    label: str
    optimizer: str
    lrs: list[float | None]
    overrides: dict[str, Any]


def parse_spec(text: str) -> RunSpec:
    """Parses ``OPTIMIZER[:key=value]...`` (see the module docstring).

    Raises:
        UsageError: unknown optimizer or key, or a bad value.
    """
    head, *items = text.split(":")
    if head not in OPTIMIZERS:
        raise UsageError(f"--runs {text!r}: unknown optimizer {head!r}; use one of {OPTIMIZERS}")
    label: str = head
    lrs: list[float | None] = [None]
    over: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError("expected key=value")
            if key == "label":
                label = value
            elif key == "lr":
                lrs = [float(v) for v in value.split(",")]
            elif key in _KEYS:
                over["update_proj_gap" if key == "gap" else key] = _KEYS[key](value)
            else:
                raise ValueError(f"unknown key {key!r}; keys: lr, label, {', '.join(_KEYS)}")
        except ValueError as e:
            raise UsageError(f"--runs {text!r}: {item!r}: {e}") from e
    return RunSpec(label, head, lrs, over)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``compare`` flags: the shared model/schedule flags plus the run specs."""
    p.add_argument(
        "--runs",
        nargs="+",
        metavar="SPEC",
        help="OPTIMIZER[:lr=A,B][:scale=..][:rank=..][:gap=..][:moments=..][:label=..]; "
        f"default: {' '.join(DEFAULT_RUNS)}",
    )
    add_model_arguments(p)
    p.add_argument("--out", metavar="DIR", default=None, help="default runs/compare-<preset>")
    p.add_argument("--resume", action="store_true", help="reuse the finished runs in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a comparison in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _lr_dir(lr: float | None) -> str:
    return "lr-default" if lr is None else f"lr-{lr:g}"


def run_comparison(
    base: TrainConfig,
    specs: list[RunSpec],
    out: pathlib.Path,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Any = print,
) -> list[dict[str, Any]]:
    """Runs every spec at every lr (``base`` with the spec's settings); returns one result
    dict per (spec, lr)."""
    results = []
    for spec in specs:
        for lr in spec.lrs:
            cfg = dataclasses.replace(base, optimizer=spec.optimizer, lr=lr, **spec.overrides)
            run_dir = out / "runs" / spec.label / _lr_dir(lr)
            summary_path = run_dir / "summary.json"
            summary = None
            if resume and summary_path.exists():
                s = json.loads(summary_path.read_text())
                if s.get("steps_done") == s.get("steps"):
                    summary = s
                    log(f"reusing {run_dir}")
            if summary is None:
                log(f"== {spec.label} lr={lr if lr is not None else 'default'}")
                try:
                    summary = train(
                        cfg,
                        run_dir,
                        overwrite=True,
                        progress=progress,
                        adamw_ref=False,
                        log=log,
                    )
                except FloatingPointError as e:
                    log(f"   diverged: {e}")
                    summary = {"optimizer": spec.optimizer, "val_loss": math.inf, "diverged": True}
            recs = MetricsLog(run_dir / "metrics.jsonl").read()
            results.append(
                {
                    "label": spec.label,
                    "lr": summary.get("lr", lr),
                    "summary": summary,
                    "metrics": recs,
                }
            )
    return results


def _best(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    best: dict[str, dict[str, Any]] = {}
    for r in results:
        v = r["summary"].get("val_loss", math.inf)
        if r["label"] not in best or v < best[r["label"]]["summary"].get("val_loss", math.inf):
            best[r["label"]] = r
    return best


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def format_report(
    results: list[dict[str, Any]], base: RunConfig, command: str, elapsed_s: float
) -> str:
    """The markdown report: best run per spec vs AdamW, then the whole sweep."""
    best = _best(results)
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
            f"| {_mib(s.get('opt_state_bytes'))} "
            f"| {rel(s.get('opt_state_bytes'), rs.get('opt_state_bytes'), '.0%')} "
            f"| {_mib(mem)} ({rel(mem, ref_mem, '.0%')}) | {s.get('tokens_per_s', math.nan):.0f} "
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


def plot_comparison(results: list[dict[str, Any]], path: pathlib.Path, title: str) -> None:
    """One PNG: the best runs' curves (top) and a memory/speed table (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = _best(results)
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
                _mib(s.get("opt_state_bytes")),
                _mib((s.get("step_memory") or {}).get("peak")),
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """``galorax compare``: returns the exit status."""
    cfg = config_from_args(args, optimizer="adamw")
    base = resolve_config(cfg)  # checks the shared flags before any run
    specs = [parse_spec(s) for s in (args.runs or DEFAULT_RUNS)]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise UsageError(f"--runs: labels must differ ({labels}); add :label=NAME")
    out = pathlib.Path(args.out or f"runs/compare-{base.preset}")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other")
    if (out / "compare.md").exists() or (out / "runs").exists():
        if not (args.resume or args.overwrite):
            raise UsageError(
                f"--out {out} already holds a comparison; pass --resume to reuse its finished "
                "runs, --overwrite to replace it, or choose another --out"
            )
        if args.overwrite:
            shutil.rmtree(out / "runs", ignore_errors=True)
            for f in ("compare.md", "compare.png", "compare.json"):
                (out / f).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = run_comparison(cfg, specs, out, resume=args.resume, progress=not args.no_progress)
    command = "galorax " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:]))
    report = format_report(results, base, command, time.perf_counter() - t0)
    # Atomic: an interrupted write never leaves a half report over a finished one.
    atomic_write_text(out / "compare.md", report)
    atomic_write_text(
        out / "compare.json",
        json.dumps([{k: v for k, v in r.items() if k != "metrics"} for r in results], indent=2),
    )
    plot_comparison(results, out / "compare.png", f"galorax compare: {base.preset}")
    print(report)
    print(f"wrote {out}/compare.md, compare.png")
    return 0
