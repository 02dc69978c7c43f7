"""GaLore's steps on one projected leaf, as the spine (:mod:`galorax.galore_state`) calls
them: :func:`init_leaf` (projector, low-rank proxy, schedule, residual norm),
:func:`as_matrices`, :func:`refresh` (the due slices, :mod:`galorax.projector_refresh`),
:func:`project` and :func:`project_back` (plus the residual).
The math is :mod:`galorax.galore_math`'s; what is decided here is how it runs: a stacked
leaf a chunk of slices at a time (:func:`galorax.chunking.map_slices`, written over the
buffers it replaces), quantized projectors dequantized once, placed on the mesh like the
weight. The leaf's static facts: :class:`galorax.leaf.LeafProjector`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from galorax import chunking, galore_math, placement, projector_refresh
from galorax.chunking import map_slices
from galorax.leaf import LeafProjector
from galorax.moments import Transition
from galorax.projector_storage import compute_dtype, dense, quantized_spec
from galorax.quantization.blockwise import is_quantized
from galorax.quantization.projectors import quantize_slices
from galorax.schedule import RefreshSchedule

__all__ = ["as_matrices", "init_leaf", "project", "project_back", "refresh"]


def init_leaf(leaf: LeafProjector, param: Any) -> tuple[Any, jax.Array, RefreshSchedule, jax.Array]:
    """The leaf's initial projector, low-rank proxy (for the base optimizer's init),
    schedule and residual norm. Under explicit sharding each is born placed like
    ``param`` (so the update's output shardings equal its input's: no recompilation).

    Example:
        >>> from galorax.dimension_numbers import GaLoreDimensionNumbers, MatrixView
        >>> from galorax.options import galore_options
        >>> view = MatrixView.of((8, 4), GaLoreDimensionNumbers())
        >>> leaf = LeafProjector(view, True, 2, 0, 0, galore_options(rank=2))
        >>> p, proxy, schedule, norm = init_leaf(leaf, jnp.zeros((8, 4)))
        >>> p.shape, proxy.shape, project(leaf, jnp.ones((8, 4)), p)[0].shape
        ((8, 2), (2, 4), (2, 4))
    """
    opts = leaf.options
    specs = placement.galore_leaf_specs(param, leaf.view, leaf.left, leaf.rank) or {}

    def put(x: jax.Array, kind: str) -> jax.Array:
        return placement.place(x, param, specs.get(kind))

    # An orthonormal placeholder, kept if the first gradient is unusable.
    rows, r = leaf.proj_shape[-2:]
    eye = jnp.broadcast_to(jnp.eye(rows, r, dtype=opts.projector_dtype), leaf.proj_shape)
    if opts.projector_bits is None:
        projector: Any = put(eye, "projector")
    else:  # quantized eye: exact (levels 0 and 1), so still orthonormal
        spec = specs.get("projector")
        projector = jax.tree.map(
            lambda x: placement.place(x, param, quantized_spec(x, spec, leaf.n_batch, param)),
            quantize_slices(eye, opts.projector_bits),
        )
    proxy = put(jnp.zeros(leaf.low_shape, compute_dtype(param.dtype)), "low")
    batch = leaf.view.batch_shape
    schedule = RefreshSchedule(
        next_step=put(jnp.zeros(batch, jnp.int32), "batch"),
        gap=put(jnp.full(batch, opts.update_proj_gap, jnp.int32), "batch"),
        refreshes=put(jnp.zeros(batch, jnp.int32), "batch"),
    )
    return projector, proxy, schedule, put(jnp.zeros(batch, jnp.float32), "batch")


def as_matrices(leaf: LeafProjector, g: jax.Array) -> jax.Array:
    """The gradient as the leaf's ``(*batch, m, n)`` matrices: in f32 at once where the
    leaf runs whole (one f32 copy for refresh and projection), else in its own dtype (a
    chunked leaf is upcast a chunk at a time, never whole)."""
    g2 = leaf.view.to_matrix(g)
    return g2 if leaf.chunk_bytes(g.dtype) else g2.astype(compute_dtype(g.dtype))


def refresh(
    leaf: LeafProjector, g2: jax.Array, old: Any, sched: RefreshSchedule, count: Any, finite: Any
) -> tuple[Any, RefreshSchedule, Transition]:
    """The projector after refreshing the slices that are due (and the step ``finite``: a
    skipped step leaves projector and schedule as they were, in place), the schedule, and
    and the :class:`~galorax.moments.Transition` the moments follow (its ``basis`` None
    unless ``moments="rotate"``).

    A chunked leaf runs :func:`galorax.projector_refresh.refresh` as a loop of no
    iteration when nothing is attempted (no copies); a whole one under a ``cond``.
    """
    attempted = jnp.any(count >= sched.next_step) & finite
    rotate = leaf.options.moments == "rotate"
    if projector_refresh.in_chunks(leaf, g2):
        new, sched, changed, basis = projector_refresh.refresh(
            leaf, g2, old, sched, count, attempted
        )
    else:
        basis_shape = (*leaf.view.batch_shape, leaf.rank, leaf.rank)
        no_basis = jnp.zeros(basis_shape, jnp.float32) if rotate else None  # as refresh's
        new, sched, changed, basis = jax.lax.cond(
            attempted,
            lambda: projector_refresh.refresh(leaf, g2, old, sched, count),
            lambda: (old, sched, jnp.zeros((), bool), no_basis),
        )
    return new, sched, Transition(changed, basis, leaf.left, leaf.low_shape)


def project(leaf: LeafProjector, g2: jax.Array, new: Any) -> tuple[jax.Array, jax.Array]:
    """The low-rank gradient (:func:`galorax.galore_math.project`, in f32) and the dense
    projector it used; a chunk of a stacked leaf's slices at a time."""
    opts = leaf.options
    p = dense(new, compute_dtype(g2.dtype))
    low = chunking.buffer_after(leaf.low_shape, p.dtype, g2)  # written whole below

    def one(_: Any, reads: tuple[jax.Array, jax.Array]) -> jax.Array:
        return galore_math.project(*reads, left=leaf.left, precision=opts.precision)

    size = leaf.chunk_bytes(g2.dtype)
    low = map_slices(one, low, (g2, p), leaf.n_batch, size, None, opts.chunking)
    return low, p


