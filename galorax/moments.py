"""Moments across a refresh: carrying the base optimizer's state into a new subspace.

When a leaf's projector changes from ``P_old`` to ``P_new`` (``moments="rotate"`` of
:func:`galorax.scale_by_galore`), a low-rank first moment ``m`` (coordinates in the old
basis) becomes ``C m`` with ``C = P_new^T P_old``, exact for the part of the old
subspace that the new one keeps; a second moment ``v`` becomes ``(C * C) v``, the
diagonal of ``C diag(v) C^T`` (non-negative, its total kept where the subspaces agree).

Which fields of the base optimizer's state are moments is decided by their names
(:data:`DEFAULT_MOMENT_FIELDS`, extended by ``moment_fields=``). A per-parameter field
with another name is an error (:func:`unrecognized_fields`), not silently left behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax

from galorax import galore_math
from galorax.chunking import DEFAULT, Chunking, map_stored
from galorax.dimension_numbers import is_masked
from galorax.projector_storage import change_of_basis
from galorax.quantization.blockwise import is_quantized

#: Field names of known base-optimizer states and how each moves at a refresh: ``mu``
#: (adam, lion, belief, amsgrad, adam_8bit...), ``trace`` (sgd/trace momentum),
#: ``momentum``: first moments; ``nu``: second. Left as they are: amsgrad's ``nu_max`` and
#: adafactor's factored ``v_row``/``v_col``/``v`` (no rotation maps a running maximum or a
#: factored variance).
DEFAULT_MOMENT_FIELDS: Mapping[str, str] = {
    "mu": "first",
    "trace": "first",
    "momentum": "first",
    "nu": "second",
    "nu_max": "none",
    "v_row": "none",
    "v_col": "none",
    "v": "none",
}


def moment_kinds(extra: Iterable[tuple[str, str]] | Mapping[str, str] = ()) -> dict[str, str]:
    """:data:`DEFAULT_MOMENT_FIELDS` updated with ``extra`` (name -> kind).

    Example:
        >>> moment_kinds({"ema": "first"})["ema"], moment_kinds()["nu"]
        ('first', 'second')
    """
    pairs = extra.items() if isinstance(extra, Mapping) else extra
    return {**DEFAULT_MOMENT_FIELDS, **dict(pairs)}


def _is_named(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def map_moment_fields(state: Any, fn: Callable[[Any, bool], Any], kinds: Mapping[str, str]) -> Any:
    """``state`` with every moment field replaced by ``fn(value, second)``.

    Walks NamedTuples (chained, wrapped, masked states), tuples, lists and dicts; a field
    whose kind is ``"first"`` or ``"second"`` is mapped, one of kind ``"none"`` is kept.

    Example:
        >>> import optax, jax.numpy as jnp
        >>> state = optax.scale_by_adam().init({'w': jnp.ones(2)})
        >>> out = map_moment_fields(state, lambda t, second: 'v' if second else 'm', moment_kinds())
        >>> out.mu, out.nu
        ('m', 'v')
    """
    if _is_named(state):
        fields = {}
        for name, value in zip(state._fields, state, strict=True):
            kind = kinds.get(name)
            if kind in ("first", "second"):
                fields[name] = fn(value, kind == "second")
            else:
                fields[name] = value if kind == "none" else map_moment_fields(value, fn, kinds)
        return type(state)(**fields)
    if isinstance(state, tuple | list):
        return type(state)(map_moment_fields(s, fn, kinds) for s in state)
    if isinstance(state, dict):
        return {k: map_moment_fields(v, fn, kinds) for k, v in state.items()}
    return state


def _flatten(tree: Any) -> tuple[list[Any], Any]:
    # 8-bit moments (galorax.adam8bit) and masked placeholders are single entries.
    return jax.tree.flatten(tree, is_leaf=lambda x: is_masked(x) or is_quantized(x))


def per_parameter_fields(state: Any, treedef: Any) -> tuple[Any, list[Any], list[bool]]:
    """A base optimizer state's fields: their structure, the fields (flat) and, for each,
    whether it holds one entry per parameter leaf of ``treedef`` (``mu``, ``nu``, ...: laid
    out like the gradients, an 8-bit moment or a masked placeholder one entry). With a
    single parameter leaf a scalar field (a count) looks per-parameter too.

    Example:
        >>> import optax, jax, jax.numpy as jnp
        >>> params = {'a': jnp.ones(2), 'b': jnp.ones(3)}
        >>> state = optax.scale_by_adam().init(params)
        >>> _, fields, flags = per_parameter_fields(state, jax.tree.structure(params))
        >>> flags
        [False, True, True]
    """
    entry = lambda x: is_masked(x) or is_quantized(x)  # noqa: E731
    per_param = lambda x: jax.tree.structure(x, is_leaf=entry) == treedef  # noqa: E731
    base_def: Any = jax.tree.structure(state, is_leaf=per_param)
    fields = base_def.flatten_up_to(state)
    return base_def, fields, [per_param(f) for f in fields]


def _per_parameter(tree: Any, like: Any) -> bool:
    """Whether rotation would touch ``tree``: a tree like the parameters' (same nodes, not a
    nested state) with an entry shaped like a projected leaf's low-rank gradient."""
    leaves, treedef = _flatten(tree)
    ref, ref_def = _flatten(like)
    return treedef == ref_def and any(
        not is_masked(r) and getattr(m, "shape", None) == r.shape
        for m, r in zip(leaves, ref, strict=True)
    )


