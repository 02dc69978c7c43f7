"""The ``galorax`` command line.

Subcommands live in :data:`SUBCOMMANDS`, a list of :class:`Subcommand` entries
``(name, help, add_arguments, run)``; another module adds its own with :func:`register`::

    from galorax.app import cli
    cli.register(cli.Subcommand("memory", "estimate memory", add_arguments, run))

``run(args)`` returns the exit status. Errors that are the user's to fix (``UsageError``,
``DataError``, ``FileNotFoundError``, a diverged loss) print one line naming the flag and the
fix, and exit with status 2 (1 for a diverged run); nothing existing is modified.

Example:
    >>> parser = build_parser()
    >>> args = parser.parse_args(["train", "--steps", "5", "--optimizer", "adamw"])
    >>> args.steps, args.optimizer, args.preset
    (5, 'adamw', None)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple


class Subcommand(NamedTuple):
    """A ``galorax`` subcommand: its name, one-line help, argument adder and runner."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: list[Subcommand] = []

#: Modules imported before parsing so that they can :func:`register` their subcommands.
PLUGIN_MODULES = ("galorax.app.planner",)


def register(cmd: Subcommand) -> None:
    """Adds (or replaces, by name) a subcommand."""
    SUBCOMMANDS[:] = [c for c in SUBCOMMANDS if c.name != cmd.name] + [cmd]


def _positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def _nonneg_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


class _BadBool(argparse.ArgumentTypeError, ValueError):
    """argparse shows its message; run-spec parsing catches it as a ValueError."""


def parse_bool(s: str) -> bool:
    """``true/false`` (also ``1/0``, ``yes/no``, ``on/off``) of a flag or a run-spec key.

    Raises:
        ValueError: anything else (argparse reports it as an invalid value).
    """
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise _BadBool(f"expected true or false, got {s!r}")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``train`` and ``compare`` (defaults: see ``TrainConfig``)."""
    from galorax.app.model import PRESETS
    from galorax.app.train import DTYPES

    g = p.add_argument_group("model and data")
    g.add_argument("--preset", help=f"model size: {', '.join(PRESETS)} (default tiny)")
    g.add_argument("--dtype", choices=list(DTYPES), help="parameter dtype (default float32)")
    g.add_argument(
        "--data",
        metavar="PATH",
        help="text file or directory of text files (default: the embedded Python stdlib "
        "corpus); 'c4' or hf:NAME[:CONFIG] need `pip install datasets`",
    )
    g.add_argument("--seed", type=int, help="seed of the init and data order (default 0)")
    g = p.add_argument_group("schedule")
    g.add_argument("--steps", type=_positive_int, help="optimizer steps (tiny: 300)")
    g.add_argument("--batch-size", type=_positive_int, help="sequences per step (default 16)")
    g.add_argument("--seq-len", type=_positive_int, help="tokens per sequence (tiny: 128)")
    g.add_argument("--warmup", type=_nonneg_int, help="linear warmup steps (default 10%%)")
    g.add_argument("--weight-decay", type=float, help="decoupled weight decay (default 0)")
    g.add_argument("--grad-clip", type=float, help="global-norm clip, 0 = off (default 1)")
    g.add_argument("--eval-every", type=_positive_int, help="validate every N steps")
    g.add_argument("--eval-batches", type=_positive_int, help="validation batches (default 8)")
    g.add_argument("--remat", action="store_true", default=None, help="recompute activations")
    g = p.add_argument_group("GaLore")
    g.add_argument("--rank", type=_positive_int, help="projection rank (tiny: 64 = d_model/4)")
    g.add_argument("--update-proj-gap", type=_positive_int, help="steps between refreshes (200)")
    g.add_argument("--scale", type=float, help="GaLore update scale (default 0.25)")
    g.add_argument("--subspace", choices=["randomized", "svd"], help="refresh method")
    g.add_argument("--moments", choices=["keep", "align", "rotate"], help="moments at a refresh")
    g.add_argument("--stagger", type=parse_bool, metavar="{true,false}", help="spread refreshes")
    g.add_argument(
        "--side", choices=["auto", "std", "reverse_std", "left", "right"], help="projected side"
    )
    g.add_argument(
        "--residual",
        choices=["channel", "matrix"],
        help="add back the gradient outside the subspace, Fira-scaled (default off)",
    )
    g.add_argument(
        "--adaptive", type=parse_bool, metavar="{true,false}", help="lengthen stable layers' gaps"
    )
    g.add_argument("--projector-bits", type=int, choices=[8, 4], help="quantized projectors")
    g = p.add_argument_group("memory")
    g.add_argument(
        "--state-bits", type=int, choices=[32, 8], help="8: 8-bit Adam moments (default 32)"
    )


def given_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The ``TrainConfig`` fields the user set on the command line."""
    from galorax.app.train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in fields and v is not None}


