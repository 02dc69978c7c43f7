"""Phases 1 to 3 of a run (:func:`galorax.app.train.train` runs them in turn):

1. :func:`open_run`: the resolved :class:`~galorax.app.config.RunConfig` (a resumed run's
   saved one) and the checked, untouched :class:`~galorax.app.rundir.RunDir`
   (:func:`prepare` readies it once :func:`build` has validated data and mesh);
2. :func:`build`: data, model, learning-rate schedule, mesh placement and optimizer (the
   ``--mesh`` string parsed once, GaLore's ``refresh_axes`` derived from the mesh), a
   :class:`Setup`;
3. :func:`restore_or_init`: the latest checkpoint's state, or fresh (or ``--init-from``)
   weights and optimizer state, a :class:`TrainState`.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from galorax.app import checkpoint as ckpt_lib
from galorax.app import data as data_lib
from galorax.app import distributed
from galorax.app import model as model_lib
from galorax.app.config import (
    DTYPES,
    RunConfig,
    TrainConfig,
    UsageError,
    resolve_config,
    resume_config,
)
from galorax.app.distributed import Targets, TrainPlacement
from galorax.app.optimizers import clip_rank, run_optimizer, run_schedule
from galorax.app.rundir import RunDir, check_out_dir, prepare_out_dir
from galorax.sharding import make_mesh


def open_run(
    cfg: TrainConfig,
    out: pathlib.Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    init_from: str | None = None,
    flags: dict[str, Any] | None = None,
) -> tuple[RunConfig, RunDir]:
    """Phase 1: the run's resolved config and its (not yet prepared) output directory.

    Touches nothing: ``out`` is checked against ``resume``/``overwrite``; a new run's
    config is resolved, a resumed run's is the saved one, updated by the ``flags`` that may
    change (see :func:`~galorax.app.config.resume_config`). :func:`prepare` makes ``out``
    ready once :func:`build` has validated the rest.
    """
    if init_from is not None and resume:
        raise UsageError("--init-from starts a new run; it cannot be combined with --resume")
    run = None if resume else resolve_config(cfg)
    check_out_dir(out, resume, overwrite)
    rundir = RunDir(out, distributed.is_primary())
    if run is None:
        run = resolve_config(resume_config(rundir.saved_config(), flags or {}))
    return run, rundir


def prepare(rundir: RunDir, resume: bool, overwrite: bool) -> None:
    """Makes ``--out`` ready (an old run moved aside, see :class:`~galorax.app.rundir.Aside`);
    call it once everything is validated."""
    if rundir.primary:
        rundir.aside = prepare_out_dir(rundir.path, resume, overwrite)
    distributed.sync_processes("galorax train: out dir ready")


@dataclasses.dataclass(frozen=True)
class Setup:
    """Phase 2's result: everything a run computes with.

    Attributes:
        run: The resolved config (rank clipped to the model).
        model: The model's architecture.
        corpus: The data.
        abstract: The parameters' shapes and dtypes.
        schedule: The learning-rate schedule (the optimizer's, and the one logged).
        optimizer: The optimizer (:func:`galorax.app.optimizers.run_optimizer`).
        placement: Where arrays live on ``--mesh``; None on one device.
        targets: The placed abstract params and state; None on one device.
        init_from: The run whose weights start this one, if any.
    """

    run: RunConfig
    model: model_lib.ModelConfig
    corpus: data_lib.Corpus
    abstract: Any
    schedule: optax.Schedule
    optimizer: optax.GradientTransformation
    placement: TrainPlacement | None
    targets: Targets | None
    init_from: str | None


def _open_mesh(run: RunConfig) -> Mesh | None:
    """``--mesh`` parsed, once, into a mesh of automatic axes (None: one device)."""
    if not run.mesh:
        return None
    try:
        return make_mesh(run.mesh, explicit=False)
    except ValueError as e:
        raise UsageError(f"--mesh {run.mesh}: {e}") from None


def _model_config(
    run: RunConfig, corpus: data_lib.Corpus, init_from: str | None, log: Callable[[str], None]
) -> model_lib.ModelConfig:
    if init_from is None:
        return model_lib.get_preset(run.preset, corpus.vocab_size)
    mcfg = ckpt_lib.model_config_of(init_from)
    if mcfg.vocab_size != corpus.vocab_size:
        raise UsageError(f"--init-from {init_from}: vocabulary {mcfg.vocab_size} != data's")
    if run.preset != "tiny" and mcfg != model_lib.get_preset(run.preset, mcfg.vocab_size):
        log(f"note: --init-from {init_from} fixes the architecture; --preset is ignored")
    return mcfg


def _place(
    run: RunConfig, mesh: Mesh | None, abstract: Any, opt: optax.GradientTransformation
) -> tuple[TrainPlacement | None, Targets | None]:
    if mesh is None:
        return None, None
    try:
        placement = TrainPlacement.create(mesh, abstract)
    except ValueError as e:
        raise UsageError(f"--mesh {run.mesh}: {e}") from None
    ways = placement.batch_ways()
    if run.batch_size % ways:
        raise UsageError(
            f"--batch-size {run.batch_size} does not split over the {ways} data-parallel "
            f"devices of --mesh {run.mesh}; use a multiple of {ways}"
        )
    return placement, placement.targets(opt, abstract)


def build(
    run: RunConfig, init_from: str | None = None, log: Callable[[str], None] = print
) -> Setup:
    """Phase 2: data, model, schedule, placement and optimizer of ``run``.

    On a mesh with a ``data`` axis (weights replicated over it), GaLore's refreshes split
    the layers over ``data`` (``refresh_axes``).
    """
    mesh = _open_mesh(run)
    corpus = data_lib.load_corpus(run.data or None)
    data_lib.check_fits(corpus, run.seq_len)
    mcfg = _model_config(run, corpus, init_from, log)
    abstract = model_lib.abstract_params(mcfg, DTYPES[run.dtype])
    run = clip_rank(run, abstract)
    schedule = run_schedule(run)
    refresh_axes = "data" if mesh is not None and "data" in mesh.axis_names else None
    opt = run_optimizer(run, abstract, schedule, refresh_axes)
    placement, targets = _place(run, mesh, abstract, opt)
    return Setup(run, mcfg, corpus, abstract, schedule, opt, placement, targets, init_from)


@dataclasses.dataclass
class TrainState:
    """The live training state; :func:`run_loop` advances it in place.

    Attributes:
        params: The parameters.
        opt_state: The optimizer state.
        step: Optimizer steps done.
    """

    params: Any
    opt_state: Any
    step: int


def _restore(
    setup: Setup, rundir: RunDir, ckpt: ckpt_lib.Checkpointer, log: Callable[[str], None]
) -> TrainState:
    if rundir.primary:
        for name in ckpt.clean_tmp():
            log(f"removed {name}: an unfinished checkpoint write")
    distributed.sync_processes("galorax train: checkpoints clean")
    targets = setup.targets or Targets(
        setup.abstract, jax.eval_shape(setup.optimizer.init, setup.abstract), None
    )
    # The newest intact checkpoint, onto the mesh; damaged newer ones are set aside.
    found = ckpt.restore_latest(targets.params, targets.state, log)
    if found is None:
        if "init_from" in rundir.config_json():
            raise UsageError(
                f"--resume: {rundir.path} holds no finished checkpoint; start it over with "
                "--overwrite --init-from (as it was started)"
            )
        log(f"{rundir.path}/checkpoints holds no finished checkpoint: starting the run over")
        rundir.metrics.keep_until(0)  # step 0's validation is the same init's
        return _init(setup)
    latest, params, opt_state, damaged = found
    _set_aside(rundir, ckpt, damaged, latest, log)
    # Metrics past the checkpoint are re-run: drop them so the log has no duplicates.
    rundir.metrics.keep_until(latest)
    log(f"resumed {rundir.path} at step {latest}/{setup.run.steps}")
    return TrainState(params, opt_state, latest)


def _set_aside(
    rundir: RunDir,
    ckpt: ckpt_lib.Checkpointer,
    damaged: list[int],
    latest: int,
    log: Callable[[str], None],
) -> None:
    """Renames the damaged checkpoints newer than ``latest``: the run writes them again."""
    if not damaged:
        return
    if rundir.primary:
        for step in damaged:
            log(f"set checkpoint {step} aside as {ckpt.set_aside(step).name}")
        log(f"resuming from step {latest}, the newest intact checkpoint")
    distributed.sync_processes("galorax train: damaged checkpoints set aside")
    ckpt.all_steps()  # every process sees the steps as they now are


def _init(setup: Setup) -> TrainState:
    run, placement, dtype = setup.run, setup.placement, DTYPES[setup.run.dtype]
    if setup.init_from is not None:
        template = setup.abstract if setup.targets is None else setup.targets.params
        params = ckpt_lib.load_params(setup.init_from, template)
    elif placement is not None:  # born sharded: no process holds the whole model
        init = functools.partial(model_lib.init_params, setup.model, dtype=dtype)
        params = jax.jit(init, out_shardings=placement.params)(jax.random.key(run.seed))
    else:
        params = model_lib.init_params(setup.model, jax.random.key(run.seed), dtype)
    if setup.targets is not None:
        init_state = jax.jit(setup.optimizer.init, out_shardings=setup.targets.state_shardings)
        return TrainState(params, init_state(params), 0)
    return TrainState(params, setup.optimizer.init(params), 0)


def init_meta(setup: Setup) -> dict[str, Any]:
    return {} if setup.init_from is None else {"init_from": str(setup.init_from)}


def restore_or_init(
    setup: Setup,
    rundir: RunDir,
    ckpt: ckpt_lib.Checkpointer,
    resume: bool,
    log: Callable[[str], None] = print,
) -> TrainState:
    """Phase 3: the latest checkpoint's state (``resume``), or a new run's (its
    ``config.json`` and an empty ``metrics.jsonl`` written)."""
    if resume:
        state = _restore(setup, rundir, ckpt, log)
    else:
        state = _init(setup)
        config_json = {
            "train": dataclasses.asdict(setup.run.as_train_config()),
            "model": dataclasses.asdict(setup.model),
            "data_source": setup.corpus.source,
            "jax": jax.__version__,
            "optax": optax.__version__,
            **init_meta(setup),
        }
        rundir.write_json("config.json", config_json)
        rundir.metrics.start()
    distributed.sync_processes("galorax train: metrics ready")  # all read the same log
    return state