def unrecognized_fields(state: Any, like: Any, kinds: Mapping[str, str]) -> list[str]:
    """``'StateType.field'`` for each per-parameter field of ``state`` not in ``kinds``.

    Args:
        state: A base optimizer's state for the low-rank gradients.
        like: The low-rank gradients' tree (what the base optimizer was initialized
            with), ``optax.MaskedNode()`` at the leaves that are not projected.
        kinds: Known field names (:func:`moment_kinds`).

    Example:
        >>> import optax, jax.numpy as jnp
        >>> like = {'w': jnp.ones((2, 3))}
        >>> unrecognized_fields(optax.ema(0.9).init(like), like, moment_kinds())
        ['EmaState.ema']
        >>> unrecognized_fields(optax.scale_by_adam().init(like), like, moment_kinds())
        []
    """
    found: list[str] = []
    if _is_named(state):
        for name, value in zip(state._fields, state, strict=True):
            if name in kinds:
                continue
            if _per_parameter(value, like):
                found.append(f"{type(state).__name__}.{name}")
            else:
                found.extend(unrecognized_fields(value, like, kinds))
    elif isinstance(state, tuple | list):
        for s in state:
            found.extend(unrecognized_fields(s, like, kinds))
    elif isinstance(state, dict):
        for s in state.values():
            found.extend(unrecognized_fields(s, like, kinds))
    return found


def check_moments(state: Any, like: Any, kinds: Mapping[str, str]) -> None:
    """Raises if ``state`` holds per-parameter fields that rotation would leave behind.

    Args: as :func:`unrecognized_fields`.

    Raises:
        ValueError: Naming the fields, and how to say what they are (``moment_fields``).

    Example:
        >>> import optax, jax.numpy as jnp
        >>> like = {'w': jnp.ones((2, 3))}
        >>> check_moments(optax.lion(0.1).init(like), like, moment_kinds())
    """
    unknown = unrecognized_fields(state, like, kinds)
    if unknown:
        raise ValueError(
            "moments='rotate' carries the base optimizer's moments into each new subspace, "
            f"but its state holds per-parameter fields galorax does not know: {unknown}. "
            "Say how each moves at a refresh with moment_fields={name: 'first' | 'second' | "
            "'none'} (e.g. moment_fields={'ema': 'first'}; 'none' leaves it as it is), or "
            "use moments='align'."
        )


def rotate_moment(
    m: Any, new: Any, old: Any, *, left: bool, second: bool, settings: Chunking = DEFAULT
) -> Any:
    """One low-rank moment carried from basis ``old`` into basis ``new``:
    :func:`carry_moment` by their :func:`~galorax.projector_storage.change_of_basis`.

    Args:
        m: The moment: ``(*batch, r, n)`` for a left projector, ``(*batch, m, r)`` for a
            right one; a :class:`galorax.QuantizedArray` is dequantized, rotated and
            quantized back.
        new: The new projector ``(*batch, rows, r)`` (quantized or not).
        old: The old projector, the basis of ``m``.
        left: Which side the projectors project.
        second: A second moment: rotated with ``C * C`` instead of ``C = new^T old``.
        settings: The chunk budget of a stacked moment.

    Example:
        >>> import jax.numpy as jnp
        >>> old = jnp.eye(3)[:, :2]
        >>> new = old[:, ::-1]  # the same subspace, columns swapped
        >>> rotate_moment(jnp.array([[1.0], [2.0]]), new, old, left=True, second=False)
        Array([[2.],
               [1.]], dtype=float32)
    """
    c = change_of_basis(new, old)
    return carry_moment(m, c, left=left, second=second, settings=settings)


