"""What a finished (or stopped) run reports: its throughput (:class:`Throughput`), the
loop's result (:class:`LoopResult`) and ``summary.json`` (:func:`summarize`;
:func:`finished_summary` reads a finished run's back).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax

from galorax.accounting import tree_bytes
from galorax.app import model as model_lib
from galorax.app.build import Setup, TrainState, init_meta
from galorax.app.config import RunConfig
from galorax.app.optimizers import galore_dimension_numbers
from galorax.app.rundir import RunDir
from galorax.app.step import CompiledStep
from galorax.schedule import count_refreshes


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


def finished_summary(rundir: RunDir, run: RunConfig) -> dict[str, Any] | None:
    """A finished run's ``summary.json`` (all ``run.steps`` done), else None."""
    try:
        summary = json.loads((rundir.path / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    done = isinstance(summary, dict) and summary.get("steps_done") == run.steps
    return summary if done else None
