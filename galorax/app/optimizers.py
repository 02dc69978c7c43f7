"""The one optimizer factory (:func:`make_optimizer`) that ``galorax train``, ``compare``,
``memory`` and the benchmarks build with; which leaves GaLore and APOLLO project
(:func:`galore_dimension_numbers`), rank clipping (:func:`clip_rank`) and the paper's
learning-rate schedule (:func:`make_schedule`).

Example:
    >>> sched = make_schedule(1e-2, warmup=10, steps=100)
    >>> round(float(sched(10)), 6), round(float(sched(100)), 6)  # peak, then 10% at the end
    (0.01, 0.001)
    >>> from galorax.app import model
    >>> params = model.abstract_params(model.get_preset("micro"))
    >>> opt = make_optimizer("galore8bit", params, rank=8)  # planner-style: constant lr
    >>> import jax; _ = jax.eval_shape(opt.init, params)
    >>> state = jax.eval_shape(make_optimizer("apollo-mini", params).init, params)
    >>> state[0].mu["layers"]["wq"].shape  # one rank-1 moment per layer of the stack
    (2, 32, 1)
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import optax
from optax.contrib import GaLoreDimensionNumbers as OptaxDimensionNumbers
from optax.contrib import galore as optax_galore

import galorax
from galorax.app import model as model_lib
from galorax.app.config import (
    EIGHT_BIT,
    GALORE_DEFAULTS,
    GALORE_OFF,
    LOW_RANK_SETTINGS,
    OPTIMIZERS,
    RunConfig,
)


def make_schedule(lr: float, warmup: int, steps: int, min_ratio: float = 0.1) -> optax.Schedule:
    """The paper's schedule: linear warmup from 0, cosine decay to ``min_ratio * lr``."""
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=warmup, decay_steps=max(steps, warmup + 1), end_value=lr * min_ratio
    )


def run_schedule(run: RunConfig) -> optax.Schedule:
    """A run's schedule: :func:`make_schedule` of its ``lr``, ``warmup`` and ``steps``."""
    return make_schedule(run.lr, run.warmup, run.steps)


def _is_matrix(path: tuple[Any, ...]) -> bool:
    names = [getattr(k, "key", None) for k in path]
    return len(names) == 2 and names[0] == "layers" and names[1] in model_lib.MATRIX_NAMES


def galore_dimension_numbers(params: Any, folded: bool = False) -> Any:
    """Which leaves GaLore (and APOLLO) projects: the stacked layer matrices, not
    embeddings/norms/head.

    Args:
        params: The (real or abstract) parameter tree of :mod:`galorax.app.model`.
        folded: Fold the layer axis into the input axis (one projector shared by all
            layers), the only way ``optax.contrib.galore`` can take stacked weights.

    Returns:
        A tree of dimension numbers (``None`` for unprojected leaves).
    """
    if folded:
        dn: Any = OptaxDimensionNumbers(reduction_axis=(0, 1), output_axis=2)
    else:
        dn = galorax.GaLoreDimensionNumbers(reduction_axis=1, output_axis=2)  # axis 0: batch
    return jax.tree_util.tree_map_with_path(lambda p, _: dn if _is_matrix(p) else None, params)


def max_rank(params: Any) -> int:
    """The largest rank every projected matrix can take (its smaller side)."""
    sides = [
        min(x.shape[-2:])
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
        if _is_matrix(p)
    ]
    return min(sides)


def clip_rank(run: RunConfig, params: Any) -> RunConfig:
    """``run`` with ``rank`` clipped to the smallest projected matrix side (with a warning).

    Example:
        >>> from galorax.app import model
        >>> from galorax.app.config import TrainConfig, resolve_config
        >>> import warnings
        >>> params = model.abstract_params(model.get_preset("micro"))
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always")
        ...     run = clip_rank(resolve_config(TrainConfig(rank=1000)), params)
        >>> run.rank, str(w[0].message)[:24]
        (32, '--rank 1000 exceeds the ')
    """
    limit = max_rank(params)
    if "rank" not in LOW_RANK_SETTINGS[run.optimizer] or run.rank <= limit:
        return run
    warnings.warn(
        f"--rank {run.rank} exceeds the smallest projected matrix side ({limit}); "
        f"clipped to {limit}",
        stacklevel=3,
    )
    return dataclasses.replace(run, rank=limit)


#: The run settings that reach GaLore (``rank``, ``update_proj_gap`` and ``scale`` reach
#: ``optax-galore`` and APOLLO too); see :func:`make_optimizer`.
GALORE_SETTINGS = ("rank", "update_proj_gap", "scale", *GALORE_DEFAULTS)


def _galore_keywords(options: dict[str, Any], seed: int | None, eight_bit: bool) -> dict[str, Any]:
    """:func:`galorax.galore`'s keywords for the application's spelling of its options: "off"
    (:data:`~galorax.app.config.GALORE_OFF`) left to the library's default, None; a residual
    granularity as :class:`galorax.Residual` settings; the run's seed in the refresh's."""
    kw = {k: v for k, v in options.items() if k not in GALORE_OFF or v != GALORE_OFF[k]}
    if kw.get("subspace", "randomized") == "randomized" and seed is not None:
        kw["subspace"] = galorax.Randomized(seed=seed)  # the range finder's sketches
    if "residual" in kw:
        kw["residual"] = galorax.Residual(granularity=kw["residual"])
    if eight_bit:  # a leaf at a time, as the default base: 8-bit Adam mixes no leaves
        kw["base_optimizer"] = galorax.scale_by_adam_8bit()
        kw["leafwise_base"] = True
    return kw


