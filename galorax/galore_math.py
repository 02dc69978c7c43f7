"""GaLore's per-leaf math, as pure functions of dense arrays.

One projected leaf is a batch of matrices ``g`` of shape ``(*batch, m, n)`` (its
:class:`~galorax.MatrixView`) with a projector ``p`` per matrix: ``(*batch, m, r)`` when
it projects the rows (``left``: the low-rank gradient is ``P^T G``, ``(r, n)``), else
``(*batch, n, r)`` (``G P``, ``(m, r)``). Everything here acts on each matrix on its own,
so it gives the same result for a slice whatever chunk of the stack it is computed in.

The steps of one update, in order: a refresh finds a new basis where a slice is due
(:func:`new_basis`, :func:`align_signs`; slices whose gradient is not :func:`usable` keep
theirs), the moments follow it (:func:`change_of_basis`, :func:`rotate_moment`), the
gradient is projected (:func:`project`), the base optimizer steps on it, and its output
goes back (:func:`project_back`, plus Fira's :func:`compensation` with a residual).

How these run (in chunks of a stack's slices, in place, on quantized storage, over a
mesh, skipped where a step is not finite) is not decided here: :mod:`galorax.projector`,
:mod:`galorax.projector_refresh` and :mod:`galorax.chunking` do that.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from galorax import subspace
from galorax.residual import Residual
from galorax.subspace import Randomized

__all__ = [
    "align_signs",
    "change_of_basis",
    "compensation",
    "new_basis",
    "project",
    "project_back",
    "rotate_moment",
    "usable",
    "uses_left",
]

Precision = jax.lax.Precision | str | None
HIGHEST = jax.lax.Precision.HIGHEST


def _t(a: jax.Array) -> jax.Array:
    return jnp.swapaxes(a, -1, -2)


def uses_left(side: str, m: int, n: int) -> bool:
    """Whether ``side`` puts the projector on the rows (``(m, r)``) of an ``m x n`` matrix.

    Example:
        >>> [uses_left(s, 8, 4) for s in ("auto", "std", "left", "right")]
        [True, False, True, False]
    """
    if side in ("auto", "reverse_std"):  # least state: project the long side
        return m >= n
    if side == "std":  # galore-torch's default: project the short side
        return m < n
    return side == "left"


def project(g: jax.Array, p: jax.Array, *, left: bool, precision: Precision = HIGHEST):
    """The low-rank gradient ``P^T G`` (left) or ``G P``, accumulated in ``p``'s dtype.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> g = jax.random.normal(jax.random.key(0), (2, 5, 3))
        >>> p = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (2, 5, 2)))[0]
        >>> bool(jnp.allclose(project(g, p, left=True), p.mT @ g, atol=1e-5))
        True
    """
    if left:
        return jnp.matmul(_t(p), g, precision=precision, preferred_element_type=p.dtype)
    return jnp.matmul(g, p, precision=precision, preferred_element_type=p.dtype)


def project_back(u: jax.Array, p: jax.Array, *, left: bool, precision: Precision = HIGHEST):
    """A low-rank update ``u`` back to ``(*batch, m, n)``: ``P u`` (left) or ``u P^T``.

    Example:
        >>> import jax.numpy as jnp
        >>> p = jnp.eye(3)[:, :2]
        >>> project_back(jnp.ones((4, 2)), p, left=False).tolist()[0]
        [1.0, 1.0, 0.0]
    """
    if left:
        return jnp.matmul(p, u, precision=precision, preferred_element_type=u.dtype)
    return jnp.matmul(u, _t(p), precision=precision, preferred_element_type=u.dtype)


def usable(g: jax.Array) -> jax.Array:
    """Per matrix, whether a refresh may take its basis from ``g``: all finite and not all
    zero (a zero gradient has no subspace; a NaN one would poison the projector).

    Example:
        >>> import jax.numpy as jnp
        >>> usable(jnp.stack([jnp.ones((2, 2)), jnp.zeros((2, 2)), jnp.full((2, 2), jnp.nan)]))
        Array([ True, False, False], dtype=bool)
    """
    return jnp.all(jnp.isfinite(g), axis=(-2, -1)) & jnp.any(g != 0, axis=(-2, -1))


def new_basis(
    g: jax.Array,
    *,
    rank: int,
    left: bool,
    settings: Randomized | None,
    omega: jax.Array | None = None,
    warm: jax.Array | None = None,
    fresh: jax.Array | None = None,
    precision: Precision = HIGHEST,
) -> jax.Array:
    """An orthonormal basis of ``g``'s top-``rank`` subspace on the projected side, per matrix.

    Args:
        g: The gradients ``(*batch, m, n)``.
        rank: Columns of the basis.
        left: The rows' side (``(*batch, m, rank)``), else the columns' (``(n, rank)``).
        settings: ``None``: an exact thin SVD (the seed's). A :class:`galorax.Randomized`:
            its range finder from the test matrix ``omega``.
        omega: The range finder's test matrix, ``(*batch, rows', k)`` of the projected
            side's transpose (:func:`galorax.subspace.sketch`).
        warm: The previous basis, a warm start where ``settings.warm_start``.
        fresh: Per matrix, whether ``warm`` is a real basis (else a random start).
        precision: Matmul precision of the range finder.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> g = jax.random.normal(jax.random.key(0), (6, 2)) @ jax.random.normal(
        ...     jax.random.key(1), (2, 5))  # rank 2
        >>> p = new_basis(g, rank=2, left=True, settings=None)
        >>> bool(jnp.allclose(p @ (p.T @ g), g, atol=1e-4))  # the subspace holds all of g
        True
    """
    if settings is None:
        return subspace.exact_basis(g, rank, left=left)
    if omega is None:
        raise ValueError("new_basis: a randomized refresh needs its test matrix, omega=.")
    a = g if left else _t(g)
    start = warm if settings.warm_start else None
    return subspace.range_finder(
        a, omega, rank, start, fresh, precision, settings.qr, settings.power_iters
    )


def align_signs(new: jax.Array, old: jax.Array) -> jax.Array:
    """``new`` with each column's sign flipped to agree with ``old``'s column (an SVD picks
    signs at random; a flipped column scrambles the moments kept in its coordinates).

    Example:
        >>> import jax.numpy as jnp
        >>> align_signs(-jnp.eye(3)[:, :2], jnp.eye(3)[:, :2]).tolist()[0]
        [1.0, 0.0]
    """
    signs = jnp.sign(jnp.sum(new * old, axis=-2, keepdims=True))
    return new * jnp.where(signs == 0, 1, signs)


def change_of_basis(new: jax.Array, old: jax.Array) -> jax.Array:
    """``C = new^T old`` per matrix, in f32: coordinates in ``old``'s basis to ``new``'s.

    Example:
        >>> import jax.numpy as jnp
        >>> old = jnp.eye(3)[:, :2]
        >>> change_of_basis(old[:, ::-1], old).tolist()
        [[0.0, 1.0], [1.0, 0.0]]
    """
    a, b = new.astype(jnp.float32), old.astype(jnp.float32)
    return jnp.matmul(_t(a), b, precision=HIGHEST)


def rotate_moment(m: jax.Array, c: jax.Array, *, left: bool, second: bool) -> jax.Array:
    """A low-rank moment carried by the change of basis ``c``: ``C m`` (left: ``(r, n)``
    moments) or ``m C^T``; a second moment by ``C * C`` (its diagonal carried exactly
    when ``C`` permutes or flips the basis).

    Example:
        >>> import jax.numpy as jnp
        >>> swap = jnp.array([[0.0, 1.0], [1.0, 0.0]])
        >>> rotate_moment(jnp.array([[1.0], [2.0]]), swap, left=True, second=True).ravel()
        Array([2., 1.], dtype=float32)
    """
    c = (c * c if second else c).astype(m.dtype)
    if left:
        return jnp.matmul(c, m, precision=HIGHEST)
    return jnp.matmul(m, _t(c), precision=HIGHEST)


def compensation(
    g: jax.Array,
    low: jax.Array,
    low_update: jax.Array,
    p: jax.Array,
    *,
    left: bool,
    prev_norm: jax.Array,
    settings: Residual,
    precision: Precision = HIGHEST,
) -> tuple[jax.Array, jax.Array]:
    """Fira's compensation: the out-of-subspace gradient, scaled and limited, and its norm
    (the next ``prev_norm``).

    Args:
        g: Gradient matrices ``(*batch, m, n)``.
        low: Low-rank gradient ``R``: ``P^T G`` (left) or ``G P`` (right).
        low_update: The base optimizer's output ``N`` for ``R``.
        p: The projector ``P``.
        left: Which side ``P`` projects.
        prev_norm: Last step's compensation norm per matrix (0: none yet, no limit).
        settings: Granularity (``phi = ||N|| / ||R||`` per channel or per matrix) and the
            norm-growth limit.
        precision: Matmul precision.

    Returns:
        ``(term, norm)``: ``term`` has ``g``'s shape, ``||term|| <= limit * prev_norm``
        where ``prev_norm > 0``.

    Example:
        >>> import jax.numpy as jnp
        >>> g = jnp.array([[3.0, 0.0], [0.0, 4.0]])
        >>> p = jnp.array([[1.0], [0.0]])  # keeps row 0
        >>> term, norm = compensation(g, p.T @ g, 2 * (p.T @ g), p, left=True,
        ...                           prev_norm=jnp.zeros(()), settings=Residual("matrix"))
        >>> term  # row 1 of g, scaled by ||N|| / ||R|| = 2
        Array([[0., 0.],
               [0., 8.]], dtype=float32)
    """
    p = p.astype(g.dtype)
    if left:
        inside = jnp.matmul(p, low, precision=precision)
    else:
        inside = jnp.matmul(low, _t(p), precision=precision)
    residual = g - inside
    if settings.granularity == "matrix":
        axes: tuple[int, ...] = (-2, -1)
    else:  # norms over the rank axis: one factor per remaining column (left) or row (right)
        axes = (-2,) if left else (-1,)
    phi = jnp.linalg.norm(low_update, axis=axes, keepdims=True) / (
        jnp.linalg.norm(low, axis=axes, keepdims=True) + 1e-8
    )
    term = phi * residual
    norm = jnp.linalg.norm(term, axis=(-2, -1))
    limit = settings.limit
    growth = jnp.where(prev_norm > 0, jnp.maximum(norm / (prev_norm + 1e-30), limit), limit)
    limiter = growth / limit
    return term / limiter[..., None, None], norm / limiter
