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
6. :func:`summarize`: the summary (``summary.json``).

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
from galorax.app import model as model_lib
from galorax.app.build import Setup, TrainState, build, init_meta, open_run, restore_or_init
from galorax.app.config import TrainConfig
from galorax.app.optimizers import galore_dimension_numbers
from galorax.app.report import plot_curves
from galorax.app.rundir import RunDir
from galorax.app.step import StepMemory, adamw_reference, compile_step, step_memory
from galorax.schedule import count_refreshes


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """Phase 4's result: the compiled step, its compile time and XLA's memory record."""

    fn: Any
    seconds: float
    memory: StepMemory | None


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


@dataclasses.dataclass
class Throughput:
    """Timed steps (all but the first of each process: it warms caches; refreshes count)."""

    tokens_per_step: int
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    tokens: int = 0

    def add(self, seconds: float, cpu_seconds: float) -> None:
        """Counts one timed step."""
        self.seconds += seconds
        self.cpu_seconds += cpu_seconds
        self.tokens += self.tokens_per_step

    def tokens_per_s(self, last_seconds: float) -> float:
        """The mean rate so far (the last step's before any step is timed)."""
        return self.tokens / self.seconds if self.seconds else self.tokens_per_step / last_seconds


@dataclasses.dataclass
class LoopResult:
    """Phase 5's result: steps done, validation losses, throughput."""

    step: int
    val_start: float
    val_loss: float
    throughput: Throughput


def _evaluator(setup: Setup) -> Callable[[Any], float]:
    run = setup.run
    val: list[Any] = data_lib.eval_batches(
        setup.corpus.val, run.batch_size, run.seq_len, run.eval_batches
    )
    if setup.placement is not None:
        val = [setup.placement.put_batch(b) for b in val]
    eval_fn = jax.jit(lambda p, b: model_lib.loss_fn(p, b, setup.model))
    return lambda params: float(np.mean([float(eval_fn(params, b)) for b in val]))


def _val_start(setup: Setup, rundir: RunDir, state: TrainState) -> tuple[Callable, float]:
    """The validation function and the loss at step 0 (logged once, reused on resume)."""
    evaluate = _evaluator(setup)
    prior = rundir.metrics.read()
    val = next((r["val_loss"] for r in prior if r.get("step") == 0 and "val_loss" in r), None)
    if val is None:
        val = evaluate(state.params)
        rundir.metrics.append({"step": 0, "val_loss": val})
    return evaluate, val


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
    loss = float(loss)  # syncs: the time below is the real step time
    state.step += 1
    return loss, time.perf_counter() - t, time.process_time() - c


def _save(setup: Setup, ckpt: ckpt_lib.Checkpointer, state: TrainState) -> None:
    meta = {"step": state.step, "model": dataclasses.asdict(setup.model)}
    ckpt.save(state.step, state.params, state.opt_state, meta)


def _plot(setup: Setup, rundir: RunDir, log: Callable[[str], None]) -> None:
    try:
        if rundir.primary:
            plot_curves(
                {setup.run.optimizer: rundir.metrics.read()},
                rundir.path / "loss_curve.png",
                f"{setup.run.preset} ({setup.corpus.source})",
            )
    except Exception as e:  # a plotting failure must not lose the run
        log(f"warning: could not plot the loss curve: {e}")


def run_loop(
    setup: Setup,
    state: TrainState,
    step_fn: Any,
    rundir: RunDir,
    ckpt: ckpt_lib.Checkpointer,
    stop: int,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> LoopResult:
    """Phase 5: steps until ``stop``, logging each to ``metrics.jsonl``, validating every
    ``eval_every`` steps and checkpointing every ``checkpoint_every`` (and at ``stop``);
    plots ``loss_curve.png`` however it ends. The caller closes ``ckpt``."""
    run, start = setup.run, state.step
    evaluate, val_start = _val_start(setup, rundir, state)
    result = LoopResult(start, val_start, val_start, Throughput(run.tokens_per_step))
    pbar = None
    if progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=stop, initial=start, desc=f"{run.optimizer} {run.preset}", unit="step")
    try:
        while state.step < stop:
            loss, dt, dc = _timed_step(setup, state, step_fn)
            step = result.step = state.step
            if step > start + 1:  # the first call warms caches; refresh steps all count
                result.throughput.add(dt, dc)
            tps = result.throughput.tokens_per_s(dt)
            rec: dict[str, Any] = {
                "step": step,
                "loss": loss,
                "lr": float(setup.schedule(step - 1)),
                "step_s": round(dt, 5),
                "cpu_s": round(dc, 5),
                "tokens_per_s": round(tps, 1),
            }
            if not math.isfinite(loss):
                rundir.metrics.append(rec)
                raise FloatingPointError(
                    f"the loss became {loss} at step {step}; lower --lr (now {run.lr})"
                )
            if step % run.eval_every == 0 or step == run.steps:
                result.val_loss = rec["val_loss"] = evaluate(state.params)
            rundir.metrics.append(rec)
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:.0f}")
            if (run.checkpoint_every and step % run.checkpoint_every == 0) or step == stop:
                _save(setup, ckpt, state)
    except KeyboardInterrupt:
        if state.step > start:  # keep the work done so far: --resume continues from here
            _save(setup, ckpt, state)
            log(f"\ninterrupted: checkpoint saved at step {state.step}; continue with --resume")
        raise
    finally:
        if pbar is not None:
            pbar.close()
        rundir.metrics.close()
        _plot(setup, rundir, log)
    return result


