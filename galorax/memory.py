"""Memory accounting: bytes of pytrees (real or abstract) and of compiled programs."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


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
