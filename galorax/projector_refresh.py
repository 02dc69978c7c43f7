"""A projector refresh: new bases for the due slices of one projected leaf.

:func:`refresh` is what :func:`galorax.projector.step` runs when a slice is due
(:mod:`galorax.schedule`): it draws the range finder's test matrix (:func:`sketch`),
factorizes the gradient's slices (:func:`candidate`: :func:`galorax.galore_math.new_basis`,
split over ``refresh_axes`` on a mesh), aligns the new columns' signs with the old ones
and keeps the old projector where a slice's gradient is not usable (:func:`attempt`), a
chunk of a stacked leaf's slices at a time, then advances the schedule.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from galorax import galore_math, placement, subspace
from galorax.chunking import after, buffer_after, map_slices, slices_chunk
from galorax.leaf import LeafProjector
from galorax.projector_storage import change_of_basis, compute_dtype, dense
from galorax.quantization.blockwise import is_quantized
from galorax.quantization.projectors import quantize_slices, select_slices
from galorax.schedule import RefreshSchedule, advance, subspace_overlap

__all__ = ["attempt", "candidate", "in_chunks", "refresh", "sketch", "slice_bytes"]


def sketch(leaf: LeafProjector, shape: tuple[int, ...], count: Any) -> jax.Array | None:
    """The range finder's random test matrix for gradients ``shape`` (None: SVD): one
    matrix that every slice of a stacked leaf shares, so a chunk of the slices, or one
    layer updated on its own (:mod:`galorax.layer_updates`), draws the same one.

    Args:
        leaf: The projected leaf (its options, index, side and rank).
        shape: Shape of the leaf's gradients as matrices, ``(*batch, m, n)``.
        count: The step (folded into the key).
    """
    rf = leaf.options.subspace
    if rf is None:
        return None
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(rf.seed), leaf.index), count)
    m, n = shape[-2:]
    a = jax.ShapeDtypeStruct((m, n) if leaf.left else (n, m), jnp.float32)
    return subspace.sketch(key, a, leaf.rank, rf.oversample)  # type: ignore[arg-type]


def candidate(
    leaf: LeafProjector, g2: jax.Array, old_c: jax.Array, omega: Any, fresh: jax.Array
) -> tuple[jax.Array, bool]:
    """A new basis for every slice of ``g2`` and whether its slices were split over
    ``refresh_axes``.

    Args:
        leaf: The projected leaf.
        g2: The gradient's slices as matrices, in the compute dtype.
        old_c: The old projector, dense.
        omega: The shared test matrix per slice (None: SVD).
        fresh: Per slice, whether it was refreshed before (a warm start then).
    """
    opts = leaf.options
    basis = functools.partial(
        galore_math.new_basis,
        rank=leaf.rank,
        left=leaf.left,
        settings=opts.subspace,
        precision=opts.precision,
    )
    if opts.subspace is None:
        # On a mesh the SVD needs each matrix whole: gathered (with a warning).
        svd = placement.whole_for_svd(g2)
        return placement.spread_map(basis, opts.refresh_axes, leaf.n_batch, svd)

    def randomized(g2: jax.Array, omega: jax.Array, warm: jax.Array, fresh: jax.Array):
        return basis(g2, omega=omega, warm=warm, fresh=fresh)

    # Replicated stacked weights: each device factorizes its share of the slices.
    inputs = (g2, omega.astype(g2.dtype), old_c, fresh)
    return placement.spread_map(randomized, opts.refresh_axes, leaf.n_batch, *inputs)


def attempt(
    leaf: LeafProjector, g2: jax.Array, old: Any, due: jax.Array, omega: Any, fresh: jax.Array
) -> tuple[Any, jax.Array, jax.Array | None, bool]:
    """``(new projector, accepted, overlap, split)`` of a refresh of the slices of ``g2``
    (any float dtype; a chunk or the whole stack). Slices whose gradient is zero or
    non-finite, or not ``due``, keep their projector.

    Args:
        leaf: The projected leaf.
        g2: The gradient's slices as matrices.
        old: The stored projector of these slices (float or quantized).
        due: Per slice, whether its refresh is due.
        omega: The shared test matrix per slice (None: SVD).
        fresh: Per slice, whether it was refreshed before.
    """
    opts = leaf.options
    g2 = g2.astype(compute_dtype(g2.dtype))
    valid = galore_math.usable(g2)
    # A bad slice must not poison the batched factorization of the good ones.
    g2 = jnp.where(valid[..., None, None], g2, 0)
    old_c = dense(old, g2.dtype)
    cand, split = candidate(leaf, g2, old_c, omega, fresh)
    if opts.moments != "keep":  # an SVD picks signs at random: match the old ones
        cand = galore_math.align_signs(cand, old_c)
    overlap = subspace_overlap(cand, old_c) if opts.adaptive is not None else None
    accept = due & valid
    if is_quantized(old):
        new = select_slices(
            accept, quantize_slices(cand.astype(opts.projector_dtype), old.bits), old
        )
    else:
        new = jnp.where(accept[..., None, None], cand.astype(old.dtype), old)
    return new, accept, overlap, split


def slice_bytes(leaf: LeafProjector, g2: jax.Array) -> int:
    """What :func:`refresh` chunks ``g2``'s slices by (0: whole). On a mesh too: each
    device's sketch of a whole stack is replicated there. Whole where ``refresh_axes``
    spreads the slices over devices instead."""
    spread = leaf.options.refresh_axes and placement.on_several_devices(g2)
    return 0 if spread else leaf.chunk_bytes(g2.dtype)


def in_chunks(leaf: LeafProjector, g2: jax.Array) -> bool:
    """Whether :func:`refresh` loops over chunks of ``g2``'s slices (else one whole call)."""
    batch = g2.shape[: len(leaf.view.batch_shape)]
    return slices_chunk(batch, slice_bytes(leaf, g2), leaf.options.chunking) < math.prod(batch)


