"""``galorax compare``: several optimizers on the same model, data and seed.

Each run spec is ``OPTIMIZER[:key=value]...``; ``lr`` may list several values (a sweep) and
the best final validation loss is kept. Keys: ``lr``, ``rank``, ``scale``, ``gap``
(``update_proj_gap``), ``subspace``, ``moments``, ``stagger``, ``side``, ``weight_decay``,
``residual``, ``adaptive``, ``state_bits``, ``projector_bits``, ``label``; ``rank``,
``scale`` and ``gap`` are galore's, optax-galore's and apollo's (apollo-mini's rank is 1:
only ``scale`` and ``gap``), GaLore's own keys galore's only. Writes
``compare.md`` (best run per spec, the whole sweep, the command) and ``compare.png`` (all
curves plus a memory/speed table) into ``--out``; each run's own files are under
``runs/<label>/lr-<lr>/`` (a label is a plain name, never a path); ``--resume`` reuses the
finished ones and continues interrupted ones from their last checkpoint. Every spec is
checked before ``--out`` is touched; ``--overwrite`` keeps the old comparison aside until
the first new run is under way.

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
import pathlib
import re
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

from galorax.app import data as data_lib
from galorax.app.compare_report import format_report, plot_comparison
from galorax.app.config import (
    EIGHT_BIT,
    FIXED_RANK,
    GALORE_DEFAULTS,
    LOW_RANK_SETTINGS,
    OPTIMIZERS,
    RunConfig,
    TrainConfig,
    UsageError,
    resolve_config,
)
from galorax.app.flags import (
    add_model_arguments,
    add_option,
    config_from_args,
    galore_flag,
    given_flags,
)
from galorax.app.interrupt import Interrupted
from galorax.app.loop import OnPoint
from galorax.app.rundir import Aside, MetricsLog, atomic_write_text, recover_asides
from galorax.app.train import train

#: What a comparison writes into ``--out`` (``--overwrite`` replaces these only).
COMPARE_FILES = ("runs", "compare.md", "compare.png", "compare.json")

#: The default sweep: each optimizer at a few peak learning rates around its known best.
DEFAULT_RUNS = (
    "adamw:lr=1e-3,2e-3",
    "optax-galore:lr=1e-2,2e-2",
    "galore:lr=1e-2,2e-2",
)

#: A run spec's keys and their value parsers; GaLore's own flags (:data:`GALORE_DEFAULTS`)
#: parse as on the command line (:func:`~galorax.app.flags.galore_flag`).
_KEYS: dict[str, Any] = {
    "rank": int,
    "scale": float,
    "gap": int,
    "update_proj_gap": int,
    "weight_decay": float,
    "state_bits": int,
    **{name: galore_flag(name)[1].type or str for name in GALORE_DEFAULTS},
}


#: Spec keys of the low-rank settings (:data:`~galorax.app.config.LOW_RANK_SETTINGS` says
#: which optimizer takes which; GaLore's own keys only galore).
_GALORE_KEYS = ("rank", "scale", "gap", "update_proj_gap")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclasses.dataclass
class RunSpec:
    """One compared configuration: an optimizer, its overrides and its lr sweep."""

    label: str
    optimizer: str
    lrs: list[float | None]
    overrides: dict[str, Any]
    text: str = ""


def _check_key(key: str, optimizer: str) -> None:
    if key not in _KEYS:
        raise ValueError(f"unknown key {key!r}; keys: lr, label, {', '.join(_KEYS)}")
    base = EIGHT_BIT.get(optimizer, optimizer)
    if base == "adamw" and (key in _GALORE_KEYS or key in GALORE_DEFAULTS):
        raise ValueError(f"{optimizer} takes no {key}; only galore (and optax-galore) do")
    if base in FIXED_RANK and key == "rank":
        raise ValueError(f"{optimizer} has rank {FIXED_RANK[base]}; use apollo:rank=...")
    if base != "galore" and key in GALORE_DEFAULTS:
        raise ValueError(f"{optimizer} takes no {key}; use galore:{key}=...")


def _check_label(label: str) -> str:
    if not _LABEL.fullmatch(label) or label in (".", ".."):
        raise ValueError(
            f"label {label!r} must be a name (letters, digits, '.', '_', '-'), not a path"
        )
    return label


def parse_spec(text: str) -> RunSpec:
    """Parses ``OPTIMIZER[:key=value]...`` (see the module docstring).

    Raises:
        UsageError: unknown optimizer or key, a key the optimizer does not take, a bad
            value, or a label that is not a plain name.
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
                label = _check_label(value)
            elif key == "lr":
                lrs = [float(v) for v in value.split(",")]
            else:
                _check_key(key, head)
                over["update_proj_gap" if key == "gap" else key] = _KEYS[key](value)
        except ValueError as e:
            raise UsageError(f"--runs {text!r}: {item!r}: {e}") from e
    return RunSpec(label, head, lrs, over, text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``compare`` flags: the shared model/schedule flags plus the run specs."""
    p.add_argument(
        "--runs",
        nargs="+",
        metavar="SPEC",
        help="OPTIMIZER[:lr=A,B][:scale=..][:rank=..][:gap=..][:moments=..][:label=..] "
        f"(default: {' '.join(DEFAULT_RUNS)})",
    )
    add_model_arguments(p)
    add_option(p, "--out", shown="runs/compare-<preset>")
    add_option(p, "--resume")
    add_option(p, "--overwrite")
    add_option(p, "--no-progress")


def _settings(optimizer: str) -> tuple[str, ...]:
    """The low-rank settings ``optimizer`` takes (``rank``, ``update_proj_gap``, ``scale``)."""
    return LOW_RANK_SETTINGS[EIGHT_BIT.get(optimizer, optimizer)]


def _run_config(base: TrainConfig, spec: RunSpec, lr: float | None) -> TrainConfig:
    """One compared run's settings: ``base`` with the spec's; the shared ``--rank`` (etc.)
    reaches the runs that take it (APOLLO-Mini's rank is fixed: not its)."""
    cfg = dataclasses.replace(base, optimizer=spec.optimizer, lr=lr, **spec.overrides)
    if EIGHT_BIT.get(spec.optimizer, spec.optimizer) in FIXED_RANK:
        cfg = dataclasses.replace(cfg, rank=None)
    return cfg


def _lr_dir(lr: float | None) -> str:
    return "lr-default" if lr is None else f"lr-{lr:g}"


def _resume_flags(cfg: TrainConfig) -> dict[str, Any]:
    """A compared run's settings as flags: a resume must agree with them."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}


def _run_one(
    cfg: TrainConfig, run_dir: pathlib.Path, resume: bool, progress: bool, log: Any, **kw: Any
) -> dict[str, Any]:
    """One compared run: reused if finished, continued from its checkpoint if ``resume``
    finds one, else (re)started."""
    if resume and (run_dir / "summary.json").exists():
        s = json.loads((run_dir / "summary.json").read_text())
        if s.get("steps_done") == s.get("steps"):
            log(f"reusing {run_dir}")
            return dict(s)
    go_on = resume and (run_dir / "checkpoints").is_dir() and (run_dir / "config.json").exists()
    if go_on:
        kw["flags"] = _resume_flags(cfg)
    cfg_or_saved = TrainConfig() if go_on else cfg
    return train(
        cfg_or_saved,
        run_dir,
        resume=go_on,
        overwrite=not go_on,
        progress=progress,
        adamw_ref=False,
        log=log,
        **kw,
    )


def run_comparison(
    base: TrainConfig,
    specs: list[RunSpec],
    out: pathlib.Path,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Any = print,
    on_started: Callable[[], None] | None = None,
    on_point: OnPoint | None = None,
) -> list[dict[str, Any]]:
    """Runs every spec at every lr (``base`` with the spec's settings); returns one result
    dict per (spec, lr). ``resume`` reuses finished runs and continues interrupted ones
    from their last checkpoint; ``on_started`` is called once the first run is under way;
    ``on_point`` at each point of every run's training loop (:func:`galorax.app.train.train`).

    Raises:
        Interrupted: a Ctrl-C stopped a run on a step boundary (its checkpoint written).
    """
    results = []
    for spec in specs:
        for lr in spec.lrs:
            cfg = _run_config(base, spec, lr)
            run_dir = out / "runs" / spec.label / _lr_dir(lr)
            log(f"== {spec.label} lr={lr if lr is not None else 'default'}")
            try:
                summary = _run_one(
                    cfg, run_dir, resume, progress, log, on_started=on_started, on_point=on_point
                )
            except FloatingPointError as e:
                log(f"   diverged: {e}")
                summary = {"optimizer": spec.optimizer, "val_loss": math.inf, "diverged": True}
            except Interrupted as e:
                where = f"{spec.label} {_lr_dir(lr)}"
                done = f"saved at step {e.step}" if e.saved else "nothing saved"
                msg = f"interrupted in {where}: {done}; continue with --resume --out {out}"
                raise Interrupted(msg, e.step, e.saved) from None
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


def _check_specs(base: TrainConfig, specs: list[RunSpec]) -> None:
    """Resolves every (spec, lr) run's config: bad values fail before any run starts."""
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise UsageError(f"--runs: labels must differ ({labels}); add :label=NAME")
    defaults = TrainConfig()
    set_here = [
        k for k in ("rank", "update_proj_gap", "scale") if getattr(base, k) != getattr(defaults, k)
    ]
    unused = [k for k in set_here if not any(k in _settings(s.optimizer) for s in specs)]
    if unused:
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        it = "it" if len(unused) == 1 else "them"
        raise UsageError(
            f"{flags}: no run in --runs takes {it}; drop {it} or add a galore or apollo run"
        )
    for spec in specs:
        for lr in spec.lrs:
            cfg = _run_config(base, spec, lr)
            try:
                resolve_config(cfg)
            except UsageError as e:
                raise UsageError(f"--runs {spec.text!r}: {e}") from None


def _base_config(args: argparse.Namespace) -> tuple[TrainConfig, RunConfig]:
    """The shared flags as a config (checked); GaLore-only flags go in the specs."""
    given = [k for k in GALORE_DEFAULTS if given_flags(args).get(k) is not None]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise UsageError(
            f"{flags}: compare takes GaLore-only settings per run, e.g. --runs "
            f"galore:{given[0]}=VALUE"
        )
    cfg = config_from_args(args, optimizer="adamw")
    return cfg, resolve_config(cfg)


def _open_out(args: argparse.Namespace, out: pathlib.Path) -> Aside | None:
    """Checks ``--out``; an old comparison is moved aside for ``--overwrite``."""
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other")
    recover_asides(out, COMPARE_FILES)  # a killed --overwrite's old comparison comes back
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory; choose another --out")
    held = any((out / f).exists() for f in COMPARE_FILES)
    if held and not (args.resume or args.overwrite):
        raise UsageError(
            f"--out {out} already holds a comparison; pass --resume to reuse its finished "
            "runs, --overwrite to replace it, or choose another --out"
        )
    if args.resume and held:
        return None
    return Aside(out, COMPARE_FILES)


def run(args: argparse.Namespace) -> int:
    """``galorax compare``: returns the exit status."""
    cfg, base = _base_config(args)  # checks the shared flags before any run
    specs = [parse_spec(s) for s in (args.runs or DEFAULT_RUNS)]
    _check_specs(cfg, specs)
    data_lib.check_fits(data_lib.load_corpus(base.data or None), base.seq_len)
    out = pathlib.Path(args.out or f"runs/compare-{base.preset}")
    aside = _open_out(args, out)  # everything checked: now --out is touched
    t0 = time.perf_counter()
    try:
        results = run_comparison(
            cfg,
            specs,
            out,
            resume=args.resume,
            progress=not args.no_progress,
            on_started=None if aside is None else aside.commit,
            on_point=getattr(args, "on_point", None),
        )
    except BaseException:
        if aside is not None:
            aside.restore()  # no run under way yet: the old comparison comes back
        raise
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