def config_from_args(args: argparse.Namespace, **overrides: Any) -> Any:
    """A ``TrainConfig`` from the parsed flags (unset flags keep the config's defaults)."""
    from galorax.app.train import TrainConfig

    return TrainConfig(**{**given_flags(args), **overrides})


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    from galorax.app.train import OPTIMIZERS

    p.add_argument("--optimizer", choices=OPTIMIZERS, help="default galore")
    p.add_argument("--lr", type=float, help="peak learning rate (adamw 1e-3, galore 1e-2)")
    add_model_arguments(p)
    g = p.add_argument_group("output and checkpoints")
    g.add_argument("--out", metavar="DIR", help="output directory (default runs/<name>-<time>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out")
    g.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    g.add_argument("--init-from", metavar="DIR", help="start from a run's weights (fine-tune)")
    g.add_argument(
        "--checkpoint-every", type=_nonneg_int, help="save every N steps (default 100; 0 = end)"
    )
    g.add_argument("--stop-after", type=_positive_int, help="stop after N steps (then --resume)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group(
        "sharding",
        "several devices or processes (jax.distributed; the JAX_COORDINATOR_ADDRESS, "
        "JAX_NUM_PROCESSES and JAX_PROCESS_ID variables work too). On CPU, simulate devices "
        "with XLA_FLAGS=--xla_force_host_platform_device_count=N.",
    )
    g.add_argument(
        "--mesh",
        metavar="AXES",
        help="shard over a device mesh, e.g. data=2,fsdp=4 (params and state FSDP over "
        "fsdp, batch rows over both; one size may be -1); default: one device",
    )
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    g.add_argument("--num-processes", type=_positive_int, help="processes in the run")
    g.add_argument("--process-id", type=_nonneg_int, help="this process's index")


def _default_out(prefix: str) -> str:
    import time

    return f"runs/{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def _run_train(args: argparse.Namespace) -> int:
    from galorax.app import distributed
    from galorax.app.train import format_summary, train

    # Before anything else touches a device: joins the other processes, if any.
    distributed.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    cfg = config_from_args(args)
    if args.out is None and args.resume:
        raise _usage("--resume needs --out DIR: the run to continue")
    out = args.out or _default_out(f"{cfg.preset}-{cfg.optimizer}")
    summary = train(
        cfg,
        out,
        resume=args.resume,
        overwrite=args.overwrite,
        init_from=args.init_from,
        stop_after=args.stop_after,
        progress=not args.no_progress,
        flags=given_flags(args),
    )
    if not distributed.is_primary():
        return 0
    print()
    print(format_summary(summary))
    print(f"\nwrote {out}/: metrics.jsonl, loss_curve.png, config.json, summary.json, checkpoints/")
    return 0


def _usage(msg: str) -> Exception:
    from galorax.app.train import UsageError

    return UsageError(msg)


def _add_compare_arguments(p: argparse.ArgumentParser) -> None:
    from galorax.app.compare import add_arguments

    add_arguments(p)


def _run_compare(args: argparse.Namespace) -> int:
    from galorax.app.compare import run

    return run(args)


register(
    Subcommand(
        "train", "train a LLaMA-style model (GaLore by default)", _add_train_arguments, _run_train
    )
)
register(
    Subcommand(
        "compare",
        "compare optimizers on the same model and data",
        _add_compare_arguments,
        _run_compare,
    )
)


def build_parser() -> argparse.ArgumentParser:
    """The ``galorax`` parser with every registered subcommand."""
    for mod in PLUGIN_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError:
            pass
    parser = argparse.ArgumentParser(
        prog="galorax", description="GaLore (Gradient Low-Rank Projection) for JAX/optax."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in SUBCOMMANDS:
        sp = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(sp)
        sp.set_defaults(_run=cmd.run)
    return parser


def enable_compilation_cache() -> None:
    """Persists compiled XLA programs under the galorax cache: a rerun skips compiling."""
    import jax

    from galorax.app.data import cache_dir

    if not getattr(jax.config, "jax_compilation_cache_dir", None):
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``galorax``; returns the exit status."""
    from galorax.app.data import DataError
    from galorax.app.train import UsageError

    # jaxlib's CPU QR/eigh/SVD run on scipy's OpenBLAS, whose threads ignore XLA's flags;
    # on small refresh matrices they only contend (measured: 10-100x slower refreshes on
    # a busy 2-core machine). Takes effect because scipy loads at the first linalg call.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    enable_compilation_cache()
    warnings.simplefilter("default", UserWarning)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"galorax: warning: {msg}\n"  # type: ignore[assignment]
    try:
        return int(args._run(args))
    except (UsageError, DataError, FileNotFoundError) as e:
        print(f"galorax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"galorax {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
