"""Command-line flags that ``galorax train`` and ``galorax compare`` share (model, data,
schedule, GaLore, memory), their value parsers, and the :class:`TrainConfig` they fill.

Example:
    >>> p = argparse.ArgumentParser()
    >>> add_model_arguments(p)
    >>> config_from_args(p.parse_args(["--steps", "5", "--stagger", "off"])).stagger
    False
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from galorax.app.config import TRAIN_DTYPES, TrainConfig
from galorax.app.model import PRESETS


def positive_int(s: str) -> int:
    """An argparse type: a positive integer."""
    v = _int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def nonneg_int(s: str) -> int:
    """An argparse type: an integer >= 0."""
    v = _int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def _int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None


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
    g = p.add_argument_group("model and data")
    g.add_argument("--preset", help=f"model size: {', '.join(PRESETS)} (default tiny)")
    g.add_argument("--dtype", choices=list(TRAIN_DTYPES), help="parameter dtype (default float32)")
    g.add_argument(
        "--data",
        metavar="PATH",
        help="text file or directory of text files (default: the embedded Python stdlib "
        "corpus); 'c4' or hf:NAME[:CONFIG] need `pip install datasets`",
    )
    g.add_argument("--seed", type=nonneg_int, help="seed of the init and data order (default 0)")
    g = p.add_argument_group("schedule")
    g.add_argument("--steps", type=positive_int, help="optimizer steps (tiny: 300)")
    g.add_argument("--batch-size", type=positive_int, help="sequences per step (default 16)")
    g.add_argument("--seq-len", type=positive_int, help="tokens per sequence (tiny: 128)")
    g.add_argument("--warmup", type=nonneg_int, help="linear warmup steps (default 10%%)")
    g.add_argument("--weight-decay", type=float, help="decoupled weight decay (default 0)")
    g.add_argument("--grad-clip", type=float, help="global-norm clip, 0 = off (default 1)")
    g.add_argument("--eval-every", type=positive_int, help="validate every N steps")
    g.add_argument("--eval-batches", type=positive_int, help="validation batches (default 8)")
    g.add_argument("--remat", action="store_true", default=None, help="recompute activations")
    g = p.add_argument_group("GaLore")
    g.add_argument("--rank", type=positive_int, help="projection rank (tiny: 64 = d_model/4)")
    g.add_argument("--update-proj-gap", type=positive_int, help="steps between refreshes (200)")
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
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in fields and v is not None}


def config_from_args(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    """A ``TrainConfig`` from the parsed flags (unset flags keep the config's defaults)."""
    return TrainConfig(**{**given_flags(args), **overrides})
