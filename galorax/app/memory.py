"""``galorax memory``: bytes of weights, gradients and optimizer state; which ranks fit.

Prints :func:`galorax.app.planner.format_table` (sizes in GB) for the presets or a model of
your own, the planner's assumptions, with ``--max-memory 24GB`` which ranks and options
fit, and with ``--xla`` XLA's memory analysis of the compiled train step. Also
``python -m galorax.app.memory``.

Example:
    >>> p = argparse.ArgumentParser()
    >>> add_memory_arguments(p)
    >>> args = p.parse_args(["--preset", "60m", "--dtype", "bf16", "--optimizer", "optax-galore"])
    >>> args.dtype, args.optimizer, args.side
    ('bfloat16', ['optax-galore'], 'auto')
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from galorax.app import model as model_lib
from galorax.app.config import DTYPES, PLANNED_OPTIMIZERS, PROJECTOR_DTYPES, UsageError
from galorax.app.flags import add_option, dtype_name, positive_int
from galorax.app.planner import (
    ASSUMPTIONS,
    MemoryEstimate,
    compiled_step_memory,
    divergence_note,
    format_table,
    gb,
    parse_bytes,
    plan_memory,
    rank_of,
    takes_rank,
)
from galorax.app.targets import INSTALL, TARGETS, target_device


def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``galorax memory`` flags to ``parser``."""
    add_option(parser, "--preset", nargs="+", shown="60m 130m 350m 1b 7b; none with --config")
    parser.add_argument(
        "--config",
        help="a model of your own: JSON object or key=value list of galorax.app.model.ModelConfig "
        "fields, e.g. 'd_model=2560,n_layers=32,n_heads=32,d_ff=6912' (default: none)",
    )
    parser.add_argument(
        "--vocab-size", type=positive_int, default=32000, help="vocabulary (default: %(default)s)"
    )
    optimizers = list(PLANNED_OPTIMIZERS)
    add_option(parser, "--optimizer", nargs="+", default=optimizers, shown=" ".join(optimizers))
    add_option(parser, "--rank", nargs="+", shown="the paper's for the preset, else d_model/4")
    add_option(parser, "--dtype", default="bfloat16")
    add_option(parser, "--side", default="auto")
    parser.add_argument(
        "--projector-dtype",
        default="float32",
        type=dtype_name,
        choices=PROJECTOR_DTYPES,
        help="GaLore projector storage dtype (default: %(default)s)",
    )
    add_option(parser, "--projector-bits", shown="off: float32 projectors")
    parser.add_argument(
        "--per-layer-updates",
        action="store_true",
        help="update each layer as its gradient is ready (one layer's gradient alive at a "
        "time; --grad-clip then clips by the previous step's norm)",
    )
    parser.add_argument(
        "--max-memory",
        help="a budget such as 24GB: sweep ranks and options and say which totals fit "
        "(default: no budget)",
    )
    g = parser.add_argument_group("XLA step memory", "the train step as compiled, with --xla")
    g.add_argument(
        "--xla",
        action="store_true",
        help="also compile the train step and print XLA's memory analysis",
    )
    g.add_argument(
        "--xla-max-params",
        type=float,
        default=1.5e8,
        help="compile only models with at most this many parameters (default: %(default)g)",
    )
    g.add_argument(
        "--target",
        metavar="GPU",
        help=f"compile for this GPU ({', '.join(TARGETS)}, or a GpuTargetConfigProto text "
        f"file) instead of this machine: no GPU needed, only JAX's CUDA plugin ({INSTALL}); "
        "implies --xla (default: this machine)",
    )
    add_option(g, "--batch-size", default=4)
    add_option(g, "--seq-len", default=256)
    g.add_argument("--remat", action="store_true", help="recompute activations")
    parser.add_argument("--json", action="store_true", help="one JSON object per row")


def _parse_config(text: str, vocab_size: int) -> model_lib.ModelConfig:
    try:
        return model_lib.parse_model_config(text, vocab_size)
    except ValueError as e:
        raise UsageError(
            f"--config {text.strip()!r}: {e} (e.g. 'd_model=2560,n_layers=32,n_heads=32,d_ff=6912')"
        ) from None


def _models(args: argparse.Namespace) -> list[tuple[str, model_lib.ModelConfig]]:
    models: list[tuple[str, model_lib.ModelConfig]] = []
    if args.config:
        models.append(("custom", _parse_config(args.config, args.vocab_size)))
    presets = args.preset or ([] if args.config else ["60m", "130m", "350m", "1b", "7b"])
    for p in presets:
        if p not in model_lib.PRESETS:
            raise UsageError(
                f"--preset {p!r} is unknown; choose from {', '.join(model_lib.PRESETS)}"
            )
        models.append((p, model_lib.get_preset(p, vocab_size=args.vocab_size)))
    return models


