"""One projected leaf, decided once: its matrix view, side, rank, stagger slot and plan.

:func:`make_projectors` turns each leaf of the params into a :class:`LeafProjector` (None
where it is not projected) when the transform is initialized and again, identically, at
each update: the static facts every step of that leaf reads (its shapes, which side is
projected, whether a stack's slices run in chunks). The steps themselves:
:mod:`galorax.projector` (init, project, project back) and
:mod:`galorax.projector_refresh`; their math: :mod:`galorax.galore_math`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from galorax.dimension_numbers import (
    GaLoreDimNumsOrFn,
    MatrixView,
    is_masked,
    resolve_dimension_numbers,
)
from galorax.galore_math import uses_left
from galorax.options import GaLoreOptions
from galorax.projector_storage import compute_dtype

__all__ = ["LeafProjector", "is_projector_leaf", "make_projectors", "map_leaves"]


@dataclasses.dataclass(frozen=True)
class LeafProjector:
    """One projected leaf: the static facts of its GaLore steps.

    Attributes:
        view: The leaf seen as a batch of ``(m, n)`` matrices.
        left: The projector spans the rows side: the low-rank gradient is ``P^T G``,
            ``(r, n)``; else ``G P``, ``(m, r)``.
        rank: ``r``, the requested rank clipped to ``min(m, n)``.
        offset: First step of its stagger slot.
        index: Position among the projected leaves (seeds its sketches).
        options: The transform's options.

    Example:
        >>> from galorax.dimension_numbers import GaLoreDimensionNumbers
        >>> from galorax.options import galore_options
        >>> view = MatrixView.of((3, 8, 4), GaLoreDimensionNumbers(1, 2))
        >>> leaf = LeafProjector(view, True, 2, 0, 0, galore_options(rank=2))
        >>> leaf.proj_shape, leaf.low_shape, leaf.n_batch
        ((3, 8, 2), (3, 2, 4), 1)
    """

    view: MatrixView
    left: bool
    rank: int
    offset: int
    index: int
    options: GaLoreOptions

    @property
    def n_batch(self) -> int:
        return len(self.view.batch_shape)

    @property
    def proj_shape(self) -> tuple[int, ...]:
        rows = self.view.m if self.left else self.view.n
        return (*self.view.batch_shape, rows, self.rank)

    @property
    def low_shape(self) -> tuple[int, ...]:
        v = self.view
        return (*v.batch_shape, self.rank, v.n) if self.left else (*v.batch_shape, v.m, self.rank)

    def chunk_bytes(self, dtype: Any) -> int:
        """Bytes of one matrix in f32 (:func:`galorax.chunking.map_slices`'s unit) where a
        stacked leaf of ``dtype`` gradients pays for chunking, else 0 (whole: float32
        gradients without residual need no full-size temporary beyond the update)."""
        opts = self.options
        pays = compute_dtype(dtype) != dtype or opts.residual is not None
        return 4 * self.view.m * self.view.n if pays and opts.chunking.galore else 0


def is_projector_leaf(x: Any) -> bool:
    """Leaves of a :func:`make_projectors` tree: a :class:`LeafProjector` or None."""
    return x is None or isinstance(x, LeafProjector)


def map_leaves(leaves: Any, fn: Callable[..., tuple], *trees: Any, skip: Any = None) -> tuple:
    """``fn(leaf, *entries)`` for each leaf of a :func:`make_projectors` tree, or
    ``skip(*entries)`` where the leaf is None (if given), a tuple each, unzipped into one
    tree per result.

    Example:
        >>> import jax.numpy as jnp
        >>> from galorax.options import galore_options
        >>> grads = {'w': jnp.zeros((8, 4)), 'b': jnp.zeros(4)}
        >>> leaves = make_projectors(grads, None, galore_options(rank=2))
        >>> (shapes,) = map_leaves(leaves, lambda leaf, g: (leaf.low_shape,), grads,
        ...                        skip=lambda g: (g.shape,))
        >>> shapes
        {'b': (4,), 'w': (2, 4)}
    """
    treedef: Any = jax.tree.structure(leaves, is_leaf=is_projector_leaf)
    flat = [treedef.flatten_up_to(t) for t in trees]
    out = [
        skip(*e) if leaf is None and skip is not None else fn(leaf, *e)
        for leaf, *e in zip(treedef.flatten_up_to(leaves), *flat, strict=True)
    ]
    return tuple(treedef.unflatten(list(c)) for c in zip(*out, strict=True))


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
        if dim is None or leaf.size == 0:  # a zero-size leaf has no subspace: as it is
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