def _refreshes(setup: Setup, opt_state: Any, steps: int) -> int | None:
    """Projectors computed over the run (per layer slice for galore, per leaf for optax)."""
    run = setup.run
    if run.optimizer == "galore":
        return count_refreshes(opt_state)
    if run.optimizer == "optax-galore":  # every projected leaf at each multiple of the gap
        leaves = jax.tree.leaves(galore_dimension_numbers(setup.abstract, folded=True))
        return len(leaves) * -(-steps // run.update_proj_gap)
    return None


def summarize(
    setup: Setup,
    state: TrainState,
    compiled: CompiledStep,
    result: LoopResult,
    opt_state_bytes: int,
    adamw: dict[str, Any] | None,
    records: list[dict[str, Any]],
) -> dict[str, Any]:
    """Phase 6: the run's summary (``summary.json``; :func:`galorax.app.report.format_summary`
    prints it).

    Args:
        adamw: AdamW's reference figures (:func:`galorax.app.step.adamw_reference`).
        records: ``metrics.jsonl``'s records.
    """
    run, tp = setup.run, result.throughput
    timed_s, timed_tokens = tp.seconds, tp.tokens
    step_times = [r["step_s"] for r in records if "step_s" in r]
    # Over a resumed run, rate over all logged steps but the first of each process.
    if timed_s == 0.0 and step_times:
        timed_s, timed_tokens = sum(step_times), run.tokens_per_step * len(step_times)
    memory = None if compiled.memory is None else compiled.memory.as_dict()
    if adamw is None and run.optimizer == "adamw" and run.state_bits == 32:
        adamw = {"opt_state_bytes": opt_state_bytes, "step_memory": memory}
    return {
        "optimizer": run.name,
        "preset": run.preset,
        "lr": run.lr,
        "rank": run.rank if run.optimizer != "adamw" else None,
        "steps_done": result.step,
        "steps": run.steps,
        "val_loss_start": result.val_start,
        "val_loss": result.val_loss,
        "val_ppl": math.exp(result.val_loss),
        "tokens_per_s": timed_tokens / timed_s if timed_s else float("nan"),
        # CPU time of all this process's threads: the work itself, robust to other jobs
        # sharing the machine (wall-clock tokens/s is not).
        "tokens_per_cpu_s": timed_tokens / tp.cpu_seconds if tp.cpu_seconds else float("nan"),
        "n_params": model_lib.count_params(setup.abstract),
        "param_bytes": tree_bytes(setup.abstract),
        "opt_state_bytes": opt_state_bytes,
        "refreshes": _refreshes(setup, state.opt_state, result.step),
        "step_memory": memory,
        "compile_s": compiled.seconds,
        "adamw": adamw,
        "data_source": setup.corpus.source,
        **init_meta(setup),
    }


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

    Raises:
        UsageError: bad flags or output directory (nothing is modified then).
        data_lib.DataError: missing or empty data.
        FloatingPointError: the loss became NaN/inf (lower ``--lr``).
    """
    out = pathlib.Path(out)
    run, rundir = open_run(
        cfg, out, resume=resume, overwrite=overwrite, init_from=init_from, flags=flags
    )
    if not rundir.primary:
        log, progress = (lambda msg: None), False
    setup = build(run, init_from, log)
    run = setup.run
    ckpt = ckpt_lib.Checkpointer(out / "checkpoints")
    try:
        state = restore_or_init(setup, rundir, ckpt, resume, log)
        compiled = compile_run(setup, state)
        opt_state_bytes = tree_bytes(state.opt_state)
        plain_adamw = run.optimizer == "adamw" and run.state_bits == 32
        ref = None
        if adamw_ref and not plain_adamw:
            ref = adamw_reference(run, setup.model, setup.abstract, setup.placement)
        stop = min(run.steps, stop_after) if stop_after is not None else run.steps
        result = run_loop(setup, state, compiled.fn, rundir, ckpt, stop, progress, log)
    finally:
        ckpt.close()
    records = rundir.metrics.read()
    summary = summarize(setup, state, compiled, result, opt_state_bytes, ref, records)
    rundir.write_json("summary.json", summary)
    if result.step < run.steps:
        log(f"stopped after step {result.step}/{run.steps}; continue with --resume --out {out}")
    return summary
