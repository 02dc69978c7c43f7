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
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import AxisType

Precision = jax.lax.Precision | str | None


def on_several_devices(x: jax.Array) -> bool:
    """Whether ``x`` (an array or a tracer) belongs to a mesh of more than one device."""
    try:
        mesh = jax.typeof(x).sharding.mesh
    except (AttributeError, TypeError):
        return False
    if mesh.empty:
        return False
    # Inside shard_map, manual axes hold whole local blocks: only the others spread x.
    kinds = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    return math.prod(n for a, n in mesh.shape.items() if kinds[a] != AxisType.Manual) > 1


def _mm(a: jax.Array, b: jax.Array, precision: Precision) -> jax.Array:
    return jnp.matmul(a, b, precision=precision)


def _t(a: jax.Array) -> jax.Array:
    return jnp.swapaxes(a, -1, -2)


def _shared_cpu_pool() -> bool:
    """Whether several CPU devices share this process's thread pool (simulated devices)."""
    devices = jax.local_devices()
    return len(devices) > 1 and devices[0].platform == "cpu"


def _per_matrix(fn, *xs: jax.Array):
    """``fn`` (a LAPACK decomposition) of ``(*batch, m, n)`` inputs.

    Batched, except where several CPU devices share one thread pool: there jaxlib's
    batched LAPACK kernels wait, on a pool thread, for batch tasks queued behind the
    other devices' waiting kernels, and every device hangs (jaxlib 0.10, seen with
    ``--xla_force_host_platform_device_count=2`` and a batch of eight 1024x72 QRs).
    There each matrix is factorized on its own, in a loop.
    """
    nb = xs[0].ndim - 2
    if nb == 0 or not _shared_cpu_pool():
        return fn(*xs)
    batch = xs[0].shape[:nb]
    flat = [x.reshape(-1, *x.shape[nb:]) for x in xs]
    out = jax.lax.map(lambda args: fn(*args), flat)
    return jax.tree.map(lambda o: o.reshape(*batch, *o.shape[1:]), out)


QR = Literal["auto", "householder", "gram"]
_QRS = ("auto", "householder", "gram")


def orthonormalize(y: jax.Array, method: QR = "householder", *, precision: Precision = None):
    """Orthonormal basis of the columns of ``y``, ``(*batch, m, k)`` with ``m >= k``.

    Both methods stay orthonormal when ``y`` is rank-deficient (low-rank gradients).

    Args:
        y: The columns to orthonormalize.
        method: ``"householder"``: thin Householder QR (one device: fastest, exact).
            ``"gram"``: four passes of SVQB (Stathopoulos & Wu, 2002), ``y V L^-1/2``
            from the ``eigh`` of the ``k x k`` Gram matrix ``y^T y``. Made of matmuls
            and a small ``eigh``, so a ``y`` sharded along ``m`` stays sharded: devices
            exchange only ``k x k`` partial Grams (Householder QR needs ``y`` whole on
            every device). Directions that the Gram cannot resolve (singular values
            below ~``5e-3`` of the largest in f32, each < 3e-5 of its energy) are
            replaced by fixed random ones, so the result has ``k`` orthonormal columns.
            ``"auto"``: ``"gram"`` when ``y`` lives on a mesh of several devices.
        precision: Matmul precision of the ``"gram"`` passes.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> y = jax.random.normal(jax.random.key(0), (6, 3))
        >>> for method in ("householder", "gram"):
        ...     q = orthonormalize(y, method)
        ...     print(bool(jnp.allclose(q.T @ q, jnp.eye(3), atol=1e-5)))
        True
        True
    """
    if method not in _QRS:
        raise ValueError(f"`method` must be one of {_QRS}, got {method!r}.")
    if method == "auto":
        method = "gram" if on_several_devices(y) else "householder"
    if method == "householder":
        return _per_matrix(lambda x: jnp.linalg.qr(x, mode="reduced")[0], y)
    precision = jax.lax.Precision.HIGHEST if precision is None else precision
    # Scaled to max |y| = 1, so the Gram neither overflows nor underflows.
    peak = jnp.max(jnp.abs(y), axis=(-2, -1), keepdims=True)
    y = y / jnp.where(peak > 0, peak, 1)
    eps = float(jnp.finfo(y.dtype).eps)
    # The Gram resolves eigenvalues down to ~sqrt(m) eps of the largest: the first
    # passes drop what lies below (< 200 eps of the top energy each) and put fresh
    # random directions there; the last two restore orthogonality to rounding level.
    for i, tol in enumerate((200 * eps, 200 * eps, 10 * eps, 10 * eps)):
        y = _svqb(y, _fill(y, i), tol, precision)
    return y


