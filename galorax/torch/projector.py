"""Subspace finding for GaLore in PyTorch: exact SVD and a randomized range finder.

A GaLore projector for a 2-D gradient ``G`` (m x n) is an orthonormal basis with ``r``
columns, kept in float32 whatever the parameter's dtype:

* ``side='left'``: ``P`` is m x r (top left singular vectors), the projected gradient is
  ``P.T @ G`` (r x n) and an update ``N`` goes back as ``P @ N``.
* ``side='right'``: ``Q`` is n x r (top right singular vectors, i.e. galore-torch's
  ``Vh[:r].T``), the projected gradient is ``G @ Q`` (m x r) and ``N`` goes back as
  ``N @ Q.T``.

Every function here takes an optional :class:`RowReduce`: when the gradient's rows are
sharded over processes (FSDP2 ``Shard(0)``), the matmuls stay local and only small k x k,
n x k and r x n products are all-reduced. Without one, everything is single-process.

Example:
    >>> import torch
    >>> g = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    >>> p = find_subspace(g, rank=8, side="left", method="randomized", seed=1)
    >>> p.shape, p.dtype
    (torch.Size([64, 8]), torch.float32)
    >>> bool(torch.allclose(p.T @ p, torch.eye(8), atol=1e-5))
    True
    >>> resolve_side((64, 32), "std"), resolve_side((64, 32), "auto")
    ('right', 'left')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from galorax.torch.sketch import gaussian, sketch_seed

__all__ = [
    "PROJ_TYPES",
    "RowReduce",
    "align_signs",
    "find_subspace",
    "fallback_basis",
    "gradient_is_usable",
    "project",
    "project_back",
    "resolve_side",
    "rotate_coordinates",
    "rotation",
    "usable_flag",
]

#: Accepted ``proj_type``/``side`` values. 'std'/'reverse_std'/'left'/'right' are galore-torch's
#: (``'full'``, two-sided, is not supported); 'auto' is galorax's least-state choice.
PROJ_TYPES = ("std", "reverse_std", "left", "right", "auto")


def resolve_side(shape: tuple[int, ...] | torch.Size, proj_type: str) -> str:
    """Which side of an m x n matrix the projector lives on.

    Args:
        shape: the parameter's shape ``(m, n)``.
        proj_type: galore-torch's ``'std'`` (m >= n: right, state m x r; else left),
            ``'reverse_std'`` (the opposite), ``'left'``, ``'right'``, or galorax's ``'auto'``
            (least optimizer state: m >= n: left, moments r x n; the same as ``'reverse_std'``).

    Returns:
        ``'left'`` or ``'right'``.

    Example:
        >>> [resolve_side((8, 4), t) for t in ("std", "reverse_std", "auto", "left")]
        ['right', 'left', 'left', 'left']
        >>> resolve_side((4, 8), "std")
        'left'
    """
    m, n = int(shape[0]), int(shape[1])
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type in ("reverse_std", "auto"):
        return "left" if m >= n else "right"
    if proj_type in ("left", "right"):
        return proj_type
    raise ValueError(f"proj_type/side must be one of {PROJ_TYPES}, got {proj_type!r}")


@dataclass(frozen=True)
class RowReduce:
    """How to sum partial products when the gradient's rows are sharded over processes.

    Attributes:
        group: the process group the rows are sharded over (FSDP2's mesh group).
        rows: the global number of rows ``m``.
        offset: the first global row this process holds.
        local_rows: how many rows this process holds.
    """

    group: object
    rows: int
    offset: int
    local_rows: int

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        t = t.contiguous()
        dist.all_reduce(t, group=self.group)  # type: ignore[arg-type]
        return t


def _sum(reduce: RowReduce | None) -> Callable[[torch.Tensor], torch.Tensor]:
    return reduce if reduce is not None else (lambda t: t)


def project(g: torch.Tensor, basis: torch.Tensor, side: str, reduce: RowReduce | None = None):
    """Project a gradient (local rows if sharded) onto the basis; returns f32.

    With row sharding, a left projection is all-reduced (r x n, the same on every process) and
    a right projection stays local (m_local x r).
    """
    g32 = g.float()
    if side == "left":
        return _sum(reduce)(basis.T @ g32)
    return g32 @ basis


def project_back(n: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """Map a low-rank update back to the parameter's (local) shape, in f32."""
    if side == "left":
        return basis @ n
    return n @ basis.T


def usable_flag(g: torch.Tensor, reduce: RowReduce | None = None) -> torch.Tensor:
    """0-d bool tensor: a refresh may use ``g`` (its squared norm is finite and positive).

    A NaN gradient would give a NaN projector for a whole gap and a zero one an arbitrary
    projector; the optimizers keep the previous projector instead.
    """
    sq = _sum(reduce)(g.float().square().sum().reshape(1))
    return (torch.isfinite(sq) & (sq > 0))[0]


def gradient_is_usable(g: torch.Tensor, reduce: RowReduce | None = None) -> bool:
    """:func:`usable_flag` read on the host (eager refreshes branch on it and retry)."""
    return bool(usable_flag(g, reduce).item())


def _orth(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``x`` (replicated matrix): Householder QR."""
    q, _ = torch.linalg.qr(x, mode="reduced")
    return q


def _orth_rows(y: torch.Tensor, reduce: RowReduce | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormalize ``y`` whose rows may be sharded: returns ``(Q, R)`` with ``y = Q @ R``.

    Unsharded: Householder QR. Sharded: shifted CholeskyQR2 (two CholeskyQR passes; the
    first with a small diagonal shift so a rank-deficient block still factors), which needs
    only all-reduces of k x k Gram matrices.
    """
    if reduce is None:
        q, r = torch.linalg.qr(y, mode="reduced")
        return q, r
    k = y.shape[1]
    eye = torch.eye(k, dtype=y.dtype, device=y.device)
    gram = reduce(y.T @ y)
    shift = 1e-6 * float(gram.diagonal().sum().item()) + 1e-30
    r1 = torch.linalg.cholesky(gram + shift * eye, upper=True)
    q = torch.linalg.solve_triangular(r1, y, upper=True, left=False)
    gram2 = reduce(q.T @ q)
    r2 = torch.linalg.cholesky(gram2 + 1e-12 * eye, upper=True)
    q = torch.linalg.solve_triangular(r2, q, upper=True, left=False)
    return q, r2 @ r1


def _gather_rows(g: torch.Tensor, reduce: RowReduce) -> torch.Tensor:
    """Full matrix from row shards (every process gets it): for the exact SVD only."""
    full = torch.zeros(reduce.rows, g.shape[1], dtype=g.dtype, device=g.device)
    full[reduce.offset : reduce.offset + g.shape[0]] = g
    return reduce(full)


def fallback_basis(
    shape: tuple[int, ...] | torch.Size,
    rank: int,
    side: str,
    reduce: RowReduce | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The orthonormal placeholder ``eye(rows, rank)`` for a refresh with no usable gradient.

    Used at the first step when the gradient is non-finite or all zero (the JAX API's
    placeholder too). Returns this process's rows of a sharded left basis.

    Example:
        >>> fallback_basis((10, 6), 3, "right").shape
        torch.Size([6, 3])
    """
    m, n = int(shape[0]), int(shape[1])
    basis = torch.eye(m if side == "left" else n, rank, dtype=torch.float32, device=device)
    if side == "left" and reduce is not None:
        return basis[reduce.offset : reduce.offset + reduce.local_rows].contiguous()
    return basis


def find_subspace(
    g: torch.Tensor,
    rank: int,
    side: str,
    method: str = "randomized",
    *,
    power_iters: int = 1,
    oversample: int = 8,
    warm: torch.Tensor | None = None,
    seed: int = 0,
    index: int = 0,
    refresh: int = 0,
    reduce: RowReduce | None = None,
) -> torch.Tensor:
    """Top-``rank`` singular subspace of ``g`` on ``side``, as an f32 orthonormal basis.

    Args:
        g: the gradient (m x n), or this process's rows of it when ``reduce`` is given.
        rank: columns of the basis (already clamped to ``min(m, n)``).
        side: ``'left'`` (m x r) or ``'right'`` (n x r).
        method: ``'svd'`` (exact, ``torch.linalg.svd`` of the f32 gradient, the same call and
            so the same signs as galore-torch) or ``'randomized'`` (range finder with
            ``oversample`` extra columns and ``power_iters`` power iterations, each followed
            by re-orthonormalization).
        power_iters: power iterations of the randomized finder.
        oversample: extra sketch columns of the randomized finder.
        warm: the previous basis: the sketch starts from it (one subspace-iteration step
            from the last subspace) instead of from ``rank`` Gaussian columns.
        seed, index, refresh: seed the sketch deterministically per parameter and refresh.
        reduce: the row-sharding all-reduce (FSDP2); ``None`` when the gradient is whole.

    Returns:
        The basis, f32: m x r for ``'left'`` (this process's rows if sharded), n x r for
        ``'right'``.
    """
    g = g.float()
    if method == "svd":
        full = _gather_rows(g, reduce) if reduce is not None else g
        u, _, vh = torch.linalg.svd(full, full_matrices=False)
        if side == "left":
            u = u[:, :rank]
            if reduce is not None:
                u = u[reduce.offset : reduce.offset + g.shape[0]]
            return u.contiguous()
        return vh[:rank].T.contiguous()
    if method != "randomized":
        raise ValueError(f"subspace must be 'svd' or 'randomized', got {method!r}")

    m_global = reduce.rows if reduce is not None else g.shape[0]
    n = g.shape[1]
    k = min(rank + max(oversample, 0), m_global, n)
    total = _sum(reduce)
    gseed = sketch_seed(seed, index, refresh)

    # The sketch always starts in the n-dimensional (column) space, which is replicated
    # across processes, so only G @ X (local) and G.T @ Y (all-reduced) are ever needed.
    if warm is not None and side == "right":
        start = warm
    elif warm is not None:  # left: pull the old left basis into column space
        start = total(g.T @ warm)
    else:
        start = None
    if start is None:
        x = gaussian(n, k, gseed, g.device)
    else:
        extra = k - start.shape[1]
        x = start if extra <= 0 else torch.cat([start, gaussian(n, extra, gseed, g.device)], 1)
    x = _orth(x[:, :k])

    # Left: range of G; right: range of G.T. Alternate G and G.T with re-orthonormalization.
    y, _ = _orth_rows(g @ x, reduce)
    for _ in range(max(power_iters, 0)):
        x = _orth(total(g.T @ y))
        y, _ = _orth_rows(g @ x, reduce)
    if side == "left":
        # B = Y.T @ G (k x n), the same on every process; U = Y @ svd(B).U[:, :r].
        b = total(g.T @ y).T
        ub, _, _ = torch.linalg.svd(b, full_matrices=False)
        return (y @ ub[:, :rank]).contiguous()
    # Right: X spans the row space; W = G @ X = Q_w R, right singular vectors of W = of R.
    x = _orth(total(g.T @ y))
    w = g @ x
    if reduce is None:
        _, _, vwh = torch.linalg.svd(w, full_matrices=False)
    else:
        _, r = _orth_rows(w, reduce)
        _, _, vwh = torch.linalg.svd(r, full_matrices=False)
    return (x @ vwh[:rank].T).contiguous()


def align_signs(
    new: torch.Tensor, old: torch.Tensor, reduce: RowReduce | None = None, side: str = "left"
) -> torch.Tensor:
    """Flip the new basis' columns so each has a non-negative overlap with the old one's.

    An SVD returns each singular vector up to sign; without this, a refresh that keeps the
    subspace can still negate moment columns.

    Example:
        >>> old = torch.eye(4)[:, :2]
        >>> align_signs(-old, old).equal(old)
        True
    """
    c = old.T @ new
    if side == "left" and reduce is not None:
        c = reduce(c)
    signs = torch.where(c.diagonal() < 0, -1.0, 1.0).to(new.dtype)
    return new * signs


def rotation(
    new: torch.Tensor, old: torch.Tensor, reduce: RowReduce | None = None, side: str = "left"
) -> torch.Tensor:
    """``C = new.T @ old`` (r x r): coordinates in the old basis -> coordinates in the new.

    Example:
        >>> b = torch.eye(3)[:, :2]
        >>> rotation(b, b).equal(torch.eye(2))
        True
    """
    c = new.T @ old
    if side == "left" and reduce is not None:
        c = reduce(c)
    return c


def rotate_coordinates(t: torch.Tensor, c: torch.Tensor, side: str) -> torch.Tensor:
    """Coordinates in the old basis -> the new one: left (r x n): C @ t; right (m x r): t @ C.T.

    Example:
        >>> flip = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
        >>> rotate_coordinates(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), flip, "right")
        tensor([[2., 1.],
                [4., 3.]])
    """
    return c @ t if side == "left" else t @ c.T
