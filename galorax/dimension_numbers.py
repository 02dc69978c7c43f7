"""How weights become matrices: dimension numbers, batch axes and matrix views.

GaLore projects *matrices*. Weights are often stored with more axes: attention
projections as ``(embed, heads, head_dim)``, scanned layers as ``(layers, d_in, d_out)``,
MaxText stacks with the layer axis second. A :class:`GaLoreDimensionNumbers` names the
axes that form the matrix's rows (``reduction_axis``) and columns (``output_axis``);
every other axis is a **batch axis**: each slice along it (a layer, an expert) gets its
own projector and its own moments.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeGuard

import jax
import jax.numpy as jnp
import numpy as np
import optax

from galorax.compat import unbox


class GaLoreDimensionNumbers(NamedTuple):
    """Which axes of a weight form the matrix that GaLore projects.

    Axes in neither ``reduction_axis`` nor ``output_axis`` are batch axes: each slice
    along them is projected on its own (unlike ``optax.contrib.galore``, which
    requires every axis to be named). Negative axes count from the end.

    Example:
        For attention weights shaped ``(embed_dim, num_heads, head_dim)``,
        ``GaLoreDimensionNumbers(reduction_axis=0, output_axis=(1, 2))`` projects the
        ``embed_dim x (num_heads * head_dim)`` matrix. For a scanned stack
        ``(layers, d_in, d_out)``, ``GaLoreDimensionNumbers(1, 2)`` gives one projector
        per layer.

    Attributes:
        reduction_axis: Axis or axes representing the input/reduction dimension.
        output_axis: Axis or axes representing the output dimension.
    """

    reduction_axis: Sequence[int] | int = 0
    output_axis: Sequence[int] | int = 1


#: What ``weight_dimension_numbers`` may be: one spec, a tree of specs (None = skip
#: that leaf), or a callable from params to such a tree.
GaLoreDimNumsOrFn = GaLoreDimensionNumbers | Any | Callable[[Any], Any]


try:  # optax's own class is accepted too, so optax code runs unchanged
    from optax.contrib import GaLoreDimensionNumbers as _OptaxDims

    _DIMS_TYPES: tuple[type, ...] = (GaLoreDimensionNumbers, _OptaxDims)
except ImportError:  # older optax without contrib.galore
    _DIMS_TYPES = (GaLoreDimensionNumbers,)


def is_dims(x: Any) -> bool:
    """Whether ``x`` is a dimension-numbers value (ours or optax's)."""
    return isinstance(x, _DIMS_TYPES)


def _is_dim_nums_leaf(x: Any) -> bool:
    return x is None or is_dims(x)


def _as_ours(x: Any) -> GaLoreDimensionNumbers | None:
    return None if x is None else GaLoreDimensionNumbers(x.reduction_axis, x.output_axis)


def is_masked(x: Any) -> bool:
    """Whether ``x`` is ``optax.MaskedNode()``: a leaf left out (by ``optax.masked``/
    ``partition``, or unprojected in GaLore's state). A leafless pytree node, so tree
    functions that must keep it in place take ``is_leaf=is_masked``.

    Example:
        >>> import optax
        >>> is_masked(optax.MaskedNode()), is_masked(None)
        (True, False)
    """
    return isinstance(x, optax.MaskedNode)


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """A ``UserWarning`` the first time ``message`` comes up in this process (``update``
    is traced again for every new shape or jit, but says nothing new)."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, UserWarning, stacklevel=3)


def raw_axes(axes: Any, what: str) -> tuple[int, ...]:
    """``axes`` (an int or a sequence of ints, numpy's too) as a tuple of Python ints,
    else a ``TypeError`` naming the field."""
    is_int = lambda a: isinstance(a, int | np.integer) and not isinstance(a, bool | np.bool_)
    if is_int(axes):
        return (int(axes),)
    if isinstance(axes, tuple | list) and all(is_int(a) for a in axes):
        return tuple(int(a) for a in axes)
    raise TypeError(
        f"GaLoreDimensionNumbers.{what} must be an int axis or a tuple of int axes, e.g. 0 "
        f"or (1, 2), got {axes!r}."
    )


def _as_axes(axes: Sequence[int] | int, ndim: int, what: str) -> tuple[int, ...]:
    raw = raw_axes(axes, what)
    if not raw:
        raise ValueError(f"GaLoreDimensionNumbers.{what} is empty; name at least one axis.")
    for ax in raw:
        if not -ndim <= ax < ndim:
            raise ValueError(
                f"GaLoreDimensionNumbers.{what}={axes!r} is out of range for a weight with "
                f"{ndim} axes; use axes in [-{ndim}, {ndim - 1}]."
            )
    norm = tuple(ax % ndim for ax in raw)
    if len(set(norm)) != len(norm):
        raise ValueError(f"GaLoreDimensionNumbers.{what}={axes!r} repeats an axis.")
    return norm


@dataclasses.dataclass(frozen=True)
class MatrixView:
    """A weight's shape seen as a batch of ``(m, n)`` matrices.

    Attributes:
        shape: The weight's shape.
        batch_axes: Axes that index independent matrices, in order.
        reduction_axes: Axes flattened into the matrix rows (``m``).
        output_axes: Axes flattened into the matrix columns (``n``).

    Example:
        >>> view = MatrixView.of((3, 8, 4), GaLoreDimensionNumbers(1, 2))
        >>> view.batch_shape, view.m, view.n
        ((3,), 8, 4)
    """

    shape: tuple[int, ...]
    batch_axes: tuple[int, ...]
    reduction_axes: tuple[int, ...]
    output_axes: tuple[int, ...]

    @classmethod
    def of(cls, shape: Sequence[int], dim_nums: GaLoreDimensionNumbers) -> MatrixView:
        """Validates ``dim_nums`` against ``shape`` and builds the view."""
        shape = tuple(int(d) for d in shape)
        ndim = len(shape)
        if ndim < 2:
            raise ValueError(
                f"GaLore projects weights with at least 2 axes, got shape {shape}; give None "
                "as its dimension numbers to leave it unprojected."
            )
        red = _as_axes(dim_nums.reduction_axis, ndim, "reduction_axis")
        out = _as_axes(dim_nums.output_axis, ndim, "output_axis")
        if set(red) & set(out):
            raise ValueError(
                f"reduction_axis {red} and output_axis {out} overlap for shape {shape}; "
                "an axis belongs to the rows or the columns, not both."
            )
        batch = tuple(ax for ax in range(ndim) if ax not in red and ax not in out)
        return cls(shape, batch, red, out)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[ax] for ax in self.batch_axes)

    @property
    def m(self) -> int:
        return math.prod(self.shape[ax] for ax in self.reduction_axes)

    @property
    def n(self) -> int:
        return math.prod(self.shape[ax] for ax in self.output_axes)

    @property
    def _perm(self) -> tuple[int, ...]:
        return self.batch_axes + self.reduction_axes + self.output_axes

    def to_matrix(self, x: jax.Array) -> jax.Array:
        """``x`` of ``shape`` -> ``(*batch_shape, m, n)``."""
        return jnp.transpose(x, self._perm).reshape(*self.batch_shape, self.m, self.n)

    def from_matrix(self, y: jax.Array) -> jax.Array:
        """``(*batch_shape, m, n)`` -> an array of ``shape``."""
        perm = self._perm
        y = y.reshape(tuple(self.shape[ax] for ax in perm))
        return jnp.transpose(y, tuple(perm.index(ax) for ax in range(len(perm))))


def _is_spec_leaf(x: Any) -> bool:
    return _is_dim_nums_leaf(x) or is_masked(x)


def _is_function(spec: Any) -> TypeGuard[Callable[[Any], Any]]:
    """A callable to call on the params, not a static tree that happens to be callable
    (every ``eqx.Module`` is): a pytree made only of dimension numbers and None is a tree."""
    if not callable(spec):
        return False
    leaves = jax.tree.leaves(spec, is_leaf=_is_spec_leaf)
    return not all(_is_spec_leaf(leaf) for leaf in leaves)


def resolve_dimension_numbers(params: Any, weight_dimension_numbers: GaLoreDimNumsOrFn | None):
    """Returns a list, one entry per leaf of ``params``, of dimension numbers or None.

    ``optax.MaskedNode`` entries of ``params`` (as under ``optax.masked``/``partition``)
    count as leaves and always get None; None entries (``eqx.filter``) are skipped (the
    dimension numbers tree holds None there). The rules follow
    ``optax.contrib.galore``: None projects 2-D leaves only; one spec applies to every
    leaf with 2 or more axes; a tree must match ``params`` (boxes such as ``nnx.Param``
    around its entries are looked through); a callable is called on ``params``.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> params = {'w': jnp.zeros((3, 4)), 'b': None, 'm': optax.MaskedNode()}
        >>> resolve_dimension_numbers(params, {'w': GaLoreDimensionNumbers(), 'b': None,
        ...                                    'm': optax.MaskedNode()})
        [None, GaLoreDimensionNumbers(reduction_axis=0, output_axis=1)]
    """
    check_array_leaves(params)
    leaves, treedef = jax.tree.flatten(params, is_leaf=is_masked)
    spec = weight_dimension_numbers
    if not _is_function(spec):  # a function's own arguments may be numbers
        check_not_a_schedule(spec)
    if spec is None or is_dims(spec):
        default = GaLoreDimensionNumbers() if spec is None else _as_ours(spec)
        want = (lambda p: p.ndim == 2) if spec is None else (lambda p: p.ndim >= 2)
        if spec is None:
            _warn_unprojected(params)
        return [None if is_masked(p) or not want(p) else default for p in leaves]
    if _is_function(spec):
        spec = spec(params)
        check_not_a_schedule(spec)
    none_or_masked = lambda x: x is None or is_masked(x)
    with_none, full_def = jax.tree.flatten(unbox(params), is_leaf=none_or_masked)
    dims, dims_def = jax.tree.flatten(unbox(spec, _is_spec_leaf), is_leaf=_is_spec_leaf)
    if str(dims_def) != str(full_def) or not all(_is_spec_leaf(d) for d in dims):
        raise ValueError(
            "weight_dimension_numbers does not match the params: give a tree with the "
            "params' structure holding a GaLoreDimensionNumbers or None at every leaf "
            "(or one GaLoreDimensionNumbers for all). Under optax.inject_hyperparams, a "
            "callable needs static_args=('weight_dimension_numbers',)."
            f"\n  params: {full_def}\n  dims:   {dims_def}"
        )
    return [
        None if is_masked(p) or is_masked(d) else _as_ours(d)
        for p, d in zip(with_none, dims, strict=True)
        if p is not None
    ]


def check_not_a_schedule(spec: Any) -> None:
    """A ``TypeError`` if ``spec`` (``weight_dimension_numbers``) holds an array or a
    number where dimension numbers belong: what ``optax.inject_hyperparams`` makes of a
    callable it takes for a schedule (called with the step count, maybe traced).

    Example:
        >>> check_not_a_schedule({'w': GaLoreDimensionNumbers(), 'b': None})
    """

    def numeric(x: Any) -> bool:
        return isinstance(x, jax.Array | np.ndarray | np.generic | int | float | complex)

    for leaf in jax.tree.leaves(spec, is_leaf=_is_spec_leaf):
        fields = jax.tree.leaves(tuple(leaf)) if is_dims(leaf) else []
        if is_dims(leaf) and any(isinstance(f, jax.Array) for f in fields):
            what = f"a {type(leaf).__name__} with array axes"
        elif numeric(leaf):
            what = f"a {type(leaf).__name__} of shape {np.shape(leaf)}"
        else:
            continue
        raise TypeError(
            f"weight_dimension_numbers holds {what}, not dimension numbers: "
            "optax.inject_hyperparams took the callable for a schedule "
            "and called it with the step count; pass "
            "static_args=('weight_dimension_numbers',) to inject_hyperparams."
        )


def check_array_leaves(tree: Any) -> None:
    """A ``TypeError`` naming the first leaf of ``tree`` that is not an array (a Python
    float or int), which GaLore cannot give a shape, a dtype or moments.

    Example:
        >>> check_array_leaves({'w': jnp.zeros(2), 'm': optax.MaskedNode()})
    """
    for path, leaf in jax.tree.leaves_with_path(tree, is_leaf=is_masked):
        if not is_masked(leaf) and not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            raise TypeError(
                f"GaLore takes a tree of arrays, but the leaf at {path_str(path) or 'the root'!r} "
                f"is a {type(leaf).__name__} ({leaf!r}); make it an array (jnp.asarray) or "
                "leave it out with optax.masked."
            )


def check_same_tree(updates: Any, reference: Any) -> None:
    """A ``ValueError`` naming the leaves that ``updates`` lacks or adds compared with
    ``reference`` (the tree ``init`` was given, as ``state.projector`` holds it).

    Example:
        >>> check_same_tree({'w': jnp.zeros(2)}, {'w': jnp.ones(2)})
    """
    treedef: Any = jax.tree.structure(updates, is_leaf=is_masked)
    try:
        treedef.flatten_up_to(reference)
        return
    except (ValueError, TypeError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
    is_leaf = lambda x: is_masked(x) or hasattr(x, "shape")
    mine = {path_str(p) for p, _ in jax.tree.leaves_with_path(updates, is_leaf=is_masked)}
    theirs = {path_str(p) for p, _ in jax.tree.leaves_with_path(reference, is_leaf=is_leaf)}
    missing, extra = sorted(theirs - mine), sorted(mine - theirs)
    if missing or extra:
        detail = f"missing {missing[:5]}, unexpected {extra[:5]}"
    raise ValueError(
        f"GaLore's update got a tree of updates unlike the params given to init ({detail}); "
        "pass gradients with the params' structure (every leaf, same keys)."
    )


def _warn_unprojected(params: Any) -> None:
    """With the drop-in default (optax's rule: 2-D leaves only), say once that stacked
    (3+-axis) leaves stay unprojected and stacked vectors (2-D norms, biases) are
    projected as matrices."""
    big, vectors = [], []
    for path, leaf in jax.tree.leaves_with_path(params, is_leaf=is_masked):
        name = path_str(path)
        if not is_masked(leaf) and len(leaf.shape) >= 3:
            big.append(f"{name} {tuple(leaf.shape)}")
        elif not is_masked(leaf) and len(leaf.shape) == 2 and _VECTOR_NAME.search(name):
            vectors.append(f"{name} {tuple(leaf.shape)}")
    if not big and not vectors:
        return
    shown = lambda xs: ", ".join(xs[:3]) + (", ..." if len(xs) > 3 else "")
    warn_once(
        "weight_dimension_numbers=None projects 2-D leaves only (as optax): "
        + (f"{len(big)} leaves with 3+ axes stay unprojected ({shown(big)}); " if big else "")
        + (
            f"{len(vectors)} stacked norms/biases are projected ({shown(vectors)}); "
            if vectors
            else ""
        )
        + "pass weight_dimension_numbers=galorax.dimension_numbers_from_rules for one "
        "projector per layer (under optax.inject_hyperparams, with "
        "static_args=('weight_dimension_numbers',))."
    )


# A leaf named as a vector (norm scale, bias) even when stacked into 2-D.
_VECTOR_NAME = re.compile(
    r"(^|/)[^/]*(norm|bias|scale)[^/]*$|(^|/)(ln[^/]*|[^/]*norm[^/]*)/weight$"
)


def path_str(path: Any) -> str:
    """``path`` joined by ``/``, without a trailing ``.value`` (``nnx.Param``,
    ``nn.Partitioned``), so a boxed tree and its arrays decide alike."""
    if path and path[-1] == jax.tree_util.GetAttrKey("value"):
        path = path[:-1]
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def default_dimension_numbers(ndim: int) -> GaLoreDimensionNumbers | None:
    """The default rule: 2-D -> rows x columns; more axes -> the last two form the
    matrix and the leading ones are batch (scanned layers); fewer -> not projected.

    Example:
        >>> default_dimension_numbers(3)
        GaLoreDimensionNumbers(reduction_axis=-2, output_axis=-1)
        >>> default_dimension_numbers(1) is None
        True
    """
    if ndim < 2:
        return None
    return GaLoreDimensionNumbers(0, 1) if ndim == 2 else GaLoreDimensionNumbers(-2, -1)


DEFAULT_RULES: tuple[tuple[str, GaLoreDimensionNumbers | None], ...] = (
    # Embeddings are lookup tables, not linear maps: the paper leaves them to Adam. Norm
    # scales and biases are vectors, even when stacked over layers into 2-D arrays.
    (r"(^|/)[^/]*(embed|norm|bias|scale)[^/]*$", None),
    # Equinox names them `weight` (LayerNorm, RMSNorm, Embedding): the module's name tells.
    (r"(^|/)([^/]*(embed|norm)[^/]*|ln(_?[^/]*)?)/(weight|embedding)$", None),
)
