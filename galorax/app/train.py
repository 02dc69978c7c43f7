"""A run of ``galorax train``, in phases that hand typed values along.

:func:`train` runs one run into an output directory (``config.json``, ``metrics.jsonl``,
``loss_curve.png``, ``summary.json`` and ``checkpoints/``) and returns its summary:

1. :func:`~galorax.app.build.open_run`: the resolved config and the prepared run directory;
2. :func:`~galorax.app.build.build`: data, model, schedule, placement and optimizer, a
   :class:`~galorax.app.build.Setup`;
3. :func:`~galorax.app.build.restore_or_init`: the latest checkpoint, or fresh (or
   ``--init-from``) weights, a :class:`~galorax.app.build.TrainState`;
4. :func:`compile_run`: the one compiled step (:mod:`galorax.app.step`) and its memory;
5. :func:`~galorax.app.loop.run_loop`: the steps, validation, ``metrics.jsonl`` and
   checkpoints (:mod:`galorax.app.loop`);
6. :func:`~galorax.app.summary.summarize`: the summary (``summary.json``).

``galorax compare`` calls :func:`train` once per optimizer and learning rate.
"""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from galorax import step_memory
from galorax.accounting import tree_bytes
from galorax.app import checkpoint as ckpt_lib
from galorax.app import distributed
from galorax.app.build import (
    Setup,
    TrainState,
    build,
    open_run,
    prepare,
    restore_or_init,
)
from galorax.app.config import TrainConfig
from galorax.app.interrupt import StopRequest
from galorax.app.loop import MAX_NONFINITE_IN_A_ROW, OnPoint, Skips, run_loop
from galorax.app.rundir import RunDir, recover_asides
from galorax.app.step import CompiledStep, adamw_reference, compile_step
from galorax.app.summary import finished_summary, summarize

# run_loop, Skips and MAX_NONFINITE_IN_A_ROW live in galorax.app.loop (phase 5).
__all__ = ["MAX_NONFINITE_IN_A_ROW", "Skips", "compile_run", "run_loop", "train"]


def compile_run(setup: Setup, state: TrainState) -> CompiledStep:
    """Phase 4: one compile serves both the memory analysis and the loop."""
    run, placement = setup.run, setup.placement
    shape = (run.batch_size, run.seq_len + 1)
    batch: Any = np.zeros(shape, np.int32)
    out_shardings = None
    if placement is not None and setup.targets is not None:
        batch = placement.abstract_batch(shape, jnp.int32)
        out_shardings = (placement.params, setup.targets.state_shardings, placement.replicated)
    t0 = time.perf_counter()
    fn = compile_step(
        setup.model, setup.optimizer, state.params, state.opt_state, batch, run.remat, out_shardings
    )
    return CompiledStep(fn, time.perf_counter() - t0, step_memory(fn))