def refresh(
    leaf: LeafProjector,
    g2: jax.Array,
    old: Any,
    sched: RefreshSchedule,
    count: Any,
    attempted: Any = None,
) -> tuple[Any, RefreshSchedule, jax.Array, jax.Array | None]:
    """New projectors for the due slices (stored like ``old``), the schedule after the
    attempt, whether any slice changed and, with ``moments="rotate"``, each slice's
    :func:`~galorax.projector_storage.change_of_basis` from ``old`` to the new projector
    (else None); a chunk of a stacked leaf's slices at a time off a mesh when
    :meth:`~galorax.leaf.LeafProjector.chunk_bytes` says it pays. Slices whose
    gradient is zero or non-finite keep their projector and retry at the next step.

    The change of basis is taken here, slice by slice, so that ``old`` is dead once the
    new projector is written over it: carrying ``old`` to the moment rotation would cost
    a copy of every projector.

    Args:
        leaf: The projected leaf.
        g2: The gradient as matrices, ``(*batch, m, n)``.
        old: The stored projector (float or quantized).
        sched: The leaf's refresh schedule.
        count: The step.
        attempted: Optional scalar bool: when False nothing is factorized and every
            slice keeps its projector and schedule (a loop of no iteration: the
            projectors, written in place, need no copy).
    """
    opts, nb = leaf.options, leaf.n_batch
    due, fresh = count >= sched.next_step, sched.refreshes > 0
    omega = sketch(leaf, g2.shape, count)
    size = slice_bytes(leaf, g2)
    split_seen: list[bool] = []

    with_basis = opts.moments == "rotate"

    def body(bufs: Any, reads: Any) -> Any:
        (parts, *_), (g2, due, fresh) = bufs, reads
        # The shared test matrix, as each slice's (a chunk's batch axes are flat).
        omega_c = None if omega is None else jnp.broadcast_to(omega, (*g2.shape[:-2], *omega.shape))
        old_c: Any = parts
        if is_quantized(old):
            shape = (*parts[0].shape[: parts[0].ndim - old.codes.ndim + nb], *old.shape[nb:])
            old_c = dataclasses.replace(old, codes=parts[0], scales=parts[1], shape=shape)
        new, accept, overlap, split = attempt(leaf, g2, old_c, due, omega_c, fresh)
        split_seen.append(split)
        parts = (new.codes, new.scales) if is_quantized(new) else new
        out = parts, accept, jnp.zeros(accept.shape) if overlap is None else overlap
        if not with_basis:
            return out
        basis = change_of_basis(new, old_c)
        # Written after the change of basis has read the old chunk: XLA would otherwise
        # read it after the write, at the cost of two copies of the whole projector.
        parts = jax.tree.map(lambda x: after(x, basis), parts)
        return parts, *out[1:], basis

    parts = (old.codes, old.scales) if is_quantized(old) else old
    bufs: tuple[Any, ...] = (parts, jnp.zeros(due.shape, bool), jnp.zeros(due.shape))
    if with_basis:
        bufs = (*bufs, buffer_after((*due.shape, leaf.rank, leaf.rank), jnp.float32, g2))
    reads = (g2, due, fresh)
    parts, accept, overlap, *basis = map_slices(
        body, bufs, reads, nb, size, attempted, opts.chunking
    )
    new = parts
    if is_quantized(old):
        new = dataclasses.replace(old, codes=parts[0], scales=parts[1])
    overlap = overlap if opts.adaptive is not None else None
    sched = advance(sched, accept, count, leaf.offset, opts.update_proj_gap, overlap, opts.adaptive)
    if any(split_seen):  # the new state whole again, placed like the old (no recompilation)
        new, sched, basis = jax.tree.map(
            lambda x: placement.whole_slices(x, nb), (new, sched, basis)
        )
    return new, sched, jnp.any(accept), basis[0] if basis else None
