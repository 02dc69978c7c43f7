"""When projectors refresh: fixed gaps, staggered slots, retries and adaptive gaps."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class RefreshSchedule(NamedTuple):
    """When each slice of a projected leaf refreshes its projector.

    Every field has the leaf's batch shape (``()`` for a plain matrix).

    Attributes:
        next_step: The step at or after which the next refresh is due. A refresh that
            finds a zero or non-finite gradient leaves it as is, so it is retried at the
            next step.
        gap: Steps between refreshes (grows under :class:`AdaptiveRefresh`).
        refreshes: How many refreshes have been accepted.
    """

    next_step: jax.Array
    gap: jax.Array
    refreshes: jax.Array


@dataclasses.dataclass(frozen=True)
class AdaptiveRefresh:
    """Lengthen a slice's gap while its subspace is stable (after Q-GaLore).

    At each refresh the overlap ``||P_new^T P_old||_F^2 / r`` (1: same subspace, about
    ``r / m`` for unrelated ones) is measured per slice. At or above ``threshold`` the
    slice's gap is multiplied by ``growth`` up to ``max_factor`` times
    ``update_proj_gap``; below, it falls back to ``update_proj_gap``.

    Attributes:
        threshold: Overlap counted as stable.
        growth: Gap multiplier after a stable refresh.
        max_factor: Largest gap, as a multiple of ``update_proj_gap``.

    Example:
        >>> AdaptiveRefresh()
        AdaptiveRefresh(threshold=0.9, growth=2, max_factor=8)
    """

    threshold: float = 0.9
    growth: int = 2
    max_factor: int = 8

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"AdaptiveRefresh.threshold must be in (0, 1], got {self.threshold}.")
        for name in ("growth", "max_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TypeError(f"AdaptiveRefresh.{name} must be an int >= 1, got {value!r}.")


def subspace_overlap(new: jax.Array, old: jax.Array) -> jax.Array:
    """``||new^T old||_F^2 / r`` per matrix: 1 when both orthonormal bases span the same
    subspace, 0 when orthogonal.

    Example:
        >>> import jax.numpy as jnp
        >>> float(subspace_overlap(jnp.eye(4)[:, :2], jnp.eye(4)[:, 1:3]))
        0.5
    """
    c = jnp.matmul(jnp.swapaxes(new, -1, -2), old, precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(c * c, axis=(-2, -1)) / new.shape[-1]


def advance(
    sched: RefreshSchedule,
    accept: jax.Array,
    count: Any,
    offset: int,
    base_gap: int,
    overlap: jax.Array | None = None,
    adaptive: AdaptiveRefresh | None = None,
) -> RefreshSchedule:
    """The schedule after a refresh attempt at step ``count``.

    Accepted slices move to their next slot ``offset + k * gap`` after ``count`` (so
    staggered leaves stay in their slots, even after a retry); rejected ones keep their
    ``next_step`` and retry at the next step.

    Example:
        >>> import jax.numpy as jnp
        >>> s = RefreshSchedule(jnp.zeros(2, jnp.int32), jnp.full(2, 10), jnp.zeros(2, jnp.int32))
        >>> advance(s, jnp.array([True, False]), 0, offset=5, base_gap=10).next_step
        Array([5, 0], dtype=int32)
    """
    gap = sched.gap
    if adaptive is not None and overlap is not None:
        stable = (overlap >= adaptive.threshold) & (sched.refreshes > 0)
        grown = jnp.minimum(gap * adaptive.growth, base_gap * adaptive.max_factor)
        gap = jnp.where(accept, jnp.where(stable, grown, base_gap), gap).astype(sched.gap.dtype)
    next_step = offset + ((count - offset) // gap + 1) * gap
    return RefreshSchedule(
        next_step=jnp.where(accept, next_step, sched.next_step).astype(sched.next_step.dtype),
        gap=gap,
        refreshes=sched.refreshes + accept.astype(sched.refreshes.dtype),
    )


def count_refreshes(state: Any) -> int:
    """Projector refreshes done so far, summed over every slice of every projected leaf.

    Finds the :class:`RefreshSchedule` nodes anywhere in an optimizer state (chains and
    wrappers included); the initial projectors, computed at the first step, count too.

    Example:
        >>> import jax, jax.numpy as jnp, galorax
        >>> params = {"w": jnp.ones((3, 8, 4))}  # 3 slices along a batch axis
        >>> dn = {"w": galorax.GaLoreDimensionNumbers(reduction_axis=1, output_axis=2)}
        >>> tx = galorax.galore(0.1, rank=2, update_proj_gap=2, weight_dimension_numbers=dn)
        >>> state, update = tx.init(params), jax.jit(tx.update)
        >>> for _ in range(3):
        ...     _, state = update(params, state, params)
        >>> count_refreshes(state)  # each slice: at its first step and one gap later
        6
    """
    scheds = [
        x
        for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, RefreshSchedule))
        if isinstance(x, RefreshSchedule)
    ]
    return int(sum(int(jnp.sum(s.refreshes)) for s in scheds))
