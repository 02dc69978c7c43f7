"""Residual compensation: the gradient outside the subspace, scaled (after Fira).

GaLore drops ``G - P P^T G``, the part of the gradient outside the projector's span.
Fira (Chen et al., 2024) adds it back, scaled per channel by how much the optimizer
rescaled the in-subspace gradient, ``phi = ||N|| / ||R||`` (``R`` the low-rank gradient,
``N`` the base optimizer's output), and caps the growth of the compensation's norm from
one step to the next at ``limit`` (the norm-growth limiter). The only state is that norm:
one scalar per matrix.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Residual:
    """Settings of residual compensation: ``galore(..., residual=Residual())``.

    Attributes:
        granularity: ``"channel"``: one scaling factor per column of the low-rank
            gradient (per row for right projectors), as Fira; ``"matrix"``: one per
            matrix.
        limit: Largest allowed growth of the compensation's norm per step (Fira's
            gamma = 1.01).

    Example:
        >>> Residual()
        Residual(granularity='channel', limit=1.01)
    """

    granularity: Literal["channel", "matrix"] = "channel"
    limit: float = 1.01

    def __post_init__(self) -> None:
        if self.granularity not in ("channel", "matrix"):
            raise ValueError(
                f"Residual.granularity must be 'channel' or 'matrix', got {self.granularity!r}."
            )
        if not self.limit >= 1.0:
            raise ValueError(f"Residual.limit must be >= 1, got {self.limit!r}.")


def compensation(
    g2: jax.Array,
    low: jax.Array,
    low_update: jax.Array,
    projector: jax.Array,
    left: bool,
    prev_norm: jax.Array,
    settings: Residual,
    precision: jax.lax.Precision | str | None = jax.lax.Precision.HIGHEST,
) -> tuple[jax.Array, jax.Array]:
    """The scaled, limited out-of-subspace gradient and its norm (the next ``prev_norm``).

    Args:
        g2: Gradient matrices ``(*batch, m, n)``.
        low: Low-rank gradient ``R``: ``P^T G`` (left) or ``G P`` (right).
        low_update: The base optimizer's output ``N`` for ``R``.
        projector: ``P``, ``(*batch, m, r)`` (left) or ``(*batch, n, r)`` (right).
        left: Which side ``P`` projects.
        prev_norm: Last step's compensation norm per matrix (0: none yet, no limit).
        settings: Granularity and growth limit.
        precision: Matmul precision.

    Returns:
        ``(term, norm)``: ``term`` has ``g2``'s shape, ``||term|| <= limit * prev_norm``
        where ``prev_norm > 0``.

    Example:
        >>> import jax.numpy as jnp
        >>> g = jnp.array([[3.0, 0.0], [0.0, 4.0]])
        >>> p = jnp.array([[1.0], [0.0]])  # keeps row 0
        >>> term, norm = compensation(g, p.T @ g, 2 * (p.T @ g), p, True, jnp.zeros(()),
        ...                           Residual("matrix"))
        >>> term  # row 1 of g, scaled by ||N|| / ||R|| = 2
        Array([[0., 0.],
               [0., 8.]], dtype=float32)
    """
    pt = jnp.swapaxes(projector, -1, -2).astype(g2.dtype)
    inside = (
        jnp.matmul(projector.astype(g2.dtype), low, precision=precision)
        if left
        else jnp.matmul(low, pt, precision=precision)
    )
    residual = g2 - inside
    if settings.granularity == "matrix":
        axes: tuple[int, ...] = (-2, -1)
    else:  # norms over the rank axis: one factor per remaining column (left) or row (right)
        axes = (-2,) if left else (-1,)
    phi = jnp.linalg.norm(low_update, axis=axes, keepdims=True) / (
        jnp.linalg.norm(low, axis=axes, keepdims=True) + 1e-8
    )
    term = phi * residual
    norm = jnp.linalg.norm(term, axis=(-2, -1))
    limiter = (
        jnp.where(
            prev_norm > 0, jnp.maximum(norm / (prev_norm + 1e-30), settings.limit), settings.limit
        )
        / settings.limit
    )
    return term / limiter[..., None, None], norm / limiter