def train(
    cfg: TrainConfig,
    out: str | os.PathLike[str],
    *,
    resume: bool = False,
    overwrite: bool = False,
    init_from: str | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    adamw_ref: bool = True,
    log: Callable[[str], None] = print,
    flags: dict[str, Any] | None = None,
    on_started: Callable[[], None] | None = None,
    on_point: OnPoint | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) one training run into ``out`` and returns its summary.

    Args:
        cfg: The run's settings (``None`` fields take their defaults).
        out: Output directory.
        resume: Continue the run in ``out`` from its latest checkpoint (its saved config
            wins; bit-identical to an uninterrupted run).
        overwrite: Replace the run files in ``out``.
        init_from: A run (or checkpoints) directory whose latest weights initialize the
            model; the optimizer starts fresh (fine-tuning).
        stop_after: Stop (with a checkpoint) once this many steps are done, e.g. to split a
            run over job time limits; ``--resume`` continues it.
        progress: Show a tqdm progress bar.
        adamw_ref: Also compute AdamW's state bytes and step memory for the summary.
        log: Where messages go.
        flags: The config fields the user set explicitly. With ``resume`` they must agree
            with the saved run's (else :class:`~galorax.app.config.UsageError`), except the
            ones that do not change the trajectory (:data:`~galorax.app.config.RESUME_FREE`),
            which override the saved values.
        on_started: Called once the run is under way (its first step done).
        on_point: Called as ``on_point(point, step)`` at each point of the training loop
            (:data:`~galorax.app.loop.POINTS`; see :func:`~galorax.app.loop.run_loop`).

    A finished run is not resumed again: its summary comes back and nothing is written.
    Before the run is under way, ``out`` is as it was if anything fails: an ``overwrite``n
    run comes back, a new run's files and folders are removed; after a SIGKILL, the next
    call on ``out`` does it (:func:`~galorax.app.rundir.recover_asides`).

    Raises:
        UsageError: bad flags or output directory (nothing is modified then).
        data_lib.DataError: missing or empty data.
        FloatingPointError: :data:`~galorax.app.loop.MAX_NONFINITE_IN_A_ROW` steps in a row had a
            non-finite loss or gradients (each one is skipped: params and optimizer state
            unchanged, ``"skipped": true`` in its metrics line, counted in the summary's
            ``skipped_steps``).
        Interrupted: a Ctrl-C stopped the run on a step boundary (checkpoint written).
    """
    out = pathlib.Path(out)
    _recover(out, log)
    run, rundir = open_run(
        cfg, out, resume=resume, overwrite=overwrite, init_from=init_from, flags=flags
    )
    if not rundir.primary:
        log, progress = (lambda msg: None), False
    finished = finished_summary(rundir, run) if resume else None
    if finished is not None:
        log(f"{out} is finished (step {run.steps}/{run.steps}): nothing to resume, nothing changed")
        return finished
    setup = build(run, init_from, log)  # data, model and mesh checked: now --out is touched
    prepare(rundir, resume, overwrite)
    rundir.on_started = on_started
    with StopRequest() as interrupt:
        try:
            summary = _run(
                setup, rundir, resume, stop_after, progress, adamw_ref, log, interrupt, on_point
            )
        except BaseException:
            rundir.abandon()  # not under way yet: the old run (if any) comes back
            raise
    run = setup.run
    if summary["steps_done"] < run.steps:
        log(
            f"stopped after step {summary['steps_done']}/{run.steps}; continue with --resume "
            f"--out {out}"
        )
    return summary


def _recover(out: pathlib.Path, log: Callable[[str], None]) -> None:
    """A killed ``--overwrite`` in ``out`` is finished first: the checks see the real run."""
    if distributed.is_primary():
        recover_asides(out, log=log)
    distributed.sync_processes("galorax train: out dir recovered")


def _run(
    setup: Setup,
    rundir: RunDir,
    resume: bool,
    stop_after: int | None,
    progress: bool,
    adamw_ref: bool,
    log: Callable[[str], None],
    interrupt: StopRequest,
    on_point: OnPoint | None,
) -> dict[str, Any]:
    """Phases 3 to 6 of :func:`train` into the prepared ``rundir``; returns the summary."""
    run = setup.run
    ckpt = ckpt_lib.Checkpointer(rundir.path / "checkpoints")
    try:
        state = restore_or_init(setup, rundir, ckpt, resume, log)
        compiled = compile_run(setup, state)
        opt_state_bytes = tree_bytes(state.opt_state)
        plain_adamw = run.optimizer == "adamw" and run.state_bits == 32
        ref = None
        if adamw_ref and not plain_adamw:
            ref = adamw_reference(run, setup.model, setup.abstract, setup.placement)
        stop = min(run.steps, stop_after) if stop_after is not None else run.steps
        result = run_loop(
            setup, state, compiled.fn, rundir, ckpt, stop, progress, log, interrupt, on_point
        )
    finally:
        ckpt.close()
    records = rundir.metrics.read()
    summary = summarize(setup, state, compiled, result, opt_state_bytes, ref, records)
    summary["skipped_steps"] = Skips.logged(records, state.step).total
    rundir.started()  # a resumed run whose stop was already reached: nothing aside anyway
    rundir.write_json("summary.json", summary)
    return summary
