"""GaLore's state and its two transitions over the parameter tree: ``init`` and ``update``:
the spine of the algorithm.

:class:`GaLoreState` is what :func:`galorax.scale_by_galore` keeps. :func:`update_state`
runs GaLore's five steps (``_Group.__call__``: refresh, project, carry the moments, the
base optimizer's step, project back) over the tree of :class:`~galorax.leaf.LeafProjector`
(None where a leaf is not projected), all leaves at once or one leaf at a time
(``leafwise_base``), each step a call of :mod:`galorax.projector` per leaf.
:mod:`galorax.transform` wraps them in the optax transformation (boxing, checks, the
step's gate, non-finite leaves, placement).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from galorax import placement
from galorax import projector as leaf_steps
from galorax.chunking import Chunking
from galorax.dimension_numbers import is_masked
from galorax.leaf import LeafProjector, is_projector_leaf, map_leaves
from galorax.moments import check_moments, per_parameter_fields, rotate_moments
from galorax.options import GaLoreOptions
from galorax.step_gate import StepGate

__all__ = ["GaLoreState", "init_state", "update_state"]

# The start of optax's message for a transform called without the params it needs
# (``optax._src.base.NO_PARAMS_MSG``, not public).
_NO_PARAMS = "requires the current value of parameters"


class GaLoreState(NamedTuple):
    """State for the GaLore optimizer.

    The first three fields are ``optax.contrib.GaLoreState``'s. Leaves that are not
    projected hold ``optax.MaskedNode()`` in ``projector`` and ``schedule`` (a leafless
    placeholder, so orbax saves the state as it is).

    Attributes:
        count: Number of update steps taken.
        base_optimizer_state: State for the base optimizer, operating on low-rank
            gradients for projected params and full gradients for the others.
        projector: Projection matrices, ``(*batch, m, r)`` for left and ``(*batch, n, r)``
            for right projection, where ``(m, n)`` is the leaf's matrix view; with
            ``projector_bits``, a :class:`galorax.QuantizedArray` of that shape.
        schedule: A :class:`RefreshSchedule` per projected leaf.
        residual_norm: With residual compensation, last step's compensation norm per
            matrix (batch-shaped) of each projected leaf; else None.
    """

    count: jax.typing.ArrayLike  # type: ignore[assignment]  # shape=(), dtype=jnp.int32
    base_optimizer_state: optax.OptState
    projector: optax.Updates
    schedule: optax.Updates = None
    residual_norm: optax.Updates = None


def _keep(*entries: Any) -> tuple[Any, ...]:
    """An unprojected leaf's entries, as they are."""
    return entries


def _unzip(treedef: Any, tree: Any, n: int) -> tuple[Any, ...]:
    """A tree of per-leaf ``n``-tuples (at ``treedef``'s leaves) as ``n`` trees."""
    cols = list(zip(*treedef.flatten_up_to(tree), strict=True)) or [()] * n
    return tuple(treedef.unflatten(col) for col in cols)


def _init_leaf(proj: LeafProjector | None, param: Any) -> tuple[Any, ...]:
    """``(projector, low-rank proxy, schedule, residual norm, low)`` of one leaf; ``low``:
    the proxy where projected, else masked (what rotation would touch)."""
    masked = optax.MaskedNode()
    if proj is not None:
        p, proxy, schedule, norm = leaf_steps.init_leaf(proj, param)
        return p, proxy, schedule, norm, proxy
    proxy = (
        param if is_masked(param) else placement.like(jnp.zeros(param.shape, param.dtype), param)
    )
    return masked, proxy, masked, masked, masked


