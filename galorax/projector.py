"""GaLore's projectors: one :class:`LeafProjector` per projected leaf.

A :class:`LeafProjector` holds the static facts of one projected leaf (its matrix view,
side, rank, stagger slot) and the math on it: its initial state (:meth:`LeafProjector.init`),
the projection (:meth:`~LeafProjector.project`), the refresh (:meth:`~LeafProjector.refresh`,
in :mod:`galorax.projector_refresh`) and the way back (:meth:`~LeafProjector.project_back`).
:func:`make_projectors` builds the tree of them (None where a leaf is not projected) that
the transform maps over.

How projectors are stored (float, or int8 / int4 with ``projector_bits``) and what that
costs: :mod:`galorax.projector_storage`. :func:`quantize_projector` /
:func:`projector_error` are re-exported here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from galorax import chunking, placement, projector_refresh
from galorax.chunking import map_slices
from galorax.dimension_numbers import (
    GaLoreDimNumsOrFn,
    MatrixView,
    is_masked,
    resolve_dimension_numbers,
)
from galorax.options import GaLoreOptions
from galorax.projector_storage import compute_dtype, dense, quantized_spec
from galorax.quantization.blockwise import is_quantized
from galorax.quantization.projectors import (
    PROJECTOR_GROUP,
    ProjectorError,
    projector_error,
    quantize_projector,
    quantize_slices,
    select_slices,
)
from galorax.residual import compensation
from galorax.schedule import RefreshSchedule

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
        specs = placement.galore_leaf_specs(param, self.view, self.left, self.rank) or {}

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

    def step(self, g: jax.Array, old: Any, sched: RefreshSchedule, count: Any, finite: Any = True):
        """Refreshes the projector when a slice is due (and the step ``finite``: a skipped
        step leaves projector and schedule as they were, in place) and projects ``g``.

        Returns ``(low-rank gradient, projector, schedule, change, carry)``: ``change``
        the pair (whether any slice got a new projector, the slices' change of basis or
        None: :meth:`refresh`), ``carry`` what :meth:`finish` reuses. The projection runs
        a chunk of a stacked leaf's slices at a time, so a low-precision gradient is
        upcast a chunk at a time, never whole.
        """
        g2 = self.view.to_matrix(g)
        if not self.chunk_bytes(g.dtype):  # whole: one f32 copy for refresh and projection
            g2 = g2.astype(compute_dtype(g.dtype))
        attempted = jnp.any(count >= sched.next_step) & finite
        if projector_refresh.in_chunks(self, g2):  # a loop of no iteration: no copies
            new, sched, *change = self.refresh(g2, old, sched, count, attempted)
        else:
            rotate = self.options.moments == "rotate"
            basis_shape = (*self.view.batch_shape, self.rank, self.rank)
            no_basis = jnp.zeros(basis_shape, jnp.float32) if rotate else None  # as refresh's
            new, sched, *change = jax.lax.cond(
                attempted,
                lambda: self.refresh(g2, old, sched, count),
                lambda: (old, sched, jnp.zeros((), bool), no_basis),
            )
        p = dense(new, compute_dtype(g.dtype))
        nb, size = len(self.view.batch_shape), self.chunk_bytes(g.dtype)
        low = chunking.buffer_after(self.low_shape, p.dtype, g2)  # written whole below
        low = map_slices(lambda _, r: self.project(*r), low, (g2, p), nb, size)
        return low, new, sched, tuple(change), (g2, low, new, p)

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
        """The range finder's test matrix: :func:`galorax.projector_refresh.sketch`."""
        return projector_refresh.sketch(self, shape, count)

    def candidate(self, g2: jax.Array, old_c: jax.Array, omega: Any, fresh: jax.Array):
        """New bases of ``g2``'s slices: :func:`galorax.projector_refresh.candidate`."""
        return projector_refresh.candidate(self, g2, old_c, omega, fresh)

    def attempt(self, g2: jax.Array, old: Any, due: jax.Array, omega: Any, fresh: jax.Array):
        """A refresh of ``g2``'s due slices: :func:`galorax.projector_refresh.attempt`."""
        return projector_refresh.attempt(self, g2, old, due, omega, fresh)

    def refresh(
        self, g2: jax.Array, old: Any, sched: RefreshSchedule, count: Any, attempted: Any = None
    ):
        """New projectors for the due slices, the schedule after the attempt, whether
        any slice changed and the change of basis (None unless ``moments="rotate"``):
        :func:`galorax.projector_refresh.refresh`."""
        return projector_refresh.refresh(self, g2, old, sched, count, attempted)


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
