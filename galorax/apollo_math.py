"""APOLLO's per-leaf math (Zhu et al., MLSys 2025), as pure functions of dense arrays.

APOLLO keeps Adam's moments on a *random* rank-``r`` projection ``R`` of each gradient
``G`` (``(*batch, m, n)`` matrices, projected as GaLore's are: :mod:`galorax.galore_math`),
and uses them only to estimate how much Adam would rescale each channel of the gradient:
``s = ||N|| / ||R||`` with ``N = m / (sqrt(v) + eps)`` the normalized low-rank update, per
channel (the side ``R`` keeps) or per matrix (APOLLO-Mini). The update is the raw gradient
times ``s``, its norm's growth limited as in Fira, times ``sqrt(scale)`` and Adam's bias
correction. The order and constants are apollo-torch 1.0.3's (``apollo_torch/apollo.py``).

Example:
    >>> import jax, jax.numpy as jnp
    >>> g = jax.random.normal(jax.random.key(0), (8, 4))
    >>> p = random_projection(jax.random.key(1), (), 4, 2)  # the (n=4, r=2) side
    >>> low = project(g, p, left=False)
    >>> mu, nu = adam_moments(low, jnp.zeros_like(low), jnp.zeros_like(low), 0.9, 0.999)
    >>> s = scaling(mu / (jnp.sqrt(nu) + 1e-6), low, left=False, per_channel=True)
    >>> (g * s).shape, s.shape  # one factor per row: the channels R keeps
    ((8, 4), (8, 1))
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from galorax.galore_math import project, uses_left

__all__ = [
    "adam_moments",
    "bias_correction",
    "channel_squares",
    "limit_growth",
    "project",
    "random_projection",
    "scaling",
    "uses_left",
]


def random_projection(key: jax.Array, batch: tuple[int, ...], rows: int, rank: int) -> jax.Array:
    """A Gaussian projector ``(*batch, rows, rank)`` with entries ``N(0, 1/rank)``
    (apollo-torch's ``stable_randn(...) / sqrt(rank)``), a function of ``key`` alone: it is
    drawn again, never stored.

    Example:
        >>> import jax
        >>> p = random_projection(jax.random.key(0), (3,), 512, 4)
        >>> p.shape, round(float((p**2).mean() * 4), 1)
        ((3, 512, 4), 1.0)
    """
    return jax.random.normal(key, (*batch, rows, rank), jnp.float32) / math.sqrt(rank)


def adam_moments(
    low: jax.Array, mu: jax.Array, nu: jax.Array, b1: float, b2: float
) -> tuple[jax.Array, jax.Array]:
    """Adam's moments of the low-rank gradient (no bias correction: :func:`bias_correction`).

    Example:
        >>> import jax.numpy as jnp
        >>> mu, nu = adam_moments(jnp.ones(2), jnp.zeros(2), jnp.zeros(2), 0.9, 0.999)
        >>> [round(x, 6) for x in mu.tolist()], [round(x, 6) for x in nu.tolist()]
        ([0.1, 0.1], [0.001, 0.001])
    """
    low = low.astype(jnp.float32)
    return b1 * mu + (1 - b1) * low, b2 * nu + (1 - b2) * low * low


def scaling(normalized: jax.Array, low: jax.Array, *, left: bool, per_channel: bool) -> jax.Array:
    """APOLLO's gradient scaling factor ``||N|| / (||R|| + 1e-8)``: per channel (norms over
    the rank axis: one factor per column of a left projection's ``(r, n)``, per row of a
    right one's ``(m, r)``) or per matrix, shaped to broadcast against ``(*batch, m, n)``.

    Example:
        >>> import jax.numpy as jnp
        >>> low = jnp.array([[3.0, 0.0], [4.0, 1.0]])  # (r=2, n=2), left
        >>> scaling(2 * low, low, left=True, per_channel=True).round(4).tolist()
        [[2.0, 2.0]]
    """
    axes: tuple[int, ...] = ((-2,) if left else (-1,)) if per_channel else (-2, -1)
    norm = lambda x: jnp.sqrt(jnp.sum(jnp.square(x), axis=axes, keepdims=True))  # noqa: E731
    return norm(normalized) / (norm(low) + 1e-8)


def channel_squares(g: jax.Array, *, left: bool, per_channel: bool) -> jax.Array:
    """The sums of squares of ``g`` over each channel :func:`scaling` scales, shaped like
    its factor: with them, the norm of ``g * s`` is known without forming it.

    Example:
        >>> import jax.numpy as jnp
        >>> channel_squares(jnp.array([[3.0, 0.0], [4.0, 1.0]]), left=True, per_channel=True)
        Array([[25.,  1.]], dtype=float32)
    """
    axes: tuple[int, ...] = ((-2,) if left else (-1,)) if per_channel else (-2, -1)
    return jnp.sum(jnp.square(g.astype(jnp.float32)), axis=axes, keepdims=True)


def limit_growth(
    s: jax.Array, squares: jax.Array, prev_norm: jax.Array, growth: float
) -> tuple[jax.Array, jax.Array]:
    """Fira's norm-growth limiter, per matrix, on the scale ``s`` of a gradient whose
    :func:`channel_squares` are ``squares``: ``s`` scaled down so the scaled gradient's norm
    is at most ``growth`` times last step's (``prev_norm``; 0: none yet, no limit), and
    that norm after.

    Example:
        >>> import jax.numpy as jnp
        >>> g = jnp.full((2, 2), 3.0)  # its norm is 6
        >>> s, norm = limit_growth(jnp.ones((1, 1)), channel_squares(g, left=True,
        ...     per_channel=False), jnp.asarray(2.0), 1.01)
        >>> round(float(norm), 4), round(float(jnp.linalg.norm(g * s)), 4)
        (2.02, 2.02)
    """
    norm = jnp.sqrt(jnp.sum(jnp.square(s) * squares, axis=(-2, -1)))
    ratio = jnp.where(prev_norm > 0, norm / (prev_norm + 1e-8), 0.0)
    limiter = jnp.maximum(ratio, growth) / growth
    return s / limiter[..., None, None], norm / limiter


def bias_correction(count: jax.Array, b1: float, b2: float) -> jax.Array:
    """Adam's bias correction as one step-size factor, ``sqrt(1 - b2^t) / (1 - b1^t)``
    (apollo-torch's, applied after the scaling and the limiter).

    Example:
        >>> round(float(bias_correction(jnp.asarray(1), 0.9, 0.999)), 4)
        0.3162
    """
    t = count.astype(jnp.float32)
    return jnp.sqrt(1 - jnp.float32(b2) ** t) / (1 - jnp.float32(b1) ** t)