def _default_rank(name: str, cfg: model_lib.ModelConfig) -> int:
    return model_lib.PAPER_RANKS.get(name, max(cfg.d_model // 4, 1))


def _plan_rows(
    args: argparse.Namespace, models: list[tuple[str, model_lib.ModelConfig]], sweep: bool
) -> list[tuple[str, MemoryEstimate]]:
    """One estimate per model, option and rank (``sweep``: every sensible rank)."""
    kw: dict[str, Any] = dict(
        dtype=DTYPES[args.dtype],
        side=args.side,
        projector_dtype=DTYPES[args.projector_dtype],
        per_layer_updates=args.per_layer_updates,
    )
    rows: list[tuple[str, MemoryEstimate]] = []
    for name, cfg in models:
        default_rank = _default_rank(name, cfg)
        ranks = args.rank or [default_rank]
        if sweep and not args.rank:  # smallest to largest sensible rank
            ranks = sorted({r for r in (64, 128, 256, 512, 1024, default_rank) if r <= cfg.d_model})
        for option in args.optimizer:
            for rank in ranks if takes_rank(option) else [rank_of(option, 0)]:
                rows.append((name, plan_memory(cfg, option, rank or default_rank, **kw)))
                if option.startswith("galore") and args.projector_bits:
                    bits = args.projector_bits
                    rows.append((name, plan_memory(cfg, option, rank, projector_bits=bits, **kw)))
    return rows


def _print_fits(
    rows: list[tuple[str, MemoryEstimate]], names: list[str], budget: int, text: str
) -> None:
    print(f"Fits in {text} (weights + gradients + optimizer state; activations")
    print("not counted: add them from --xla or your own batch):")
    for name in names:
        fit = [e for n, e in rows if n == name and e.total <= budget]
        if not fit:
            print(f"  {name}: nothing fits")
            continue
        listed = ", ".join(f"{e.option}" + (f" r{e.rank}" if e.rank else "") for e in fit)
        print(f"  {name}: {listed}")
        for family in ("GaLore", "APOLLO"):  # optax-galore is a GaLore
            ranked = [e for e in fit if family.lower() in e.option and takes_rank(e.option)]
            if ranked:
                best = max(ranked, key=lambda e: (e.rank, -e.total))
                print(f"    -> largest {family} rank that fits: {best.rank} ({best.option})")


def _xla_peak(
    args: argparse.Namespace, cfg: model_lib.ModelConfig, e: MemoryEstimate, device: Any
) -> int:
    """The compiled step's peak for one row: ``galorax train``'s step with these flags,
    compiled for ``device`` (None: this machine's)."""
    option, _, bits = e.option.partition("+int")
    m = compiled_step_memory(
        cfg,
        option,
        e.rank or 128,
        dtype=DTYPES[args.dtype],
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        remat=args.remat,
        per_layer_updates=args.per_layer_updates,
        projector_bits=int(bits.rstrip("P")) if bits else None,
        side=args.side,
        device=device,
    )
    return m["peak"]


def _compiles(args: argparse.Namespace, cfg: model_lib.ModelConfig) -> bool:
    return model_lib.count_params(model_lib.abstract_params(cfg)) <= args.xla_max_params


def _print_xla(
    args: argparse.Namespace, rows: list[tuple[str, MemoryEstimate]], cfgs: dict, device: Any
) -> None:
    where = f", compiled for {device.device_kind} (compile only)" if device else ""
    onoff = lambda flag: "on" if flag else "off"  # noqa: E731
    print(f"XLA memory analysis of the train step galorax train compiles with these flags{where}")
    print(
        f"({args.dtype} params, donated state, batch {args.batch_size} x seq {args.seq_len}, "
        f"remat {onoff(args.remat)}, per-layer updates {onoff(args.per_layer_updates)}), GB:"
    )
    for name, e in rows:
        if not _compiles(args, cfgs[name]):
            print(f"  {name:<8} {e.option:<18} not compiled (over --xla-max-params)")
            continue
        peak = _xla_peak(args, cfgs[name], e, device)
        note = divergence_note(e, peak)
        print(f"  {name:<8} {e.option:<18} peak {gb(peak)}  planner {gb(e.total)}  {note}")


def _print_json(
    args: argparse.Namespace, rows: list[tuple[str, MemoryEstimate]], cfgs: dict, device: Any
) -> None:
    """One JSON object per row (with ``--xla``, the compiled step's peak too)."""
    for name, e in rows:
        option, _, bits = e.option.partition("+int")
        row: dict[str, Any] = {
            "model": name,
            "optimizer": option,
            "rank": e.rank,
            "projector_bits": int(bits.rstrip("P")) if bits else None,
            "per_layer_updates": args.per_layer_updates,
            "weights_bytes": e.weights,
            "grads_bytes": e.grads,
            "state_bytes": e.state,
            "total_bytes": e.total,
        }
        if args.xla and _compiles(args, cfgs[name]):
            row["step_peak_bytes"] = peak = _xla_peak(args, cfgs[name], e, device)
            if device is not None:
                row["target"] = device.device_kind
            row["note"] = divergence_note(e, peak)
        print(json.dumps(row), flush=True)


def run_memory(args: argparse.Namespace) -> int:
    """Runs ``galorax memory``: prints the table (and fits / XLA figures); returns 0."""
    models = _models(args)
    try:
        budget = parse_bytes(args.max_memory) if args.max_memory else None
    except ValueError as e:
        raise UsageError(f"--max-memory: {e}") from None
    rows = _plan_rows(args, models, sweep=budget is not None)
    cfgs = dict(models)
    device = target_device(args.target) if args.target else None
    args.xla = args.xla or device is not None
    if args.json:
        _print_json(args, rows, cfgs, device)
        return 0
    print(format_table(rows, budget))
    print()
    print(ASSUMPTIONS)
    if budget is not None:
        _print_fits(rows, [name for name, _ in models], budget, args.max_memory)
    if args.xla:
        _print_xla(args, rows, cfgs, device)
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m galorax.app.memory")
    add_memory_arguments(_parser)
    sys.exit(run_memory(_parser.parse_args()))
