"""What ``projector_bits.py`` and ``quantized_tiny.py`` share: ``galorax train``'s run of a
preset, in memory (no run directory, no checkpoints), with the application's own pieces:
its resolved config, data, model, optimizer factory and train step.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from typing import Any

import jax
import numpy as np
import optax

from galorax.app import data as data_lib
from galorax.app import model as model_lib
from galorax.app.config import RunConfig, TrainConfig, resolve_config
from galorax.app.step import make_train_step


@dataclasses.dataclass(frozen=True)
class Bench:
    """A resolved run and what every optimizer variant of it shares."""

    run: RunConfig
    model: model_lib.ModelConfig
    corpus: data_lib.Corpus
    evals: list[np.ndarray]

    @classmethod
    def create(cls, **config: Any) -> Bench:
        """The run ``galorax train`` would make of these ``TrainConfig`` fields."""
        run = resolve_config(TrainConfig(**config))
        corpus = data_lib.load_corpus(run.data or None)
        evals = data_lib.eval_batches(corpus.val, run.batch_size, run.seq_len, run.eval_batches)
        return cls(run, model_lib.get_preset(run.preset), corpus, evals)

    def describe(self) -> str:
        """One line: the model and the run's shape."""
        n = model_lib.count_params(model_lib.abstract_params(self.model))
        r = self.run
        return (
            f"{r.preset}: {n / 1e6:.2f}M params, {r.steps} steps, "
            f"batch {r.batch_size} x {r.seq_len}, seed {r.seed}"
        )

    def init_params(self) -> Any:
        """The run's initial parameters (the same for every variant)."""
        return model_lib.init_params(self.model, jax.random.key(self.run.seed))

    def val_loss(self, params: Any) -> float:
        """Mean loss over the validation batches."""
        loss = jax.jit(lambda p, b: model_lib.loss_fn(p, b, self.model))
        return float(np.mean([loss(params, b) for b in self.evals]))

    def grad(self, params: Any, batch: np.ndarray) -> Any:
        """The loss's gradient at ``params`` on ``batch``."""
        return jax.jit(jax.grad(lambda p, b: model_lib.loss_fn(p, b, self.model)))(params, batch)


@dataclasses.dataclass(frozen=True)
class Trained:
    """The result of :func:`train`."""

    params: Any
    state: Any
    losses: list[float]
    wall_s_per_step: float
    cpu_s_per_step: float


def train(bench: Bench, opt: optax.GradientTransformation) -> Trained:
    """``bench``'s run with ``opt``: every step on the run's batches, timed."""
    run = bench.run
    params = bench.init_params()
    state = opt.init(params)
    step = make_train_step(bench.model, opt)
    losses: list[float] = []
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.time()
    for i in range(run.steps):
        batch = data_lib.sample_batch(bench.corpus.train, run.batch_size, run.seq_len, run.seed, i)
        params, state, loss = step(params, state, batch)
        losses.append(float(loss))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    return Trained(params, state, losses, (time.time() - t0) / run.steps, cpu / run.steps)
