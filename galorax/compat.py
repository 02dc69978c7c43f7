"""Framework containers around parameters: boxes, and how GaLore sees through them.

Flax NNX's ``nnx.Optimizer`` calls ``tx.init`` on a tree of ``nnx.Param`` Variables and
``tx.update`` on the plain arrays, and writes the new state back through
``nnx.state(...)``, which keeps array leaves (wrapped in ``OptArray``) but turns any
container *inside* a Variable (a :class:`galorax.RefreshSchedule`, an
``optax.MaskedNode``) into a dict. Linen's ``nn.Partitioned`` boxes params the same way.
GaLore's state is built from the unboxed params, so no container in it sits inside a
box and all survive nnx's round trip; updates keep the boxes they came in. Only the
base optimizer's moments of unprojected leaves, shaped like their params, are boxed
as the params were (:func:`box_moments`), as ``optax.adam``'s are: ``nnx.Optimizer``
then gives them the ``nnx.Param``'s metadata (its sharding), and linen's
``nn.get_partition_spec`` finds their names.
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

__all__ = ["as_plain", "box_moments", "is_box", "rebox", "restore_boxes", "unbox"]

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


def _rewrap(box: Any, leaf: Any) -> Any:
    """``box`` (metadata and all) around ``leaf`` instead of its content."""
    treedef: Any = jax.tree.structure(box)
    return treedef.unflatten([leaf])


def box_moments(params: Any, tree: Any, projector: Any) -> Any:
    """``tree`` with ``params``' boxes around the leaves, unprojected in ``projector``
    (``optax.MaskedNode`` there), of every subtree shaped like ``as_plain(params)``: the
    base optimizer's moments, as ``optax`` would box them.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> box_moments({"w": jnp.ones(2)}, {"mu": {"w": jnp.zeros(2)}}, {"w": optax.MaskedNode()})
        {'mu': {'w': Array([0., 0.], dtype=float32)}}
    """
    boxes = jax.tree.leaves(params, is_leaf=lambda x: x is None or _masked(x) or is_box(x))
    if not any(is_box(b) for b in boxes):
        return tree
    plain = as_plain(params)
    plain_def: Any = jax.tree.structure(plain, is_leaf=_masked)
    keep = [_masked(p) for p in plain_def.flatten_up_to(projector)]
    shapes = [getattr(x, "shape", None) for x in jax.tree.leaves(plain, is_leaf=_masked)]

    def box(sub: Any) -> Any:
        leaves = plain_def.flatten_up_to(sub)
        return plain_def.unflatten(
            [
                _rewrap(b, x) if is_box(b) and k and getattr(x, "shape", ()) == s else x
                for b, x, k, s in zip(boxes, leaves, keep, shapes, strict=True)
            ]
        )

    like_params = lambda x: jax.tree.structure(x, is_leaf=_masked) == plain_def
    return jax.tree.map(lambda x: box(x) if like_params(x) else x, tree, is_leaf=like_params)


def restore_boxes(like: Any, tree: Any) -> Any:
    """``tree``, the plain structure of ``like``, with ``like``'s boxes put back (a state
    that came in boxed goes out boxed, so its structure never changes).

    Example:
        >>> import jax.numpy as jnp
        >>> restore_boxes({"w": jnp.ones(2)}, {"w": jnp.zeros(2)})
        {'w': Array([0., 0.], dtype=float32)}
    """
    old, treedef_ = jax.tree.flatten(like, is_leaf=lambda x: _masked(x) or is_box(x))
    treedef: Any = treedef_
    if not any(is_box(x) for x in old):
        return tree
    new = treedef.flatten_up_to(tree)
    return treedef.unflatten(
        [_rewrap(o, n) if is_box(o) else n for o, n in zip(old, new, strict=True)]
    )
