"""GaLore's projectors: one :class:`LeafProjector` per projected leaf, and their storage.

A :class:`LeafProjector` holds the static facts of one projected leaf (its matrix view,
side, rank, stagger slot) and the math on it: its initial state (:meth:`LeafProjector.init`),
the projection (:meth:`~LeafProjector.project`), the refresh (:meth:`~LeafProjector.refresh`)
and the way back (:meth:`~LeafProjector.project_back`). :func:`make_projectors` builds the
tree of them (None where a leaf is not projected) that the transform maps over.

:func:`quantize_projector` / :func:`projector_error`: opt-in int8 / int4 storage of GaLore
projectors (``projector_bits``), and the error measurements that decide whether it pays. A
refresh quantizes the new basis; every use (projection, back-projection, warm start, sign
alignment, moment rotation, residual, subspace overlap) dequantizes it first. Projector
bytes: 1.016 (8) or 0.516 (4) per value instead of 4. Measured on the ``tiny`` model
(``BENCHMARKS.md``): ``||Q - P|| / ||P||`` 0.85% (8) / 15% (4), error of the back-projected
gradient 1.0% / 18%; validation loss after 400 steps (2 refreshes) within 0.003 of float32
(8) and 0.01 below it (4).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from galorax import chunking, placement, subspace
from galorax.chunking import map_slices
from galorax.dimension_numbers import (
    GaLoreDimNumsOrFn,
    MatrixView,
    is_masked,
    resolve_dimension_numbers,
)
from galorax.options import GaLoreOptions
from galorax.quantization.blockwise import dequantize_blockwise, is_quantized
from galorax.quantization.projectors import (
    PROJECTOR_GROUP,
    ProjectorError,
    projector_error,
    quantize_projector,
    quantize_slices,
    select_slices,
)
from galorax.residual import compensation
from galorax.schedule import RefreshSchedule, advance, subspace_overlap

__all__ = [
    "PROJECTOR_GROUP",
    "LeafProjector",
    "ProjectorError",
    "make_projectors",
    "projector_error",
    "quantize_projector",
    "quantize_slices",
    "select_slices",
]


def quantized_spec(x: jax.Array, proj_spec: Any, n_batch: int, param: Any) -> Any:
    """Spec of a quantized projector's codes or scales under explicit sharding.

    Arrays shaped ``(*batch, rows, k)`` (8-bit codes) take the projector's spec; arrays
    shaped ``(*batch, k)``, whose last axis runs over ``(rows, r)`` row-major (4-bit codes,
    group scales), are split over it like the rows when it divides evenly: what sharding
    propagation gives the refresh's output, so the update's outputs match its inputs.
    """
    if proj_spec is None:
        return None
    entries = tuple(proj_spec) + (None,) * (n_batch + 2 - len(proj_spec))
    if x.ndim == n_batch + 2:
        return proj_spec
    rows = entries[n_batch]
    names = rows if isinstance(rows, tuple) else () if rows is None else (rows,)
    mesh = placement.explicit_mesh(param)
    if (
        mesh is None
        or x.ndim != n_batch + 1
        or x.shape[-1] % math.prod(mesh.shape[a] for a in names)
    ):
        rows = None
    return PartitionSpec(*entries[:n_batch], rows)


def dense(p: Any, dtype: Any) -> jax.Array:
    """A stored projector as a ``dtype`` array (dequantized with ``projector_bits``).

    Example:
        >>> import jax.numpy as jnp
        >>> dense(jnp.eye(2, dtype=jnp.bfloat16), jnp.float32).dtype
        dtype('float32')
    """
    return dequantize_blockwise(p, dtype) if is_quantized(p) else p.astype(dtype)


def compute_dtype(dtype: Any) -> Any:
    """Projections and low-rank moments run in at least f32 (bf16 moments stall)."""
    return jnp.promote_types(dtype, jnp.float32)


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


@dataclasses.dataclass(frozen=True)
class LeafProjector:
    """One projected leaf: its static facts and GaLore's math on it.

    Attributes:
        view: The leaf seen as a batch of ``(m, n)`` matrices.
        left: The projector spans the rows side: the low-rank gradient is ``P^T G``,
            ``(r, n)``; else ``G P``, ``(m, r)``.
        rank: ``r``, the requested rank clipped to ``min(m, n)``.
        offset: First step of its stagger slot.
        index: Position among the projected leaves (seeds its sketches).
        options: The transform's options.

    Example:
        >>> import jax.numpy as jnp
        >>> from galorax.dimension_numbers import GaLoreDimensionNumbers
        >>> from galorax.options import galore_options
        >>> view = MatrixView.of((8, 4), GaLoreDimensionNumbers())
        >>> leaf = LeafProjector(view, True, 2, 0, 0, galore_options(rank=2))
        >>> p, proxy, schedule, norm = leaf.init(jnp.zeros((8, 4)))
        >>> p.shape, proxy.shape, leaf.project(jnp.ones((8, 4)), p).shape
        ((8, 2), (2, 4), (2, 4))
    """

    view: MatrixView
    left: bool
    rank: int
    offset: int
    index: int
    options: GaLoreOptions

    @property
    def proj_shape(self) -> tuple[int, ...]:
        rows = self.view.m if self.left else self.view.n
        return (*self.view.batch_shape, rows, self.rank)

    @property
    def low_shape(self) -> tuple[int, ...]:
        v = self.view
        return (*v.batch_shape, self.rank, v.n) if self.left else (*v.batch_shape, v.m, self.rank)

    def init(self, param: Any) -> tuple[Any, jax.Array, RefreshSchedule, jax.Array]:
        """The leaf's initial projector, low-rank proxy (for the base optimizer's init),
        schedule and residual norm. Under explicit sharding each is born placed like
        ``param`` (so the update's output shardings equal its input's: no recompilation)."""
        opts = self.options
        specs = placement.galore_leaf_specs(param, self.view, self.left) or {}

        def put(x: jax.Array, kind: str) -> jax.Array:
            return placement.place(x, param, specs.get(kind))

        # An orthonormal placeholder, kept if the first gradient is unusable.
        rows, r = self.proj_shape[-2:]
        eye = jnp.broadcast_to(jnp.eye(rows, r, dtype=opts.projector_dtype), self.proj_shape)
        if opts.projector_bits is None:
            projector: Any = put(eye, "projector")
        else:  # quantized eye: exact (levels 0 and 1), so still orthonormal
            nb, spec = len(self.view.batch_shape), specs.get("projector")
            projector = jax.tree.map(
                lambda x: placement.place(x, param, quantized_spec(x, spec, nb, param)),
                quantize_slices(eye, opts.projector_bits),
            )
        proxy = put(jnp.zeros(self.low_shape, compute_dtype(param.dtype)), "low")
        batch = self.view.batch_shape
        schedule = RefreshSchedule(
            next_step=put(jnp.zeros(batch, jnp.int32), "batch"),
            gap=put(jnp.full(batch, opts.update_proj_gap, jnp.int32), "batch"),
            refreshes=put(jnp.zeros(batch, jnp.int32), "batch"),
        )
        return projector, proxy, schedule, put(jnp.zeros(batch, jnp.float32), "batch")

    def project(self, g2: jax.Array, p: jax.Array) -> jax.Array:
        """The low-rank gradient of ``g2`` (``(*batch, m, n)``, any float dtype) for the
        dense projector ``p``, accumulated in ``p``'s dtype (f32)."""
        prec, acc = self.options.precision, p.dtype
        if self.left:
            return jnp.matmul(
                jnp.swapaxes(p, -1, -2), g2, precision=prec, preferred_element_type=acc
            )
        return jnp.matmul(g2, p, precision=prec, preferred_element_type=acc)

    def project_back(self, u: jax.Array, p: jax.Array) -> jax.Array:
        """A low-rank update ``u`` back to ``(*batch, m, n)`` through the dense ``p``."""
        prec, acc = self.options.precision, u.dtype
        if self.left:
            return jnp.matmul(p, u, precision=prec, preferred_element_type=acc)
        return jnp.matmul(u, jnp.swapaxes(p, -1, -2), precision=prec, preferred_element_type=acc)

    def chunk_bytes(self, dtype: Any) -> int:
        """Bytes of one matrix in f32 (:func:`galorax.chunking.map_slices`'s unit) where a
        stacked leaf of ``dtype`` gradients pays for chunking, else 0 (whole: float32
        gradients without residual need no full-size temporary beyond the update)."""
        pays = compute_dtype(dtype) != dtype or self.options.residual is not None
        return 4 * self.view.m * self.view.n if pays and chunking.CHUNK_GALORE else 0

    def step(self, g: jax.Array, old: Any, sched: RefreshSchedule, count: Any):
        """Refreshes the projector when a slice is due and projects the gradient ``g``.

        Returns ``(low-rank gradient, projector, schedule, changed, carry)``: ``changed``
        whether any slice got a new projector, ``carry`` what :meth:`finish` reuses. The
        projection runs a chunk of a stacked leaf's slices at a time, so a low-precision
        gradient is upcast a chunk at a time, never whole.
        """
        g2 = self.view.to_matrix(g)
        if not self.chunk_bytes(g.dtype):  # whole: one f32 copy for refresh and projection
            g2 = g2.astype(compute_dtype(g.dtype))
        new, sched, changed = jax.lax.cond(
            jnp.any(count >= sched.next_step),
            lambda: self.refresh(g2, old, sched, count),
            lambda: (old, sched, jnp.zeros((), bool)),
        )
        p = dense(new, compute_dtype(g.dtype))
        nb, size = len(self.view.batch_shape), self.chunk_bytes(g.dtype)
        low = jnp.zeros(self.low_shape, p.dtype)
        low = map_slices(lambda _, r: self.project(*r), low, (g2, p), nb, size)
        return low, new, sched, changed, (g2, low, new, p)

    def finish(self, g: jax.Array, carry: Any, u: jax.Array, norm: Any) -> tuple[jax.Array, Any]:
        """The update in ``g``'s shape and dtype from the base optimizer's output ``u``
        (scaled, plus the residual with ``residual``), and the new residual norm; a chunk
        of a stacked leaf's slices at a time, cast to ``g``'s dtype and written over the
        gradient's buffer (no second full-size buffer)."""
        g2, low, new, pd = carry
        opts = self.options
        p = (pd if is_quantized(new) else new).astype(u.dtype)

        def back(bufs: tuple[jax.Array, Any], reads: tuple[jax.Array, ...]):
            (g2, norm), (low, u, p) = bufs, reads
            full = self.project_back(u, p)
            if opts.residual is not None:
                g2 = g2.astype(compute_dtype(g2.dtype))
                term, norm = compensation(
                    g2, low, u, p, self.left, norm, opts.residual, opts.precision
                )
                full = full + term
            return (opts.scale * full).astype(g.dtype), norm

        with_norm = opts.residual is not None
        norm_in = norm if with_norm else jnp.zeros(self.view.batch_shape)
        nb, size = len(self.view.batch_shape), self.chunk_bytes(g.dtype)
        full, new_norm = map_slices(back, (g2, norm_in), (low, u, p), nb, size)
        return self.view.from_matrix(full), new_norm if with_norm else norm

    def sketch(self, shape: tuple[int, ...], count: Any) -> jax.Array | None:
        """The range finder's random test matrix for gradients ``shape`` (None: SVD): one
        matrix that every slice of a stacked leaf shares, so a chunk of the slices, or one
        layer updated on its own (:mod:`galorax.layer_updates`), draws the same one."""
        rf = self.options.subspace
        if rf is None:
            return None
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(rf.seed), self.index), count)
        m, n = shape[-2:]
        a = jax.ShapeDtypeStruct((m, n) if self.left else (n, m), jnp.float32)
        return subspace.sketch(key, a, self.rank, rf.oversample)  # type: ignore[arg-type]

    def candidate(self, g2: jax.Array, old_c: jax.Array, omega: Any, fresh: jax.Array):
        """A new basis for every slice of ``g2`` (``old_c``: the old one, dense), and
        whether its slices were split over ``refresh_axes``."""
        opts, rf = self.options, self.options.subspace
        nb = len(self.view.batch_shape)
        factorize: Callable[..., jax.Array]
        if rf is None:
            # On a mesh the SVD needs each matrix whole: gathered (with a warning).
            factorize = lambda a: subspace.exact_basis(a, self.rank, left=self.left)  # noqa: E731
            inputs: tuple[Any, ...] = (placement.whole_for_svd(g2),)
        else:
            a = g2 if self.left else jnp.swapaxes(g2, -1, -2)

            def factorize(a, omega, old_c, fresh):
                warm = old_c if rf.warm_start else None
                return subspace.range_finder(
                    a, omega, self.rank, warm, fresh, opts.precision, rf.qr, rf.power_iters
                )

            inputs = (a, omega.astype(a.dtype), old_c, fresh)
        # Replicated stacked weights: each device factorizes its share of the slices.
        return placement.spread_map(factorize, opts.refresh_axes, nb, *inputs)

    def attempt(self, g2: jax.Array, old: Any, due: jax.Array, omega: Any, fresh: jax.Array):
        """``(new projector, accepted, overlap, split)`` of a refresh of the slices of
        ``g2`` (any float dtype; a chunk or the whole stack). Slices whose gradient is zero
        or non-finite, or not ``due``, keep their projector."""
        opts = self.options
        g2 = g2.astype(compute_dtype(g2.dtype))
        valid = jnp.all(jnp.isfinite(g2), axis=(-2, -1)) & jnp.any(g2 != 0, axis=(-2, -1))
        # A bad slice must not poison the batched factorization of the good ones.
        g2 = jnp.where(valid[..., None, None], g2, 0)
        old_c = dense(old, g2.dtype)
        cand, split = self.candidate(g2, old_c, omega, fresh)
        if opts.moments != "keep":  # an SVD picks signs at random: match the old ones
            signs = jnp.sign(jnp.sum(cand * old_c, axis=-2, keepdims=True))
            cand = cand * jnp.where(signs == 0, 1, signs)
        overlap = subspace_overlap(cand, old_c) if opts.adaptive is not None else None
        accept = due & valid
        if is_quantized(old):
            new = select_slices(
                accept, quantize_slices(cand.astype(opts.projector_dtype), old.bits), old
            )
        else:
            new = jnp.where(accept[..., None, None], cand.astype(old.dtype), old)
        return new, accept, overlap, split

    def refresh(self, g2: jax.Array, old: Any, sched: RefreshSchedule, count: Any):
        """New projectors for the due slices (stored like ``old``), the schedule after the
        attempt, and whether any slice changed; a chunk of a stacked leaf's slices at a
        time off a mesh when :meth:`chunk_bytes` says it pays. Slices whose gradient is zero
        or non-finite keep their projector and retry at the next step."""
        opts, nb = self.options, len(self.view.batch_shape)
        due, fresh = count >= sched.next_step, sched.refreshes > 0
        omega = self.sketch(g2.shape, count)
        size = 0 if placement.on_several_devices(g2) else self.chunk_bytes(g2.dtype)
        split_seen: list[bool] = []

        def body(bufs: Any, reads: Any) -> Any:
            (parts, _, _), (g2, due, fresh) = bufs, reads
            # The shared test matrix, as each slice's (a chunk's batch axes are flat).
            omega_c = (
                None if omega is None else jnp.broadcast_to(omega, (*g2.shape[:-2], *omega.shape))
            )
            old_c: Any = parts
            if is_quantized(old):
                shape = (*parts[0].shape[: parts[0].ndim - old.codes.ndim + nb], *old.shape[nb:])
                old_c = dataclasses.replace(old, codes=parts[0], scales=parts[1], shape=shape)
            new, accept, overlap, split = self.attempt(g2, old_c, due, omega_c, fresh)
            split_seen.append(split)
            parts = (new.codes, new.scales) if is_quantized(new) else new
            return parts, accept, jnp.zeros(accept.shape) if overlap is None else overlap

        parts = (old.codes, old.scales) if is_quantized(old) else old
        bufs = (parts, jnp.zeros(due.shape, bool), jnp.zeros(due.shape))
        reads = (g2, due, fresh)
        parts, accept, overlap = map_slices(body, bufs, reads, nb, size)
        new = parts
        if is_quantized(old):
            new = dataclasses.replace(old, codes=parts[0], scales=parts[1])
        overlap = overlap if opts.adaptive is not None else None
        sched = advance(
            sched, accept, count, self.offset, opts.update_proj_gap, overlap, opts.adaptive
        )
        if any(split_seen):  # the new state whole again, placed like the old (no recompilation)
            new, sched = jax.tree.map(lambda x: placement.whole_slices(x, nb), (new, sched))
        return new, sched, jnp.any(accept)