def carry_moment(
    m: Any,
    c: jax.Array,
    *,
    left: bool,
    second: bool,
    when: jax.Array | None = None,
    settings: Chunking = DEFAULT,
) -> Any:
    """One low-rank moment carried by the change of basis ``c = P_new^T P_old``
    (``(*batch, r, r)``, f32): :func:`galorax.galore_math.rotate_moment`, run by
    :func:`galorax.chunking.map_stored`: a stacked leaf's moment a chunk of slices at a
    time, in place (an 8-bit one never all in f32). With ``when`` (a scalar bool) only if
    it holds: a chunk loop of no iteration, or a cond for a whole leaf (no copy of the
    moment either way).

    Example:
        >>> import jax.numpy as jnp
        >>> swap = jnp.array([[0.0, 1.0], [1.0, 0.0]])
        >>> carry_moment(jnp.array([[1.0], [2.0]]), swap, left=True, second=True).ravel()
        Array([2., 1.], dtype=float32)
    """
    c = c * c if second else c

    def rotate(x: jax.Array, c: jax.Array) -> jax.Array:
        return galore_math.rotate_moment(x, c, left=left, second=False)

    return map_stored(rotate, m, c, when, split=c.ndim > 2, settings=settings)


class Transition(NamedTuple):
    """A possible projector change of one leaf, for :func:`rotate_moments`.

    Attributes:
        changed: Scalar bool: whether any slice of the leaf got a new projector.
        basis: Each slice's change of basis ``P_new^T P_old`` (``(*batch, r, r)``; slices
            that did not change: ``P_old^T P_old``; zeros when the leaf was not refreshed,
            which ``changed`` then says: used only when it holds); None where the moments
            do not follow the basis (``moments="keep"``/``"align"``).
        left: Which side the projectors project.
        low_shape: Shape of the leaf's low-rank moments.
    """

    changed: jax.Array
    basis: jax.Array | None
    left: bool
    low_shape: tuple[int, ...]


def rotate_moments(
    state: Any,
    transitions: Sequence[Transition | None],
    kinds: Mapping[str, str],
    settings: Chunking = DEFAULT,
) -> Any:
    """``state`` with its moments carried into the new bases (only where a leaf changed).

    Args:
        state: The base optimizer's state.
        transitions: One per parameter leaf (masked ones included), None where the leaf is
            not projected.
        kinds: Which fields are moments (:func:`moment_kinds`).
        settings: The chunk budget of a stacked leaf's rotation.

    Example:
        >>> import optax, jax.numpy as jnp
        >>> state = optax.scale_by_adam().init({'w': jnp.zeros((2, 1))})
        >>> state = state._replace(mu={'w': jnp.array([[1.0], [2.0]])})
        >>> swap = jnp.array([[0.0, 1.0], [1.0, 0.0]])
        >>> t = Transition(jnp.array(True), swap, True, (2, 1))
        >>> rotate_moments(state, [t], moment_kinds()).mu['w'].ravel()
        Array([2., 1.], dtype=float32)
    """

    def rotate_tree(tree: Any, second: bool) -> Any:
        leaves, treedef = _flatten(tree)
        if len(leaves) != len(transitions):
            return tree  # not a per-parameter moment tree (e.g. a scalar count)

        def one(m: Any, t: Transition | None) -> Any:
            if t is None or t.basis is None or getattr(m, "shape", None) != t.low_shape:
                return m  # unprojected, or a container this rule does not know (left as is)
            return carry_moment(
                m, t.basis, left=t.left, second=second, when=t.changed, settings=settings
            )

        return treedef.unflatten([one(m, t) for m, t in zip(leaves, transitions, strict=True)])

    return map_moment_fields(state, rotate_tree, kinds)
