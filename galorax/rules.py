"""Dimension numbers from parameter paths: :func:`dimension_numbers_from_rules`.

Rules are ``(regex, GaLoreDimensionNumbers | None)`` pairs matched against each leaf's path
(``layers/wq``); the first match wins. Unmatched leaves get a layout read from their
names and shapes (:func:`infer_layout`): a 2-D weight is a matrix; the extra axes of a
stacked one are batch axes (one projector per layer), leading (``nnx.vmap``/``nnx.scan``,
``nn.scan``, ``eqx.filter_vmap``) or second (MaxText's scanned layers); attention
kernels ``query``/``key``/``value`` ``(in, heads, head_dim)`` and ``out`` ``(heads,
head_dim, out)`` (Flax linen and NNX, MaxText) project ``in x heads*head_dim``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax

from galorax.compat import unbox
from galorax.dimension_numbers import (
    DEFAULT_RULES,
    GaLoreDimensionNumbers,
    MatrixView,
    is_dims,
    is_masked,
    path_str,
    raw_axes,
    warn_once,
)

__all__ = ["dimension_numbers_from_rules", "infer_layout"]

# Attention projections as Flax (linen, NNX) and MaxText name them; MaxText's MLP
# kernels, whose scanned stacks put the layer axis second (param_scan_axis=1).
_ATTN_IN = re.compile(r"(^|/)(query|key|value)(/kernel)?$")
_ATTN_OUT = re.compile(r"(^|/)out(/kernel)?$")
_LAYERS_SECOND = re.compile(r"(^|/)(wi(_\d+)?|wo)(/kernel)?$")


def dimension_numbers_from_rules(
    params: Any,
    rules: Sequence[tuple[str, GaLoreDimensionNumbers | None]] = DEFAULT_RULES,
    *,
    default: Callable[[int], GaLoreDimensionNumbers | None] | None = None,
) -> Any:
    """Builds a ``weight_dimension_numbers`` tree from parameter paths and shapes.

    Each leaf's path (keys joined by ``/``, e.g. ``layers/attn/wq``) is matched with
    ``re.search`` against ``rules`` in order; the first match gives its dimension numbers
    (None leaves it unprojected). Unmatched leaves get :func:`infer_layout`'s guess from
    their path and shape, or ``default(ndim)`` if given.

    Args:
        params: The parameter tree (arrays or ``jax.ShapeDtypeStruct``).
        rules: ``(regex, GaLoreDimensionNumbers | None)`` pairs. The default leaves any
            leaf whose last path element contains ``embed``, ``norm``, ``bias`` or
            ``scale`` unprojected, and a ``weight`` or ``embedding`` whose module's name
            contains ``embed`` or ``norm`` or starts with ``ln`` (Equinox's naming). A
            trailing ``.value`` (``nnx.Param``, ``nn.Partitioned``) is not part of the path.
        default: Rule for unmatched leaves from their number of axes alone (e.g.
            :func:`galorax.default_dimension_numbers`: the last two axes form the matrix).
            None: :func:`infer_layout`.

    Returns:
        A tree like ``params`` (boxes removed) with a ``GaLoreDimensionNumbers`` or None
        at each leaf (and at its ``optax.MaskedNode`` leaves).

    Raises:
        TypeError: ``params`` is a scalar array: the step count that
            ``optax.inject_hyperparams`` gives a callable it takes for a schedule.

    Example:
        An NNX attention kernel ``(in, heads, head_dim)`` and a MaxText scanned MLP
        ``(embed, layers, mlp)``, one projector per layer:

        >>> import jax, jax.numpy as jnp
        >>> params = {'embed': jnp.zeros((256, 16)),
        ...           'attn': {'query': {'kernel': jnp.zeros((16, 4, 4))}},
        ...           'mlp': {'wi_0': {'kernel': jnp.zeros((16, 3, 64))}}, 'norm': jnp.zeros(16)}
        >>> dims = dimension_numbers_from_rules(params)
        >>> dims['embed'] is None, dims['norm'] is None
        (True, True)
        >>> dims['attn']['query']['kernel']
        GaLoreDimensionNumbers(reduction_axis=0, output_axis=(1, 2))
        >>> dims['mlp']['wi_0']['kernel']
        GaLoreDimensionNumbers(reduction_axis=0, output_axis=2)
    """
    if isinstance(params, jax.Array) and params.ndim == 0:  # the step count
        raise TypeError(
            "dimension_numbers_from_rules got a scalar, not a params tree: under "
            "optax.inject_hyperparams, pass static_args=('weight_dimension_numbers',) so "
            "the callable is not taken for a schedule."
        )
    compiled = _compile_rules(rules)
    tree = unbox(params)
    named = {
        path_str(path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_masked)
        if not is_masked(leaf)
    }
    heads = _attention_heads(named)

    def pick(path: Any, leaf: Any) -> GaLoreDimensionNumbers | None:
        if is_masked(leaf):  # left out by optax.partition / masked
            return None
        name = path_str(path)
        for pattern, dims in compiled:
            if pattern.search(name):
                if dims is not None:
                    try:  # fail early, naming the path
                        MatrixView.of(leaf.shape, dims)
                    except (TypeError, ValueError) as err:
                        raise type(err)(f"dimension_numbers_from_rules: {name!r}: {err}") from None
                return dims
        if default is None:
            return infer_layout(name, leaf.shape, heads)
        dims = default(len(leaf.shape))
        if dims is not None and len(leaf.shape) >= 3:
            _check_layout(name, leaf.shape, dims)
        return dims

    return jax.tree_util.tree_map_with_path(pick, tree, is_leaf=is_masked)


def infer_layout(
    name: str, shape: Sequence[int], heads: Mapping[str, set[tuple[int, int]]] | None = None
) -> GaLoreDimensionNumbers | None:
    """A weight's dimension numbers guessed from its path and shape.

    2-D: rows x columns. Attention kernels (``query``/``key``/``value``: ``(in, heads,
    head_dim)`` with ``in`` at least ``heads`` and ``head_dim``; ``out``: ``(heads,
    head_dim, out)`` beside such a sibling with the same heads): ``in x heads*head_dim``.
    Other weights: the last two of the remaining axes. Extra (stacking) axes are batch
    axes: leading, else second (MaxText) where a leading one would outnumber the matrix's
    rows or columns; MaxText's ``wi``/``wo`` names try second first. A one-time warning
    says what remains a guess.

    Args:
        name: The leaf's path, ``/``-joined.
        shape: Its shape.
        heads: Per attention module (the path above ``query``), the ``(heads,
            head_dim)`` of its input kernels; ``out`` is an attention kernel only there.

    Example:
        >>> infer_layout('attn/out/kernel', (4, 16, 64), {'attn': {(4, 16)}})
        GaLoreDimensionNumbers(reduction_axis=(0, 1), output_axis=2)
        >>> infer_layout('layers/kernel', (3, 8, 16))
        GaLoreDimensionNumbers(reduction_axis=-2, output_axis=-1)
        >>> infer_layout('bias', (16,)) is None
        True
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        return None
    if len(shape) == 2:
        return GaLoreDimensionNumbers(0, 1)
    found = _attention_in(name, shape)
    if found is not None:
        return found[0]
    if _ATTN_OUT.search(name):
        known = (heads or {}).get(_attention_module(name), set())
        for _, dims, axes in _candidates(shape, "out"):
            if (shape[axes[0]], shape[axes[1]]) in known:
                return dims
    layers_second = bool(_LAYERS_SECOND.search(name))
    dense = sorted(_candidates(shape, "dense"), key=lambda c: -c[0] if layers_second else c[0])
    if dense:
        start, dims, _ = dense[0]
        if start == 1 and not layers_second:
            warn_once(
                f"dimension_numbers_from_rules: {name!r} {shape}: a leading stack axis would "
                f"outnumber its rows or columns, so its second axis is taken for the layers "
                f"({dims}); if not, give it a rule, e.g. (r'{name}', "
                "GaLoreDimensionNumbers(-2, -1))."
            )
        return dims
    dims = GaLoreDimensionNumbers(-2, -1)
    _check_layout(name, shape, dims)
    return dims


def _candidates(
    shape: tuple[int, ...], kind: str
) -> Iterator[tuple[int, GaLoreDimensionNumbers, tuple[int, ...]]]:
    """``(start, dims, matrix axes)`` of the layouts whose stack axes (from ``start``: 0
    leading, 1 after the first axis) do not outnumber the matrix's rows or columns.
    ``kind``: ``"dense"`` ``(in, out)``, ``"in"`` ``(in, heads, head_dim)``, ``"out"``
    ``(heads, head_dim, out)``."""
    ndim = len(shape)
    extra = ndim - (2 if kind == "dense" else 3)
    for start in (0, 1) if extra else (0,):
        axes = tuple(a for a in range(ndim) if not start <= a < start + extra)
        if start == 0 and extra:  # counted from the end, whatever the number of stack axes
            axes = tuple(a - ndim for a in axes)
        if kind == "dense":
            dims = GaLoreDimensionNumbers(axes[0], axes[1])
        elif kind == "out":
            dims = GaLoreDimensionNumbers((axes[0], axes[1]), axes[2])
        else:
            dims = GaLoreDimensionNumbers(axes[0], (axes[1], axes[2]))
        view = MatrixView.of(shape, dims)
        if math.prod(view.batch_shape) <= min(view.m, view.n):
            yield start, dims, axes


def _attention_in(
    name: str, shape: tuple[int, ...]
) -> tuple[GaLoreDimensionNumbers, tuple[int, int]] | None:
    """A query/key/value kernel's dims and ``(heads, head_dim)``, if its shape is one's."""
    if len(shape) < 3 or not _ATTN_IN.search(name):
        return None
    for _, dims, (d_in, n_heads, head_dim) in _candidates(shape, "in"):
        if shape[d_in] >= max(shape[n_heads], shape[head_dim]):
            return dims, (shape[n_heads], shape[head_dim])
    return None


def _attention_module(name: str) -> str:
    """The path above a ``query``/``out`` module (``kernel`` dropped)."""
    parts = name.split("/")
    if parts[-1] == "kernel":
        parts = parts[:-1]
    return "/".join(parts[:-1])


def _attention_heads(named: Mapping[str, tuple[int, ...]]) -> dict[str, set[tuple[int, int]]]:
    """Per attention module, the ``(heads, head_dim)`` of its query/key/value kernels."""
    heads: dict[str, set[tuple[int, int]]] = {}
    for name, shape in named.items():
        found = _attention_in(name, shape)
        if found is not None:
            heads.setdefault(_attention_module(name), set()).add(found[1])
    return heads


def _compile_rules(rules: Any) -> list[tuple[re.Pattern[str], Any]]:
    """``rules`` with compiled patterns, else an error naming the bad rule."""
    if isinstance(rules, str | bytes) or not isinstance(rules, Sequence):
        raise TypeError(
            "dimension_numbers_from_rules: `rules` must be a list of (regex, "
            f"GaLoreDimensionNumbers | None) pairs, got {rules!r}."
        )
    compiled = []
    for i, rule in enumerate(rules):
        where = f"dimension_numbers_from_rules: rules[{i}]={rule!r}"
        if not isinstance(rule, tuple | list) or len(rule) != 2:
            raise TypeError(f"{where} must be a (regex, GaLoreDimensionNumbers | None) pair.")
        pattern, dims = rule
        if not isinstance(pattern, str | re.Pattern):
            raise TypeError(f"{where}: the pattern must be a regex string, got {pattern!r}.")
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{where}: bad regex {pattern!r}: {err}.") from None
        if dims is not None and not is_dims(dims):
            raise TypeError(
                f"{where}: the second item must be a GaLoreDimensionNumbers or None, got "
                f"{dims!r}; e.g. GaLoreDimensionNumbers(0, 1)."
            )
        if dims is not None:
            try:
                raw_axes(dims.reduction_axis, "reduction_axis")
                raw_axes(dims.output_axis, "output_axis")
            except TypeError as err:
                raise TypeError(f"{where}: {err}") from None
        compiled.append((regex, dims))
    return compiled


def _check_layout(name: str, shape: Sequence[int], dims: GaLoreDimensionNumbers) -> None:
    """Warn when the default's layout guess looks wrong: more slices than rows or columns
    (an attention kernel ``(embed, heads, head_dim)``, a MaxText stack ``(embed, layers,
    mlp)``), so projectors as large as the weight, or layers mixed inside each matrix."""
    view = MatrixView.of(shape, dims)
    if math.prod(view.batch_shape) > min(view.m, view.n):
        warn_once(
            f"dimension_numbers_from_rules: {name!r} {tuple(shape)} defaults to "
            f"{math.prod(view.batch_shape)} matrices of {view.m}x{view.n}: likely not its "
            "layout (attention (embed, heads, head_dim)? layers on another axis?). Give it "
            "a rule, e.g. (r'attn/query', GaLoreDimensionNumbers(0, (1, 2)))."
        )