def project_back(
    leaf: LeafProjector,
    g: jax.Array,
    g2: jax.Array,
    low: jax.Array,
    u: jax.Array,
    new: Any,
    p: jax.Array,
    norm: Any,
) -> tuple[jax.Array, Any]:
    """The update in ``g``'s shape and dtype from the base optimizer's output ``u``
    (:func:`galorax.galore_math.project_back`, scaled, plus Fira's compensation with
    ``residual``) and the new residual norm; a chunk of a stacked leaf's slices at a time,
    cast to ``g``'s dtype and written over the gradient's buffer (no second full-size
    buffer).

    Args:
        leaf: The projected leaf.
        g: The gradient (its shape and dtype are the update's).
        g2: :func:`as_matrices` of it.
        low: :func:`project`'s low-rank gradient.
        u: The base optimizer's output for ``low``.
        new: The stored projector.
        p: :func:`project`'s dense projector.
        norm: The residual's last norm per matrix.
    """
    opts = leaf.options
    p = (p if is_quantized(new) else new).astype(u.dtype)

    def back(bufs: tuple[jax.Array, Any], reads: tuple[jax.Array, ...]):
        (g2, norm), (low, u, p) = bufs, reads
        full = galore_math.project_back(u, p, left=leaf.left, precision=opts.precision)
        if opts.residual is not None:
            g2 = g2.astype(compute_dtype(g2.dtype))
            term, norm = galore_math.compensation(
                g2,
                low,
                u,
                p,
                left=leaf.left,
                prev_norm=norm,
                settings=opts.residual,
                precision=opts.precision,
            )
            full = full + term
        return (opts.scale * full).astype(g.dtype), norm

    with_norm = opts.residual is not None
    norm_in = norm if with_norm else jnp.zeros(leaf.view.batch_shape)
    size = leaf.chunk_bytes(g.dtype)
    bufs, reads = (g2, norm_in), (low, u, p)
    full, new_norm = map_slices(back, bufs, reads, leaf.n_batch, size, None, opts.chunking)
    return leaf.view.from_matrix(full), new_norm if with_norm else norm