def init_state(
    params: Any, projectors: Any, opts: GaLoreOptions, base_tx: Any, kinds: Mapping[str, str]
) -> GaLoreState:
    """``init`` of :func:`galorax.scale_by_galore` for the tree of projectors of ``params``.

    Args:
        params: The parameters, plain (no boxes, no None leaves).
        projectors: :func:`galorax.leaf.make_projectors` of ``params``.
        opts: The transform's options.
        base_tx: The base optimizer (with extra-args support).
        kinds: How each base-state field moves at a refresh
            (:func:`galorax.moments.moment_kinds`).

    Returns:
        The initial :class:`GaLoreState`; its moments are checked against ``kinds`` when
        ``opts.moments == "rotate"``.
    """
    treedef: Any = jax.tree.structure(projectors, is_leaf=is_projector_leaf)
    per_leaf = jax.tree.map(_init_leaf, projectors, params, is_leaf=is_projector_leaf)
    projector, proxies, schedule, norms, low = _unzip(treedef, per_leaf, 5)
    base_state = base_tx.init(proxies)
    if opts.moments == "rotate":
        check_moments(base_state, low, kinds)
    return GaLoreState(
        count=jnp.zeros([], jnp.int32),
        base_optimizer_state=base_state,
        projector=projector,
        schedule=schedule,
        residual_norm=norms if opts.residual is not None else None,
    )


def update_state(
    updates: Any,
    state: GaLoreState,
    projectors: Any,
    opts: GaLoreOptions,
    base_tx: Any,
    kinds: Mapping[str, str],
    extra_args: dict[str, Any],
    gate: StepGate | None = None,
) -> tuple[Any, GaLoreState]:
    """``update`` of :func:`galorax.scale_by_galore`: refresh and project each leaf, rotate
    the moments, run the base optimizer, project back.

    With a ``gate`` (:mod:`galorax.step_gate`) the new state equals the old where the step
    is not finite: no refresh is attempted (projectors and schedules stay in place) and
    the base state, residual norms and count are selected here.

    Args:
        updates: The gradients, plain (no boxes).
        state: The current state, unboxed.
        projectors: :func:`galorax.leaf.make_projectors` of ``updates``.
        opts: The transform's options.
        base_tx: The base optimizer (with extra-args support).
        kinds: How each base-state field moves at a refresh.
        extra_args: Extra arguments for the base optimizer's update.
        gate: The train step's gate, if it may be skipped.

    Returns:
        ``(updates in parameter space, new state)``.
    """
    count = state.count
    keep = (lambda new, old: new) if gate is None else gate.keep
    treedef: Any = jax.tree.structure(projectors, is_leaf=is_projector_leaf)
    with_residual = opts.residual is not None
    norms = state.residual_norm if with_residual else treedef.unflatten([None] * treedef.num_leaves)
    finite = True if gate is None else gate.finite
    group = _Group(count, finite, keep, base_tx, kinds, extra_args, opts.chunking)
    leaves = (projectors, updates, state.projector, state.schedule, norms)
    live = sum(not is_masked(g) for g in treedef.flatten_up_to(updates))
    if opts.leafwise_base and treedef.num_leaves > 1 and live:
        out, projector, schedule, base_state, new_norms = _leafwise(group, treedef, leaves, state)
    else:
        out, projector, schedule, base_state, new_norms = group(*leaves, state.base_optimizer_state)
    return out, GaLoreState(
        count=keep(optax.safe_int32_increment(count), count),
        base_optimizer_state=base_state,
        projector=projector,
        schedule=schedule,
        residual_norm=keep(new_norms, norms) if with_residual else None,
    )


