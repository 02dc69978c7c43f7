"""Residual compensation: the gradient outside the subspace, scaled (after Fira).

GaLore drops ``G - P P^T G``, the part of the gradient outside the projector's span.
Fira (Chen et al., 2024) adds it back, scaled per channel by how much the optimizer
rescaled the in-subspace gradient, ``phi = ||N|| / ||R||`` (``R`` the low-rank gradient,
``N`` the base optimizer's output), and caps the growth of the compensation's norm from
one step to the next at ``limit`` (the norm-growth limiter). The only state is that norm:
one scalar per matrix. The formula: :func:`galorax.galore_math.compensation`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal


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