def is_projector_leaf(x: Any) -> bool:
    """Leaves of a :func:`make_projectors` tree: a :class:`LeafProjector` or None."""
    return x is None or isinstance(x, LeafProjector)


def make_projectors(
    params: Any, weight_dimension_numbers: GaLoreDimNumsOrFn | None, options: GaLoreOptions
) -> Any:
    """A tree like ``params`` with a :class:`LeafProjector` per projected leaf, else None.

    ``optax.MaskedNode`` leaves of ``params`` get None too. Raises ``TypeError`` for a
    non-floating leaf and names the leaf of bad ``weight_dimension_numbers``.

    Example:
        >>> import jax.numpy as jnp
        >>> from galorax.options import galore_options
        >>> tree = make_projectors({'w': jnp.zeros((8, 4)), 'b': jnp.zeros(4)}, None,
        ...                        galore_options(rank=2))
        >>> tree['b'] is None, tree['w'].low_shape
        (True, (2, 4))
    """
    with_paths = jax.tree.leaves_with_path(params, is_leaf=is_masked)
    dims = resolve_dimension_numbers(params, weight_dimension_numbers)
    out: list[LeafProjector | None] = []
    for (path, leaf), dim in zip(with_paths, dims, strict=True):
        if is_masked(leaf):
            out.append(None)
            continue
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(
                f"GaLore trains floating-point weights, but params{jax.tree_util.keystr(path)} "
                f"has dtype {leaf.dtype}; leave it out with optax.masked or optax.partition."
            )
        if dim is None:
            out.append(None)
            continue
        try:
            view = MatrixView.of(leaf.shape, dim)
        except (TypeError, ValueError) as err:
            raise type(err)(
                f"weight_dimension_numbers for params{jax.tree_util.keystr(path)}: {err}"
            ) from None
        left = uses_left(options.side, view.m, view.n)
        out.append(LeafProjector(view, left, min(options.rank, view.m, view.n), 0, 0, options))
    projected = [i for i, p in enumerate(out) if p is not None]
    for j, i in enumerate(projected):
        offset = (j * options.update_proj_gap) // len(projected) if options.stagger else 0
        out[i] = dataclasses.replace(out[i], offset=offset, index=j)  # type: ignore[type-var]
    return jax.tree.unflatten(jax.tree.structure(params, is_leaf=is_masked), out)