def _fill(y: jax.Array, seed: int) -> jax.Array:
    """Random unit columns shaped like ``y`` (spread out, so f32 Grams of them are exact)."""
    fill = jax.random.normal(jax.random.key(0x6A1 + seed), y.shape, y.dtype)
    return fill / jnp.linalg.norm(fill, axis=-2, keepdims=True)


def _svqb(y: jax.Array, fill: jax.Array, tol: float, precision: Precision) -> jax.Array:
    """One SVQB pass; columns with Gram eigenvalue <= ``tol * max`` become ``fill``."""
    gram = _mm(_t(y), y, precision)
    lam, v = _per_matrix(jnp.linalg.eigh, gram)
    keep = lam > tol * jnp.max(lam, axis=-1, keepdims=True)
    inv = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, lam, 1)), 0)
    q = _mm(y, v, precision) * inv[..., None, :]
    return jnp.where(keep[..., None, :], q, fill)


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
    u, _, vh = _per_matrix(lambda x: jnp.linalg.svd(x, full_matrices=False), a)
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
    qr: QR = "auto",
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
        qr: How the sketches are orthonormalized (see :func:`orthonormalize`):
            ``"auto"`` keeps a sharded gradient sharded.

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
    omega = sketch(key, a, rank, oversample)
    return range_finder(a, omega, rank, warm_start, warm_start_mask, precision, qr, power_iters)


def sketch(key: jax.Array, a: jax.Array, rank: int, oversample: int) -> jax.Array:
    """The Gaussian test matrix ``(*batch, n, k)`` of :func:`randomized_basis` for ``a``."""
    *batch, m, n = a.shape
    k = min(rank + oversample, m, n)
    return jax.random.normal(key, (*batch, n, k), dtype=a.dtype)


def range_finder(
    a: jax.Array,
    omega: jax.Array,
    rank: int,
    warm_start: jax.Array | None,
    warm_start_mask: jax.Array | None,
    precision: Precision,
    qr: QR,
    power_iters: int,
) -> jax.Array:
    """:func:`randomized_basis` from a given sketch ``omega`` (see :func:`sketch`)."""
    if warm_start is not None:
        warm = _mm(_t(a), warm_start, precision)
        if warm_start_mask is not None:
            warm = jnp.where(warm_start_mask[..., None, None], warm, omega[..., :rank])
        omega = omega.at[..., :rank].set(warm)
    q = orthonormalize(_mm(a, omega, precision), qr, precision=precision)
    for _ in range(power_iters):
        z = orthonormalize(_mm(_t(a), q, precision), qr, precision=precision)
        q = orthonormalize(_mm(a, z, precision), qr, precision=precision)
    b = _mm(_t(q), a, precision)
    _, vecs = _per_matrix(jnp.linalg.eigh, _mm(b, _t(b), precision))
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
        qr: Orthonormalization of the sketches (see :func:`orthonormalize`):
            ``"auto"`` (Householder on one device, matmul-only ``"gram"`` on a mesh, so
            sharded gradients are never gathered), ``"householder"`` or ``"gram"``.

    Example:
        >>> Randomized(power_iters=2)
        Randomized(power_iters=2, oversample=8, warm_start=True, seed=0, qr='auto')
    """

    power_iters: int = 1
    oversample: int = 8
    warm_start: bool = True
    seed: int = 0
    qr: QR = "auto"

    def __post_init__(self) -> None:
        for name in ("power_iters", "oversample", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TypeError(f"Randomized.{name} must be a non-negative int, got {value!r}.")
        if self.qr not in _QRS:
            raise ValueError(f"Randomized.qr must be one of {_QRS}, got {self.qr!r}.")