def _apollo(
    base: str,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float,
    params: Any,
    settings: dict[str, Any],
    seed: int | None,
    eight_bit: bool,
) -> optax.GradientTransformation:
    """:func:`galorax.apollo` or :func:`galorax.apollo_mini` (``base``) with the settings it
    takes (:data:`~galorax.app.config.LOW_RANK_SETTINGS`; GaLore's others are not APOLLO's),
    the run's seed as the projections' and ``moment_bits=8`` for the 8-bit names."""
    kw = {k: v for k, v in settings.items() if k in LOW_RANK_SETTINGS[base]}
    if seed is not None:
        kw["seed"] = seed
    if eight_bit:
        kw["moment_bits"] = 8
    apollo = galorax.apollo if base == "apollo" else galorax.apollo_mini
    return apollo(
        learning_rate,
        weight_decay=weight_decay,
        weight_dimension_numbers=galore_dimension_numbers(params),
        **kw,
    )


def make_optimizer(
    name: str,
    params: Any,
    *,
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    weight_decay: float = 0.0,
    grad_clip: float = 0.0,
    seed: int | None = None,
    **galore: Any,
) -> optax.GradientTransformation:
    """The optimizer ``name`` (one of :data:`~galorax.app.config.OPTIMIZERS`), as every
    command builds it: global-norm clipping (if ``grad_clip > 0``), then the optimizer.

    Args:
        name: ``galore``, ``adamw``, ``optax-galore``, ``apollo``, ``apollo-mini`` or an
            8-bit name (``galore8bit``, ``adamw8bit``, ``apollo8bit``, ``apollo-mini8bit``:
            8-bit Adam moments: :func:`galorax.adamw_8bit`,
            :func:`galorax.scale_by_adam_8bit` as GaLore's base optimizer, APOLLO's
            ``moment_bits=8``).
        params: The (real or abstract) parameter tree of :mod:`galorax.app.model`.
        learning_rate: A constant (sizing memory: any value) or a schedule.
        weight_decay: Decoupled weight decay.
        grad_clip: Global-norm clipping; 0: none.
        seed: Seed of the randomized refresh's sketches, of APOLLO's random projections
            (None: the library's).
        **galore: :func:`galorax.galore`'s keywords (``rank``, ``update_proj_gap``, ``scale``,
            ``subspace``, ``moments``, ``stagger``, ``side``, ``projector_dtype``,
            ``refresh_axes``...; the library's defaults where left out), except
            ``residual`` (``off``, ``channel`` or ``matrix``), ``adaptive`` (a bool) and
            ``projector_bits`` (32: float projectors). ``optax-galore`` and ``apollo``
            take ``rank``, ``update_proj_gap`` and ``scale``, ``apollo-mini`` the last two
            (:data:`~galorax.app.config.LOW_RANK_SETTINGS`); AdamW none of them. The others
            are ignored.

    Raises:
        ValueError: an unknown ``name``.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    base, eight_bit = EIGHT_BIT.get(name, name), name in EIGHT_BIT
    opt: optax.GradientTransformation
    if base == "adamw":
        # optax.adamw's chain and updates, skipping a non-finite step in place
        adamw = galorax.adamw_8bit if eight_bit else galorax.adamw
        opt = adamw(learning_rate, weight_decay=weight_decay)
    elif base in ("apollo", "apollo-mini"):
        opt = _apollo(base, learning_rate, weight_decay, params, galore, seed, eight_bit)
    elif base == "optax-galore":
        opt = optax_galore(
            learning_rate,
            weight_decay=weight_decay,
            weight_dimension_numbers=galore_dimension_numbers(params, folded=True),
            **{k: v for k, v in galore.items() if k in ("rank", "update_proj_gap", "scale")},
        )
    else:
        opt = galorax.galore(
            learning_rate,
            weight_decay=weight_decay,
            weight_dimension_numbers=galore_dimension_numbers(params),
            **_galore_keywords(galore, seed, eight_bit),
        )
    if grad_clip > 0:
        opt = optax.chain(galorax.clip_by_global_norm(grad_clip), opt)
    return opt


def run_optimizer(
    run: RunConfig,
    params: Any,
    schedule: optax.Schedule | None = None,
    refresh_axes: str | None = None,
) -> optax.GradientTransformation:
    """A run's optimizer: :func:`make_optimizer` with the run's settings.

    Args:
        run: The resolved run.
        params: The (real or abstract) parameters.
        schedule: The run's learning-rate schedule (default: :func:`run_schedule`).
        refresh_axes: Mesh axes GaLore's refreshes split the layers over (APOLLO has no
            refreshes: unused).

    With ``run.per_layer_updates``, :func:`galorax.per_layer` of it (for
    :func:`galorax.app.step.per_layer_train_step`).
    """
    galore = {k: getattr(run, k) for k in GALORE_SETTINGS}
    if refresh_axes is not None:
        galore["refresh_axes"] = refresh_axes
    opt = make_optimizer(
        run.name,
        params,
        learning_rate=run_schedule(run) if schedule is None else schedule,
        weight_decay=run.weight_decay,
        grad_clip=0.0 if run.per_layer_updates else run.grad_clip,
        seed=run.seed,
        **galore,
    )
    if run.per_layer_updates:  # clipping by the previous step's global norm
        return galorax.per_layer(opt, max_grad_norm=run.grad_clip or None)
    return opt