class _Group(NamedTuple):
    """The update of a group of leaves (all of them, or one): what does not vary."""

    count: Any
    finite: Any
    keep: Any
    base_tx: Any
    kinds: Mapping[str, str]
    extra_args: dict[str, Any]
    chunking: Chunking

    def __call__(
        self, leaves: Any, grads: Any, old: Any, schedules: Any, norms: Any, base_state: Any
    ) -> tuple[Any, ...]:
        """``(updates, projectors, schedules, base state, residual norms)`` of the group:
        GaLore's steps over its projected leaves (:mod:`galorax.projector`); the others go
        to the base optimizer as they are."""
        (g2,) = map_leaves(
            leaves, lambda leaf, g: (leaf_steps.as_matrices(leaf, g),), grads, skip=_keep
        )
        # 1. Refresh: new projectors for the slices that are due (none in a skipped step).
        new, schedules, moves = map_leaves(
            leaves,
            lambda leaf, g2, p, s: leaf_steps.refresh(leaf, g2, p, s, self.count, self.finite),
            g2,
            old,
            schedules,
            skip=lambda g2, p, s: (p, s, None),
        )
        # 2. Project each gradient into its subspace.
        lows, dense = map_leaves(leaves, leaf_steps.project, g2, new, skip=lambda g2, p: (g2, p))
        # 3. Carry the base optimizer's moments into the new bases.
        treedef: Any = jax.tree.structure(leaves, is_leaf=is_projector_leaf)
        moves = [None if t is None or t.basis is None else t for t in treedef.flatten_up_to(moves)]
        if any(t is not None for t in moves):
            base_state = rotate_moments(base_state, moves, self.kinds, self.chunking)
        # 4. The base optimizer's step on the low-rank gradients.
        low_updates, new_base = _base_update(self.base_tx, lows, base_state, self.extra_args)
        # 5. Project back to the weights' shape (plus the residual outside the subspace).
        out, new_norms = map_leaves(
            leaves,
            leaf_steps.project_back,
            grads,
            g2,
            lows,
            low_updates,
            new,
            dense,
            norms,
            skip=lambda g, g2, low, u, new, p, norm: (u, norm),
        )
        return out, new, schedules, self.keep(new_base, base_state), new_norms


def _leafwise(group: _Group, treedef: Any, leaves: tuple[Any, ...], state: GaLoreState):
    """:class:`_Group` one leaf at a time, each leaf's gradient tied to the last one's
    update by an optimization barrier (so XLA cannot hoist every projection first); the
    base state's per-parameter fields are split by leaf, its other fields (counts) taken
    from the last leaf's."""
    base_def, fields, flags = per_parameter_fields(state.base_optimizer_state, treedef)
    pairs = zip(fields, flags, strict=True)
    columns = [treedef.flatten_up_to(f) if pp else None for f, pp in pairs]
    flat = [treedef.flatten_up_to(tree) for tree in leaves]
    results: list[Any] = [None] * len(flat[0])
    shared, prev = fields, None
    # Largest first (measured: at 1b 0.5 GB less peak than in tree order).
    for i in sorted(range(len(results)), key=lambda i: -getattr(flat[1][i], "size", 0)):
        proj, g, old, sched, norm = (f[i] for f in flat)
        own = [c[i] if c else f for c, f in zip(columns, fields, strict=True)]
        if is_masked(g):  # nothing to update: its entries stay
            results[i] = (g, old, sched, own, norm)
            continue
        if prev is not None:
            g, _ = jax.lax.optimization_barrier((g, prev))
        out, p, sched, sub, norm = group(proj, g, old, sched, norm, base_def.unflatten(own))
        shared = base_def.flatten_up_to(sub)
        results[i] = (out, p, sched, shared, norm)
        prev = out
    out, projector, schedule, _, norms = (
        treedef.unflatten(list(col)) for col in zip(*results, strict=True)
    )
    new_fields = [
        treedef.unflatten([r[3][k] for r in results]) if pp else shared[k]
        for k, pp in enumerate(flags)
    ]
    return out, projector, schedule, base_def.unflatten(new_fields), norms


def _base_update(base_tx: Any, lows: Any, base_state: Any, extra_args: dict[str, Any]):
    """The base optimizer's step on the low-rank gradients (it gets no params)."""
    try:
        return base_tx.update(lows, base_state, None, **extra_args)
    except ValueError as err:
        if _NO_PARAMS not in str(err):
            raise
        raise ValueError(
            "GaLore's base_optimizer runs on low-rank gradients without params, but this "
            "one needs params (adamw, lamb, lars, add_decayed_weights...). Use a gradient-"
            "only transform such as optax.scale_by_adam() and pass weight decay through "
            "galorax.galore(..., weight_decay=...)."
        ) from err
