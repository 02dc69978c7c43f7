"""The ``galorax`` command line: ``train``, ``compare`` and ``memory``.

The subcommands are listed here (:data:`SUBCOMMANDS`, each a :class:`Subcommand`
``(name, help, add_arguments, run)``); ``run(args)`` returns the exit status. Errors that are
the user's to fix (``UsageError``, ``DataError``, ``FileNotFoundError``) print one line
naming the flag and the fix and exit with status 2, as argparse's do; runtime failures (a
diverged loss, a full disk, a read-only ``--out``, anything unexpected) one line and status 1
(``--debug`` adds the traceback); a Ctrl-C 130. Nothing existing is modified.
``galorax --version`` prints the package's version. The flags several subcommands take are
spelled once (:data:`galorax.app.flags.SHARED_OPTIONS`); every help says its default.

Example:
    >>> parser = build_parser()
    >>> args = parser.parse_args(["train", "--steps", "5", "--optimizer", "adamw"])
    >>> args.steps, args.optimizer, args.preset
    (5, 'adamw', None)
    >>> [c.name for c in SUBCOMMANDS]
    ['train', 'compare', 'memory']
"""

from __future__ import annotations

import argparse
import errno
import os
import pathlib
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple, NoReturn

import jax

import galorax
from galorax.app import compare, distributed, memory
from galorax.app.checkpoint import CheckpointError
from galorax.app.config import (
    DEFAULT_LR,
    EIGHT_BIT,
    GALORE_DEFAULTS,
    LOW_RANK_SETTINGS,
    UsageError,
)
from galorax.app.data import DataError, cache_dir
from galorax.app.flags import (
    add_model_arguments,
    add_option,
    config_from_args,
    given_flags,
    nonneg_int,
    positive_int,
)
from galorax.app.interrupt import Interrupted
from galorax.app.loop import OnPoint
from galorax.app.report import format_summary
from galorax.app.train import train


