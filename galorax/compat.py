"""Framework containers around parameters: boxes, and how GaLore sees through them.

Flax NNX's ``nnx.Optimizer`` calls ``tx.init`` on a tree of ``nnx.Param`` Variables and
``tx.update`` on the plain arrays, and writes the new state back through
``nnx.state(...)``, which keeps array leaves (wrapped in ``OptArray``) but turns any
container *inside* a Variable (a :class:`galorax.RefreshSchedule`, an
``optax.MaskedNode``) into a dict. Linen's ``nn.Partitioned`` boxes params the same way.
GaLore's state is built from the unboxed params, so it holds no box and every
container in it survives nnx's round trip; updates keep the boxes they came in.
``None`` leaves (``eqx.filter``, a layer without bias) are seen as ``optax.MaskedNode``,
which GaLore already leaves out everywhere (its state holds ``MaskedNode`` there).

A *box* is a pytree node, not a builtin container, whose only child sits under the
attribute ``value`` (``nnx.Variable``, ``flax.linen.Partitioned``). This module imports
no framework: it recognises them by that structure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

__all__ = ["as_plain", "is_box", "rebox", "unbox"]

_VALUE = jax.tree_util.GetAttrKey("value")


def _masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def is_box(x: Any) -> bool:
    """Whether ``x`` is a box: a custom pytree node with one child, at ``.value``.

    Example:
        >>> import jax.numpy as jnp
        >>> is_box({"value": jnp.ones(2)}), is_box(jnp.ones(2))
        (False, False)
    """
    if x is None or isinstance(x, tuple | list | dict) or _masked(x):
        return False
    children = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)[0]
    return len(children) == 1 and children[0][0] == (_VALUE,)


def unbox(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> Any:
    """``tree`` with every box replaced by its content (nested boxes too).

    Args:
        tree: A pytree, e.g. ``nnx.state(model, nnx.Param)``.
        is_leaf: Further nodes to keep whole (``optax.MaskedNode`` always is).

    Example:
        >>> import jax.numpy as jnp, optax
        >>> unbox({"w": jnp.ones(2), "m": optax.MaskedNode()})["m"]
        MaskedNode()
    """

    def stop(x: Any) -> bool:
        return _masked(x) or is_box(x) or (is_leaf is not None and is_leaf(x))

    def open_box(x: Any) -> Any:
        if not is_box(x):
            return x
        child = jax.tree_util.tree_flatten(x, is_leaf=lambda y: y is not x)[0][0]
        return unbox(child, is_leaf)

    return jax.tree.map(open_box, tree, is_leaf=stop)


def as_plain(tree: Any) -> Any:
    """What GaLore maps over: ``tree`` unboxed, its None leaves as ``optax.MaskedNode``.

    Example:
        >>> import jax.numpy as jnp
        >>> as_plain({"w": jnp.ones(2), "b": None})["b"]
        MaskedNode()
    """
    return jax.tree.map(
        lambda x: optax.MaskedNode() if x is None else x,
        unbox(tree),
        is_leaf=lambda x: x is None or _masked(x),
    )


def rebox(like: Any, tree: Any) -> Any:
    """``tree`` (``as_plain(like)``'s structure) with ``like``'s boxes and Nones put back.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> rebox({"w": jnp.ones(2), "b": None}, {"w": jnp.zeros(2), "b": optax.MaskedNode()})
        {'b': None, 'w': Array([0., 0.], dtype=float32)}
    """
    is_leaf = lambda x: x is None or _masked(x)
    old, treedef = jax.tree.flatten(like, is_leaf=is_leaf)
    new = jax.tree.leaves(tree, is_leaf=_masked)
    return jax.tree.unflatten(
        treedef, [None if o is None else n for o, n in zip(old, new, strict=True)]
    )
