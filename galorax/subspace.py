"""How a subspace is found: exact thin SVD or a randomized range finder.

Every function here works on a batch of matrices ``a`` of shape ``(*batch, m, n)`` and
returns an orthonormal basis ``(*batch, m, r)`` of (an approximation of) the span of
``a``'s top-``r`` left singular vectors. Right projectors are left projectors of the
transposed matrix.

The randomized finder (Halko, Martinsson & Tropp, 2011) uses only matrix products, a
thin QR and an ``eigh`` of a ``k x k`` matrix (``k = r + oversample``). That is the
cost that matters: on a 2-core CPU a 2048x2048 exact SVD takes over a second, the
randomized finder tens of milliseconds (``BENCHMARKS.md``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Precision = jax.lax.Precision | str | None


def _mm(a: jax.Array, b: jax.Array, precision: Precision) -> jax.Array:
    return jnp.matmul(a, b, precision=precision)


def _t(a: jax.Array) -> jax.Array:
    return jnp.swapaxes(a, -1, -2)


def orthonormalize(y: jax.Array) -> jax.Array:
    """Orthonormal basis of the columns of ``y`` (thin Householder QR).

    Householder QR stays orthonormal even when ``y`` is rank-deficient, which happens
    with low-rank gradients; Cholesky-based QR does not.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> q = orthonormalize(jax.random.normal(jax.random.key(0), (6, 3)))
        >>> bool(jnp.allclose(q.T @ q, jnp.eye(3), atol=1e-5))
        True
    """
    q, _ = jnp.linalg.qr(y, mode="reduced")
    return q


def exact_basis(a: jax.Array, rank: int, *, left: bool = True) -> jax.Array:
    """Top-``rank`` left (or right) singular vectors of ``a`` by thin SVD (the seed's method).

    ``left=False`` returns the right singular vectors ``(*batch, n, rank)`` of the same
    factorization (not of ``a``'s transpose), so the signs match ``optax.contrib.galore``.

    Example:
        >>> import jax.numpy as jnp
        >>> jnp.abs(exact_basis(jnp.diag(jnp.array([1.0, 3.0, 2.0])), 2))
        Array([[0., 0.],
               [1., 0.],
               [0., 1.]], dtype=float32)
    """
    u, _, vh = jnp.linalg.svd(a, full_matrices=False)
    return u[..., :rank] if left else _t(vh[..., :rank, :])


def randomized_basis(
    a: jax.Array,
    rank: int,
    key: jax.Array,
    *,
    oversample: int = 8,
    power_iters: int = 1,
    warm_start: jax.Array | None = None,
    warm_start_mask: jax.Array | None = None,
    precision: Precision = jax.lax.Precision.HIGHEST,
) -> jax.Array:
    """Top-``rank`` left singular subspace of ``a`` by a randomized range finder.

    A Gaussian sketch with ``oversample`` extra columns, ``power_iters`` rounds of
    subspace iteration (re-orthonormalized each half step, so f32 keeps the small
    directions), then the exact top-``rank`` rotation inside the sketch from the
    eigenvectors of the small ``k x k`` Gram matrix ``B B^T`` with ``B = Q^T a``.

    Args:
        a: ``(*batch, m, n)`` matrices.
        rank: Columns of the result; at most ``min(m, n)``.
        key: PRNG key of the Gaussian sketch (the result is a deterministic function of
            it).
        oversample: Extra sketch columns; more capture more energy on flat spectra.
        power_iters: Subspace-iteration rounds; each costs two products with ``a``.
        warm_start: Optional previous basis ``(*batch, m, rank)``: its image ``a^T P``
            replaces ``rank`` of the sketch's random columns, one subspace-iteration step
            from where the last refresh ended.
        warm_start_mask: Optional batch-shaped booleans: slices where it is False keep
            a fully random sketch (their ``warm_start`` is only a placeholder).
        precision: Matmul precision.

    Returns:
        ``(*batch, m, rank)`` with orthonormal columns.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> a = jax.random.normal(jax.random.key(1), (64, 8)) @ jax.random.normal(
        ...     jax.random.key(2), (8, 32))  # rank 8
        >>> p = randomized_basis(a, 8, jax.random.key(0))
        >>> float(jnp.linalg.norm(p @ (p.T @ a) - a) / jnp.linalg.norm(a)) < 1e-4
        True
    """
    *batch, m, n = a.shape
    k = min(rank + oversample, m, n)
    omega = jax.random.normal(key, (*batch, n, k), dtype=a.dtype)
    if warm_start is not None:
        warm = _mm(_t(a), warm_start, precision)
        if warm_start_mask is not None:
            warm = jnp.where(warm_start_mask[..., None, None], warm, omega[..., :rank])
        omega = omega.at[..., :rank].set(warm)
    q = orthonormalize(_mm(a, omega, precision))
    for _ in range(power_iters):
        z = orthonormalize(_mm(_t(a), q, precision))
        q = orthonormalize(_mm(a, z, precision))
    b = _mm(_t(q), a, precision)
    _, vecs = jnp.linalg.eigh(_mm(b, _t(b), precision))
    top = vecs[..., ::-1][..., :rank]  # eigh sorts ascending
    return _mm(q, top, precision)


def captured_energy(a: jax.Array, basis: jax.Array) -> jax.Array:
    """Fraction of ``a``'s squared Frobenius norm inside ``span(basis)``, per matrix.

    Example:
        >>> import jax.numpy as jnp
        >>> round(float(captured_energy(jnp.diag(jnp.array([3.0, 4.0])), jnp.eye(2)[:, 1:])), 4)
        0.64
    """
    inside = jnp.matmul(_t(basis), a, precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(inside**2, axis=(-2, -1)) / jnp.sum(a**2, axis=(-2, -1))


@dataclasses.dataclass(frozen=True)
class Randomized:
    """Settings of the randomized refresh: ``subspace=Randomized(...)``.

    A frozen dataclass, not loose ints, so ``optax.inject_hyperparams`` leaves these
    structural settings static.

    Attributes:
        power_iters: Subspace-iteration rounds (each costs two products with the
            gradient); 1 captures >= 99.9% of the exact top-r energy on decaying spectra.
        oversample: Extra sketch columns.
        warm_start: Start from the previous projector's image (one subspace-iteration
            step from where the last refresh ended).
        seed: Seeds the Gaussian sketches: a projector is a pure function of the seed,
            the leaf's position and the step.

    Example:
        >>> Randomized(power_iters=2)
        Randomized(power_iters=2, oversample=8, warm_start=True, seed=0)
    """

    power_iters: int = 1
    oversample: int = 8
    warm_start: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("power_iters", "oversample", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TypeError(f"Randomized.{name} must be a non-negative int, got {value!r}.")
