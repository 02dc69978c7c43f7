"""Dimension numbers from parameter paths: :func:`dimension_numbers_from_rules`.

Rules are ``(regex, GaLoreDimensionNumbers | None)`` pairs matched against each leaf's path
(``layers/wq``); the first match wins, unmatched leaves take the default for their number of
axes (:func:`galorax.default_dimension_numbers`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax

from galorax.compat import unbox
from galorax.dimension_numbers import (
    DEFAULT_RULES,
    GaLoreDimensionNumbers,
    MatrixView,
    default_dimension_numbers,
    is_dims,
    is_masked,
    path_str,
    raw_axes,
    warn_once,
)


def dimension_numbers_from_rules(
    params: Any,
    rules: Sequence[tuple[str, GaLoreDimensionNumbers | None]] = DEFAULT_RULES,
    *,
    default: Callable[[int], GaLoreDimensionNumbers | None] = default_dimension_numbers,
) -> Any:
    """Builds a ``weight_dimension_numbers`` tree from parameter paths and shapes.

    Each leaf's path (keys joined by ``/``, e.g. ``layers/attn/wq``) is matched with
    ``re.search`` against ``rules`` in order; the first match gives its dimension numbers
    (None leaves it unprojected). Unmatched leaves get ``default(ndim)``.

    Args:
        params: The parameter tree (arrays or ``jax.ShapeDtypeStruct``).
        rules: ``(regex, GaLoreDimensionNumbers | None)`` pairs. The default leaves any
            leaf whose last path element contains ``embed``, ``norm``, ``bias`` or
            ``scale`` unprojected, and a ``weight`` or ``embedding`` whose module's name
            contains ``embed`` or ``norm`` or starts with ``ln`` (Equinox's naming). A
            trailing ``.value`` (``nnx.Param``, ``nn.Partitioned``) is not part of the path.
        default: Rule for unmatched leaves, from their number of axes.

    Returns:
        A tree like ``params`` (boxes removed) with a ``GaLoreDimensionNumbers`` or None
        at each leaf (and at its ``optax.MaskedNode`` leaves).

    Raises:
        TypeError: ``params`` is a scalar array: the step count that
            ``optax.inject_hyperparams`` gives a callable it takes for a schedule.

    Example:
        MaxText-style stacks with the layer axis second:

        >>> import jax, jax.numpy as jnp
        >>> params = {'embed': jnp.zeros((256, 16)), 'mlp': {'wi': jnp.zeros((16, 4, 64))},
        ...           'norm': jnp.zeros(16)}
        >>> dims = dimension_numbers_from_rules(
        ...     params, [(r'mlp/', GaLoreDimensionNumbers(0, 2))] + list(DEFAULT_RULES))
        >>> dims['embed'] is None, dims['mlp']['wi'], dims['norm'] is None
        (True, GaLoreDimensionNumbers(reduction_axis=0, output_axis=2), True)
    """
    if isinstance(params, jax.Array) and params.ndim == 0:  # the step count
        raise TypeError(
            "dimension_numbers_from_rules got a scalar, not a params tree: under "
            "optax.inject_hyperparams, pass static_args=('weight_dimension_numbers',) so "
            "the callable is not taken for a schedule."
        )
    compiled = _compile_rules(rules)

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
        dims = default(len(leaf.shape))
        if dims is not None and len(leaf.shape) >= 3:
            _check_layout(name, leaf.shape, dims)
        return dims

    return jax.tree_util.tree_map_with_path(pick, unbox(params), is_leaf=is_masked)


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
