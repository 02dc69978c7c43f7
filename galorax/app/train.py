"""The training loop behind ``galorax train``, in phases that hand typed values along.

:func:`train` runs one run into an output directory (``config.json``, ``metrics.jsonl``,
``loss_curve.png``, ``summary.json`` and ``checkpoints/``) and returns its summary:

1. :func:`~galorax.app.build.open_run`: the resolved config and the prepared run directory;
2. :func:`~galorax.app.build.build`: data, model, schedule, placement and optimizer, a
   :class:`~galorax.app.build.Setup`;
3. :func:`~galorax.app.build.restore_or_init`: the latest checkpoint, or fresh (or
   ``--init-from``) weights, a :class:`~galorax.app.build.TrainState`;
4. :func:`compile_run`: the one compiled step (:mod:`galorax.app.step`) and its memory;
5. :func:`run_loop`: the steps, validation, ``metrics.jsonl`` and checkpoints;
6. :func:`~galorax.app.summary.summarize`: the summary (``summary.json``).

``galorax compare`` calls :func:`train` once per optimizer and learning rate.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from galorax.accounting import tree_bytes
from galorax.app import checkpoint as ckpt_lib
from galorax.app import data as data_lib
from galorax.app import distributed
from galorax.app import interrupt as interrupt_lib
from galorax.app import model as model_lib
from galorax.app.build import (
    Setup,
    TrainState,
    build,
    open_run,
    prepare,
    restore_or_init,
)
from galorax.app.config import RunConfig, TrainConfig
from galorax.app.interrupt import Interrupted, StopRequest
from galorax.app.report import plot_curves
from galorax.app.rundir import RunDir, recover_asides
from galorax.app.step import CompiledStep, adamw_reference, compile_step, step_memory
from galorax.app.summary import LoopResult, Throughput, finished_summary, summarize

#: Non-finite steps in a row (each skipped, params and state unchanged) that stop a run.
MAX_NONFINITE_IN_A_ROW = 10


@dataclasses.dataclass
class Skips:
    """Steps skipped for a non-finite loss or gradients (``"skipped": true`` in metrics).

    Attributes:
        total: Over the run so far (the optimizer's count lags the step by this many).
        streak: The latest ones in a row.
    """

    total: int = 0
    streak: int = 0

    @classmethod
    def logged(cls, records: list[dict[str, Any]], step: int) -> Skips:
        """The skips ``metrics.jsonl`` records up to ``step`` (a resumed run's)."""
        flags = [bool(r.get("skipped")) for r in records if "loss" in r and r["step"] <= step]
        streak = next((i for i, f in enumerate(reversed(flags)) if not f), len(flags))
        return cls(sum(flags), streak)


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


def _evaluator(setup: Setup) -> Callable[[Any], float]:
    run = setup.run
    val: list[Any] = data_lib.eval_batches(
        setup.corpus.val, run.batch_size, run.seq_len, run.eval_batches
    )
    if setup.placement is not None:
        val = [setup.placement.put_batch(b) for b in val]
    eval_fn = jax.jit(lambda p, b: model_lib.loss_fn(p, b, setup.model))
    return lambda params: float(np.mean([float(eval_fn(params, b)) for b in val]))


def _val_start(setup: Setup, rundir: RunDir, state: TrainState) -> tuple[Callable, float, float]:
    """The validation function, the loss at step 0 (logged once, reused on resume) and the
    latest logged one (a resumed run's, else step 0's)."""
    evaluate = _evaluator(setup)
    prior = [r for r in rundir.metrics.read() if "val_loss" in r and r.get("step", 0) <= state.step]
    val = next((r["val_loss"] for r in prior if r.get("step") == 0), None)
    if val is None:
        val = evaluate(state.params)
        rundir.metrics.append({"step": 0, "val_loss": val})
    return evaluate, val, prior[-1]["val_loss"] if prior else val


def _timed_step(setup: Setup, state: TrainState, step_fn: Any) -> tuple[float, float, float]:
    """One optimizer step on ``state``; returns ``(loss, wall s, CPU s)``."""
    run = setup.run
    t, c = time.perf_counter(), time.process_time()
    batch: Any = data_lib.sample_batch(
        setup.corpus.train, run.batch_size, run.seq_len, run.seed, state.step
    )
    if setup.placement is not None:  # every process keeps the rows of its devices
        batch = setup.placement.put_batch(batch)
    state.params, state.opt_state, loss = step_fn(state.params, state.opt_state, batch)
    interrupt_lib.at("stepped", state.step)
    state.step += 1
    interrupt_lib.at("counted", state.step)
    loss = float(loss)  # syncs: the time below is the real step time
    return loss, time.perf_counter() - t, time.process_time() - c


def _save(setup: Setup, ckpt: ckpt_lib.Checkpointer, state: TrainState, skips: Skips) -> None:
    """Checkpoint ``state.step``: its label is the steps done (batches drawn); its ``meta``
    says how many were skipped and the optimizer's count, ``step - skipped``."""
    interrupt_lib.at("saving", state.step)
    meta = {
        "step": state.step,
        "skipped": skips.total,
        "optimizer_count": state.step - skips.total,
        "model": dataclasses.asdict(setup.model),
    }
    ckpt.save(state.step, state.params, state.opt_state, meta)
    interrupt_lib.at("saved", state.step)


def _plot(setup: Setup, rundir: RunDir, log: Callable[[str], None]) -> None:
    try:
        if rundir.primary:
            plot_curves(
                {setup.run.name: rundir.metrics.read()},
                rundir.path / "loss_curve.png",
                f"{setup.run.preset} ({setup.corpus.source})",
            )
    except Exception as e:  # a plotting failure must not lose the run
        log(f"warning: could not plot the loss curve: {e}")


def _step_record(
    setup: Setup, state: TrainState, step_fn: Any, result: LoopResult, start: int, skips: Skips
) -> dict[str, Any]:
    """One step, timed; its metrics record (without validation)."""
    loss, dt, dc = _timed_step(setup, state, step_fn)
    step = result.step = state.step
    if step > start + 1:  # the first call warms caches; refresh steps all count
        result.throughput.add(dt, dc)
    return {
        "step": step,
        "loss": loss,
        "lr": float(setup.schedule(step - 1 - skips.total)),  # the optimizer's own count
        "step_s": round(dt, 5),
        "cpu_s": round(dc, 5),
        "tokens_per_s": round(result.throughput.tokens_per_s(dt), 1),
    }


def _skip(rec: dict[str, Any], skips: Skips, run: RunConfig, log: Callable[[str], None]) -> None:
    """Counts a skipped (non-finite) step; stops the run after too many in a row.

    Raises:
        FloatingPointError: :data:`MAX_NONFINITE_IN_A_ROW` skipped steps in a row.
    """
    rec["skipped"] = True
    skips.total += 1
    skips.streak += 1
    step = rec["step"]
    if skips.streak == 1:
        log(
            f"step {step}: loss or gradients not finite; step skipped (params and optimizer "
            f"state unchanged); {MAX_NONFINITE_IN_A_ROW} in a row stop the run"
        )
    if skips.streak >= MAX_NONFINITE_IN_A_ROW:
        raise FloatingPointError(
            f"loss or gradients not finite at {skips.streak} steps in a row "
            f"({step - skips.streak + 1}-{step}): stopped; lower --lr (now {run.lr}) or "
            "check --data; --resume continues from the last checkpoint"
        )


def _progress(setup: Setup, start: int, stop: int, progress: bool) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    run = setup.run
    return tqdm(total=stop, initial=start, desc=f"{run.optimizer} {run.preset}", unit="step")


def _interrupted(state: TrainState, start: int, rundir: RunDir) -> Interrupted:
    if state.step > start:
        return Interrupted(
            f"interrupted: checkpoint saved at step {state.step}; continue with --resume "
            f"--out {rundir.path}",
            state.step,
            saved=True,
        )
    return Interrupted(f"interrupted at step {state.step}: no step run, nothing saved", start)


def run_loop(
    setup: Setup,
    state: TrainState,
    step_fn: Any,
    rundir: RunDir,
    ckpt: ckpt_lib.Checkpointer,
    stop: int,
    progress: bool = True,
    log: Callable[[str], None] = print,
    interrupt: StopRequest | None = None,
) -> LoopResult:
    """Phase 5: steps until ``stop``, logging each to ``metrics.jsonl``, validating every
    ``eval_every`` steps and checkpointing every ``checkpoint_every`` (and at ``stop``);
    plots ``loss_curve.png`` unless aborted. The caller closes ``ckpt``.

    A stop requested through ``interrupt`` (the first Ctrl-C) ends the loop on a step
    boundary: the step in flight completes (count, metrics line), then a checkpoint
    labelled with the steps done (the optimizer's count plus the skipped non-finite steps,
    which leave the whole state as it was; :func:`_save`) is written and :class:`Interrupted`
    raised. The processes of a ``jax.distributed`` run agree on the stop before each step.
    """
    run, start = setup.run, state.step
    interrupt = interrupt or StopRequest()
    evaluate, val_start, val_last = _val_start(setup, rundir, state)
    result = LoopResult(start, val_start, val_last, Throughput(run.tokens_per_step))
    skips = Skips.logged(rundir.metrics.read(), start)
    pbar, aborted = _progress(setup, start, stop, progress), True
    interrupt_lib.at("ready", start)
    try:
        # The stop decision is shared: every process stops after the same step.
        while state.step < stop and not interrupt.agree(distributed.any_process):
            interrupt_lib.at("start", state.step)
            rec = _step_record(setup, state, step_fn, result, start, skips)
            step, loss = rec["step"], rec["loss"]
            if math.isfinite(loss):
                skips.streak = 0
            else:
                try:
                    _skip(rec, skips, run, log)
                except FloatingPointError:
                    rundir.metrics.append(rec)
                    aborted = False
                    raise
            if step % run.eval_every == 0 or step == run.steps:
                result.val_loss = rec["val_loss"] = evaluate(state.params)
            rundir.metrics.append(rec)
            rundir.started()  # a step done: the new run replaces an --overwrite'n one
            interrupt_lib.at("logged", step)
            if pbar is not None:
                pbar.update(1)
                more = {"skipped": skips.total} if skips.total else {}
                pbar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}", **more)
            if run.checkpoint_every and step % run.checkpoint_every == 0:
                _save(setup, ckpt, state, skips)
        if state.step > start:  # at stop, or where the interrupt landed (no-op if saved)
            _save(setup, ckpt, state, skips)
        aborted = False
    finally:
        if pbar is not None:
            pbar.close()
        rundir.metrics.close()
        if not aborted:  # a second Ctrl-C writes nothing more
            _plot(setup, rundir, log)
    if interrupt.agreed and state.step < stop:  # at stop the run simply ends
        raise _interrupted(state, start, rundir)
    return result


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

    A finished run is not resumed again: its summary comes back and nothing is written.
    Before the run is under way, ``out`` is as it was if anything fails: an ``overwrite``n
    run comes back, a new run's files and folders are removed; after a SIGKILL, the next
    call on ``out`` does it (:func:`~galorax.app.rundir.recover_asides`).

    Raises:
        UsageError: bad flags or output directory (nothing is modified then).
        data_lib.DataError: missing or empty data.
        FloatingPointError: :data:`MAX_NONFINITE_IN_A_ROW` steps in a row had a
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
            summary = _run(setup, rundir, resume, stop_after, progress, adamw_ref, log, interrupt)
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
        result = run_loop(setup, state, compiled.fn, rundir, ckpt, stop, progress, log, interrupt)
    finally:
        ckpt.close()
    records = rundir.metrics.read()
    summary = summarize(setup, state, compiled, result, opt_state_bytes, ref, records)
    summary["skipped_steps"] = Skips.logged(records, state.step).total
    rundir.started()  # a resumed run whose stop was already reached: nothing aside anyway
    rundir.write_json("summary.json", summary)
    return summary
