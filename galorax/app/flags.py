"""Command-line flags: the ones several subcommands take, spelled once
(:data:`SHARED_OPTIONS`, added with :func:`add_option`), those ``galorax train`` and
``galorax compare`` share (model, data, schedule, GaLore, memory), their value parsers, and
the :class:`TrainConfig` they fill. Every help says its default.

Example:
    >>> p = argparse.ArgumentParser()
    >>> add_model_arguments(p)
    >>> config_from_args(p.parse_args(["--steps", "5", "--stagger", "off"])).stagger
    False
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from galorax.app.config import (
    DEFAULT_SCALE,
    DTYPE_ALIASES,
    GALORE_CHOICES,
    GALORE_DEFAULTS,
    OPTIMIZERS,
    TRAIN_DTYPES,
    TrainConfig,
)
from galorax.app.model import PRESETS
from galorax.options import OPTION


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


@dataclasses.dataclass(frozen=True)
class Option:
    """One flag as every subcommand that takes it spells it (name, choices, help).

    Attributes:
        help: What the flag does, without its default (:func:`add_option` adds that: the
            default differs between subcommands, the meaning does not).
        choices: The accepted values, if a fixed set.
        type: The argparse value parser.
        metavar: The value's placeholder in the usage.
        action: An argparse action (``store_true`` for a switch: off by default).
    """

    help: str
    choices: tuple[Any, ...] | None = None
    type: Callable[[str], Any] | None = None
    metavar: str | None = None
    action: str | None = None


def dtype_name(s: str) -> str:
    """An argparse type: a dtype name, its short spelling accepted (``bf16``, ``f32``)."""
    return DTYPE_ALIASES.get(s, s)


_BOOL = "{true,false}"

#: Every flag two or more subcommands take, spelled once: ``galorax train``, ``compare``
#: and ``memory`` add them with :func:`add_option`.
SHARED_OPTIONS: dict[str, Option] = {
    "--optimizer": Option(
        "optimizer(s); the 8bit names keep 8-bit Adam moments", choices=OPTIMIZERS
    ),
    "--preset": Option(f"model size: {', '.join(PRESETS)}"),
    "--dtype": Option(
        "parameter (and gradient) dtype; bf16 and f32 are accepted too",
        choices=TRAIN_DTYPES,
        type=dtype_name,
    ),
    "--batch-size": Option("sequences per step", type=positive_int),
    "--seq-len": Option("tokens per sequence", type=positive_int),
    "--rank": Option("GaLore or APOLLO projection rank(s)", type=positive_int),
    "--side": Option("the side of each matrix GaLore projects", choices=GALORE_CHOICES["side"]),
    "--projector-bits": Option(
        "store GaLore's projectors in 8 or 4 bits (galorax.quantization); memory sizes "
        "them beside the float ones",
        choices=OPTION["projector_bits"].choices,
        type=int,
    ),
    "--out": Option("output directory", metavar="DIR"),
    "--resume": Option(
        "continue what --out holds: reuse finished runs, continue stopped ones from their "
        "last checkpoint",
        action="store_true",
    ),
    "--overwrite": Option("replace what --out holds", action="store_true"),
    "--no-progress": Option("no progress bars", action="store_true"),
}


#: The help of each GaLore flag that only ``train`` and ``compare`` take, by option name
#: (:data:`~galorax.app.config.GALORE_FLAGS`); the flag's choices (or ``true``/``false``) and
#: default are the library's declarations', through :data:`GALORE_CHOICES` and
#: :data:`GALORE_DEFAULTS`. ``--side`` and ``--projector-bits`` are :data:`SHARED_OPTIONS`.
GALORE_HELP = {
    "subspace": "how a refresh finds the subspace",
    "moments": "Adam's moments at a refresh",
    "stagger": "spread the layers' refreshes over the gap",
    "residual": "add back the gradient outside the subspace, Fira-scaled",
    "adaptive": "lengthen stable layers' refresh gaps",
}
#: The default as a GaLore flag's help says it, where not the value in lower case.
_GALORE_SHOWN = {"projector_bits": "off: float32 projectors"}


def galore_flag(name: str) -> tuple[str, Option]:
    """The flag of GaLore option ``name`` (a key of :data:`GALORE_DEFAULTS`) and its
    spelling: a shared option's, or its help with the choices or ``true``/``false``.

    Example:
        >>> flag, opt = galore_flag("stagger")
        >>> flag, opt.metavar
        ('--stagger', '{true,false}')
    """
    flag = "--" + name.replace("_", "-")
    if flag in SHARED_OPTIONS:
        return flag, SHARED_OPTIONS[flag]
    if isinstance(GALORE_DEFAULTS[name], bool):
        return flag, Option(GALORE_HELP[name], type=parse_bool, metavar=_BOOL)
    return flag, Option(GALORE_HELP[name], choices=GALORE_CHOICES[name])


def add_option(
    group: Any, flag: str, *, default: Any = None, shown: str | None = None, **kw: Any
) -> argparse.Action:
    """Adds :data:`SHARED_OPTIONS`' ``flag`` to ``group`` (a parser or argument group).

    Args:
        group: Where the flag goes.
        flag: A key of :data:`SHARED_OPTIONS`.
        default: The parsed default (None: the flag was not given; the run's config
            resolves it).
        shown: The default as the help says it, where ``default`` is None.
        **kw: More ``add_argument`` keywords (``nargs``...).
    """
    opt = SHARED_OPTIONS[flag]
    return group.add_argument(flag, **_keywords(opt, default, shown), **kw)


def _keywords(opt: Option, default: Any, shown: str | None) -> dict[str, Any]:
    """``add_argument``'s keywords of ``opt``, the default shown in its help."""
    help_text = opt.help
    if shown is not None:
        help_text += f" (default: {shown})"
    elif default is not None and opt.action is None:
        help_text += " (default: %(default)s)"
    kw: dict[str, Any] = {"help": help_text, "default": default}
    if opt.action is not None:
        kw["action"] = opt.action
    fields = {"choices": opt.choices, "type": opt.type, "metavar": opt.metavar}
    kw |= {k: v for k, v in fields.items() if v is not None}
    return kw


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``train`` and ``compare`` (defaults: see ``TrainConfig``)."""
    g = p.add_argument_group("model and data")
    add_option(g, "--preset", shown="tiny")
    add_option(g, "--dtype", shown="float32")
    g.add_argument(
        "--data",
        metavar="PATH",
        help="text file or directory of text files; 'c4' or hf:NAME[:CONFIG] need "
        '`pip install -e ".[c4]"` (default: the embedded Python stdlib corpus)',
    )
    g.add_argument("--seed", type=nonneg_int, help="seed of the init and data order (default: 0)")
    _add_schedule_arguments(p)
    _add_galore_arguments(p)
    g = p.add_argument_group("memory")
    g.add_argument(
        "--state-bits", type=int, choices=[32, 8], help="8: 8-bit Adam moments (default: 32)"
    )


def _add_schedule_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("schedule")
    g.add_argument(
        "--steps", type=positive_int, help="optimizer steps (default: 300 for tiny, else 1000)"
    )
    add_option(g, "--batch-size", shown="16")
    add_option(g, "--seq-len", shown="128 for tiny, else 256")
    g.add_argument(
        "--warmup", type=nonneg_int, help="linear warmup steps (default: 10%% of --steps)"
    )
    g.add_argument("--weight-decay", type=float, help="decoupled weight decay (default: 0)")
    g.add_argument("--grad-clip", type=float, help="global-norm clip, 0 = off (default: 1)")
    g.add_argument(
        "--eval-every", type=positive_int, help="validate every N steps (default: --steps / 10)"
    )
    g.add_argument("--eval-batches", type=positive_int, help="validation batches (default: 8)")
    g.add_argument("--remat", action="store_true", default=None, help="recompute activations")
    g.add_argument(
        "--per-layer-updates",
        action="store_true",
        default=None,
        help="update each layer as its gradient is ready (one layer's gradient alive at a "
        "time; --grad-clip then clips by the previous step's norm)",
    )


def _add_galore_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "GaLore and APOLLO",
        "settings of --optimizer galore (and galore8bit); --rank, --update-proj-gap and "
        "--scale also of optax-galore and apollo, the last two of apollo-mini (rank 1)",
    )
    add_option(g, "--rank", shown="GaLore's paper's for the preset; tiny: 64 = d_model/4")
    g.add_argument(
        "--update-proj-gap",
        type=positive_int,
        help="steps between refreshes (APOLLO: between random projections) (default: 200)",
    )
    scales = ", ".join(f"{k} {v:g}" for k, v in DEFAULT_SCALE.items() if k != "adamw")
    g.add_argument("--scale", type=float, help=f"update scale (default: {scales})")
    for name, default in GALORE_DEFAULTS.items():
        flag, opt = galore_flag(name)
        shown = _GALORE_SHOWN.get(name, str(default).lower())
        g.add_argument(flag, **_keywords(opt, None, shown))


def given_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The ``TrainConfig`` fields the user set on the command line."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in fields and v is not None}


def config_from_args(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    """A ``TrainConfig`` from the parsed flags (unset flags keep the config's defaults)."""
    return TrainConfig(**{**given_flags(args), **overrides})
