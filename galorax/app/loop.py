"""Phase 5 of a run: the training loop, :func:`run_loop`.

Steps until the stop step, each logged to ``metrics.jsonl`` (timed, with the learning rate
and the throughput), validating every ``eval_every`` steps, checkpointing every
``checkpoint_every`` (the checkpoint's label and ``meta``: :func:`_save`) and plotting
``loss_curve.png`` at the end. A step whose loss or gradients are not finite is skipped
(:class:`Skips`); :data:`MAX_NONFINITE_IN_A_ROW` in a row stop the run. A Ctrl-C ends it on
a step boundary (:mod:`galorax.app.interrupt`). :func:`galorax.app.train.train` runs it after
the compile (:func:`galorax.app.train.compile_run`). A caller may observe the loop's points
(:data:`POINTS`) through ``on_point``: the tests deliver a Ctrl-C at each of them that way.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from galorax.app import checkpoint as ckpt_lib
from galorax.app import data as data_lib
from galorax.app import distributed
from galorax.app import model as model_lib
from galorax.app.build import Setup, TrainState
from galorax.app.config import RunConfig
from galorax.app.interrupt import Interrupted, StopRequest
from galorax.app.report import plot_curves
from galorax.app.rundir import RunDir
from galorax.app.summary import LoopResult, Throughput

__all__ = ["MAX_NONFINITE_IN_A_ROW", "POINTS", "OnPoint", "Skips", "run_loop"]


#: Non-finite steps in a row (each skipped, params and state unchanged) that stop a run.
MAX_NONFINITE_IN_A_ROW = 10

#: The points of the step loop, in order: once compiled and validated (before any step),
#: before each step's batch is drawn, once the step has
#: returned (state updated, count not yet), once counted, once its metrics line is written,
#: just before and just after a checkpoint save.
POINTS = ("ready", "start", "stepped", "counted", "logged", "saving", "saved")

#: An observer of the loop, called as ``on_point(point, step)`` at each of its :data:`POINTS`.
OnPoint = Callable[[str, int], None]


def _no_point(point: str, step: int) -> None:
    """The default observer of the loop's points: nothing."""


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


def _evaluator(setup: Setup) -> Callable[[Any], float]:
    """The validation loss of params: the mean over the run's fixed validation batches."""
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


def _timed_step(
    setup: Setup, state: TrainState, step_fn: Any, on_point: OnPoint
) -> tuple[float, float, float]:
    """One optimizer step on ``state``; returns ``(loss, wall s, CPU s)``."""
    run = setup.run
    t, c = time.perf_counter(), time.process_time()
    batch: Any = data_lib.sample_batch(
        setup.corpus.train, run.batch_size, run.seq_len, run.seed, state.step
    )
    if setup.placement is not None:  # every process keeps the rows of its devices
        batch = setup.placement.put_batch(batch)
    state.params, state.opt_state, loss = step_fn(state.params, state.opt_state, batch)
    on_point("stepped", state.step)
    state.step += 1
    on_point("counted", state.step)
    loss = float(loss)  # syncs: the time below is the real step time
    return loss, time.perf_counter() - t, time.process_time() - c


def _save(
    setup: Setup, ckpt: ckpt_lib.Checkpointer, state: TrainState, skips: Skips, on_point: OnPoint
) -> None:
    """Checkpoint ``state.step``: its label is the steps done (batches drawn); its ``meta``
    says how many were skipped and the optimizer's count, ``step - skipped``."""
    on_point("saving", state.step)
    meta = {
        "step": state.step,
        "skipped": skips.total,
        "optimizer_count": state.step - skips.total,
        "model": dataclasses.asdict(setup.model),
    }
    ckpt.save(state.step, state.params, state.opt_state, meta)
    on_point("saved", state.step)


def _plot(setup: Setup, rundir: RunDir, log: Callable[[str], None]) -> None:
    """Writes ``loss_curve.png`` (primary process); a failure is only logged."""
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
    setup: Setup,
    state: TrainState,
    step_fn: Any,
    result: LoopResult,
    start: int,
    skips: Skips,
    on_point: OnPoint,
) -> dict[str, Any]:
    """One step, timed; its metrics record (without validation)."""
    loss, dt, dc = _timed_step(setup, state, step_fn, on_point)
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
    """A tqdm bar from ``start`` to ``stop``, or None without ``progress``."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    run = setup.run
    return tqdm(total=stop, initial=start, desc=f"{run.optimizer} {run.preset}", unit="step")


def _interrupted(state: TrainState, start: int, rundir: RunDir) -> Interrupted:
    """The :class:`Interrupted` to raise after a stop at ``state.step`` (saved if a step ran)."""
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
    on_point: OnPoint | None = None,
) -> LoopResult:
    """Phase 5: steps until ``stop``, logging each to ``metrics.jsonl``, validating every
    ``eval_every`` steps and checkpointing every ``checkpoint_every`` (and at ``stop``);
    plots ``loss_curve.png`` unless aborted. The caller closes ``ckpt``.

    A stop requested through ``interrupt`` (the first Ctrl-C) ends the loop on a step
    boundary: the step in flight completes (count, metrics line), then a checkpoint
    labelled with the steps done (the optimizer's count plus the skipped non-finite steps,
    which leave the whole state as it was; :func:`_save`) is written and :class:`Interrupted`
    raised. The processes of a ``jax.distributed`` run agree on the stop before each step.

    ``on_point``, if given, is called as ``on_point(point, step)`` at each point of the loop
    (:data:`POINTS`), on the loop's thread: an observer of its progress (the tests send a
    SIGINT from it, to land a Ctrl-C deterministically on any point instead of racing a timer).
    """
    run, start = setup.run, state.step
    interrupt = interrupt or StopRequest()
    on_point = on_point or _no_point
    evaluate, val_start, val_last = _val_start(setup, rundir, state)
    result = LoopResult(start, val_start, val_last, Throughput(run.tokens_per_step))
    skips = Skips.logged(rundir.metrics.read(), start)
    pbar, aborted = _progress(setup, start, stop, progress), True
    on_point("ready", start)
    try:
        # The stop decision is shared: every process stops after the same step.
        while state.step < stop and not interrupt.agree(distributed.any_process):
            on_point("start", state.step)
            rec = _step_record(setup, state, step_fn, result, start, skips, on_point)
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
            on_point("logged", step)
            if pbar is not None:
                pbar.update(1)
                more = {"skipped": skips.total} if skips.total else {}
                pbar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}", **more)
            if run.checkpoint_every and step % run.checkpoint_every == 0:
                _save(setup, ckpt, state, skips, on_point)
        if state.step > start:  # at stop, or where the interrupt landed (no-op if saved)
            _save(setup, ckpt, state, skips, on_point)
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