class Subcommand(NamedTuple):
    """A ``galorax`` subcommand: its name, one-line help, argument adder and runner."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    add_option(p, "--optimizer", shown="galore")
    lrs = ", ".join(f"{name} {lr:g}" for name, lr in DEFAULT_LR.items())
    p.add_argument("--lr", type=float, help=f"peak learning rate (default: {lrs})")
    add_model_arguments(p)
    g = p.add_argument_group("output and checkpoints")
    add_option(g, "--out", shown="runs/<preset>-<optimizer>-<time>")
    add_option(g, "--resume")
    add_option(g, "--overwrite")
    g.add_argument(
        "--init-from",
        metavar="DIR",
        help="start from a run's weights, to fine-tune (default: a fresh init)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=nonneg_int,
        help="save every N steps, 0 = only at the end (default: 100)",
    )
    g.add_argument(
        "--stop-after", type=positive_int, help="stop after N steps, then --resume (default: off)"
    )
    add_option(g, "--no-progress")
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
        "fsdp, batch rows over both; one size may be -1) (default: one device)",
    )
    g.add_argument(
        "--coordinator", metavar="HOST:PORT", help="process 0's address (default: one process)"
    )
    g.add_argument("--num-processes", type=positive_int, help="processes in the run (default: one)")
    g.add_argument("--process-id", type=nonneg_int, help="this process's index (default: 0)")


def _mtime(path: pathlib.Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _default_out(prefix: str) -> str:
    return f"runs/{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


#: The ``TrainConfig`` fields only the low-rank optimizers use (``--rank`` ... ``--adaptive``):
#: GaLore's, APOLLO's (``rank``, ``update_proj_gap``, ``scale``: :data:`LOW_RANK_SETTINGS`).
GALORE_ONLY = ("rank", "update_proj_gap", "scale", *GALORE_DEFAULTS)


def check_galore_only(flags: dict[str, object]) -> None:
    """Rejects GaLore-only flags the user set for an AdamW run (they would be ignored); those
    an APOLLO run does not take are :func:`~galorax.app.config.resolve_config`'s to refuse.

    Args:
        flags: The fields set on the command line (:func:`~galorax.app.flags.given_flags`).

    Raises:
        UsageError: naming the flags and the fix.

    Example:
        >>> check_galore_only({"optimizer": "galore", "rank": 4})  # GaLore takes it
        >>> check_galore_only({"optimizer": "adamw", "rank": 4})
        Traceback (most recent call last):
        ...
        galorax.app.config.UsageError: --rank applies to GaLore and APOLLO optimizers; drop ...
    """
    optimizer = str(flags.get("optimizer", ""))
    if EIGHT_BIT.get(optimizer, optimizer) != "adamw":
        return
    given = [k for k in GALORE_ONLY if k in flags]
    if given:
        them = ("it", "applies") if len(given) == 1 else ("them", "apply")
        galore = "galore8bit" if optimizer in EIGHT_BIT else "galore"
        apollo = set(given) <= set(LOW_RANK_SETTINGS["apollo"])  # APOLLO takes them too
        which = "GaLore and APOLLO" if apollo else "GaLore"
        flags_text = ", ".join("--" + k.replace("_", "-") for k in given)
        raise UsageError(
            f"{flags_text} {them[1]} to {which} optimizers; drop {them[0]} or use "
            f"--optimizer {galore}"
        )


def _run_train(args: argparse.Namespace) -> int:
    # Before anything else touches a device: joins the other processes, if any.
    distributed.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    check_galore_only(given_flags(args))
    cfg = config_from_args(args)
    if args.out is None and args.resume:
        raise UsageError("--resume needs --out DIR: the run to continue")
    out = args.out or _default_out(f"{cfg.preset}-{cfg.optimizer}")
    before = _mtime(pathlib.Path(out) / "summary.json")
    summary = train(
        cfg,
        out,
        resume=args.resume,
        overwrite=args.overwrite,
        init_from=args.init_from,
        stop_after=args.stop_after,
        progress=not args.no_progress,
        flags=given_flags(args),
        on_point=getattr(args, "on_point", None),
    )
    if not distributed.is_primary():
        return 0
    print()
    print(format_summary(summary))
    if _mtime(pathlib.Path(out) / "summary.json") != before:  # not a finished run's again
        print(
            f"\nwrote {out}/: metrics.jsonl, loss_curve.png, config.json, summary.json, "
            "checkpoints/"
        )
    return 0


#: The subcommands, in the order ``galorax --help`` lists them.
SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand(
        "train",
        "train a LLaMA-style model (GaLore by default; AdamW, APOLLO...)",
        _add_train_arguments,
        _run_train,
    ),
    Subcommand(
        "compare",
        "compare optimizers on the same model and data",
        compare.add_arguments,
        compare.run,
    ),
    Subcommand(
        "memory",
        "bytes of weights, gradients and optimizer state; which ranks fit a budget",
        memory.add_memory_arguments,
        memory.run_memory,
    ),
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(subcommands: Sequence[Subcommand] = SUBCOMMANDS) -> argparse.ArgumentParser:
    """The ``galorax`` parser with ``subcommands`` (default: :data:`SUBCOMMANDS`)."""
    parser = _Parser(
        prog="galorax",
        description="GaLore (Gradient Low-Rank Projection) and APOLLO for JAX/optax.",
    )
    parser.add_argument("--version", action="version", version=f"galorax {galorax.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in subcommands:
        sp = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(sp)
        sp.add_argument("--debug", action="store_true", help="show tracebacks of errors")
        sp.set_defaults(_run=cmd.run)
    return parser


def _os_error(e: OSError) -> str:
    where = f" {e.filename}" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"no space left on the device of{where}; free some space or choose another --out"
    if isinstance(e, PermissionError) or e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write{where}: {e.strerror}; choose a writable --out"
    return f"{e.strerror or e}{':' + where if where else ''}; check the path and free space"


def _error_line(e: BaseException) -> tuple[str, int]:
    """The one-line message of an error and the exit status (2: usage, 1: runtime)."""
    if isinstance(e, UsageError | DataError | FileNotFoundError):
        return str(e), 2
    if isinstance(e, FloatingPointError | CheckpointError):
        return str(e), 1
    if isinstance(e, OSError):
        return _os_error(e), 1
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{text} ({type(e).__name__}; rerun with --debug for the traceback)", 1


def enable_compilation_cache() -> None:
    """Persists compiled XLA programs under the galorax cache: a rerun skips compiling."""
    if not getattr(jax.config, "jax_compilation_cache_dir", None):
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))


def main(
    argv: Sequence[str] | None = None,
    subcommands: Sequence[Subcommand] = SUBCOMMANDS,
    *,
    on_point: OnPoint | None = None,
) -> int:
    """Entry point of ``galorax``; returns the exit status.

    ``on_point``: called as ``on_point(point, step)`` at each point of the training loops
    that ``train`` and ``compare`` run (:func:`galorax.app.train.train`); the tests deliver
    their Ctrl-C through it.
    """
    # jaxlib's CPU QR/eigh/SVD run on scipy's OpenBLAS, whose threads ignore XLA's flags;
    # on small refresh matrices they only contend (measured: 10-100x slower refreshes on
    # a busy 2-core machine). Takes effect because scipy loads at the first linalg call.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(subcommands).parse_args(argv)
    args.argv = argv
    args.on_point = on_point
    enable_compilation_cache()
    warnings.simplefilter("default", UserWarning)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"galorax: warning: {msg}\n"  # type: ignore[assignment]
    try:
        return int(args._run(args))
    except Interrupted as e:
        print(f"galorax {args.command}: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"galorax {args.command}: aborted; nothing more written", file=sys.stderr)
        return 130
    except Exception as e:
        if getattr(args, "debug", False):
            traceback.print_exc()
        text, status = _error_line(e)
        print(f"galorax {args.command}: error: {text}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
