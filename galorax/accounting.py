"""Byte accounting of optimizer state: bytes of pytrees, real or abstract.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import galorax
    >>> params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros(32)}
    >>> state = jax.eval_shape(galorax.galore(0.1, rank=4).init, params)
    >>> [tree_bytes(s.projector) for s in find_galore_states(state)]
    [1024]
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from galorax.transform import GaLoreState


def tree_bytes(tree: Any) -> int:
    """Total bytes of the array leaves of ``tree``.

    Works on concrete arrays and on abstract ones (``jax.ShapeDtypeStruct``, the
    output of ``jax.eval_shape``), so state sizes can be counted without allocating.

    Example:
        >>> import jax.numpy as jnp
        >>> tree_bytes({'w': jnp.zeros((4, 8), jnp.float32), 'b': jnp.zeros(8, jnp.bfloat16)})
        144
    """
    return sum(
        int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        for leaf in jax.tree.leaves(tree)
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype")
    )


def find_galore_states(state: Any) -> list[Any]:
    """Every :class:`galorax.GaLoreState` inside ``state`` (chains, wrappers, dicts)."""
    found: list[Any] = []

    def visit(x: Any) -> None:
        if isinstance(x, GaLoreState):
            found.append(x)
        elif isinstance(x, tuple | list):
            for y in x:
                visit(y)
        elif isinstance(x, dict):
            for y in x.values():
                visit(y)

    visit(state)
    return found
