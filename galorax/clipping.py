"""Gradient clipping by the global norm, with the norm taken in bounded chunks.

``optax.clip_by_global_norm`` squares each gradient leaf whole: on CPU, XLA materializes
an f32 copy of every bf16 leaf to sum it. :func:`clip_by_global_norm` is the same
transformation with the sum of squares taken a chunk of each leaf at a time
(:func:`galorax.reductions.tree_sum_squares`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from galorax.chunking import Chunking, resolve
from galorax.reductions import tree_sum_squares

__all__ = ["clip_by_global_norm"]


def clip_by_global_norm(
    max_norm: float, *, chunking: Chunking | None = None
) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` with the norm taken in bounded chunks
    (:func:`tree_sum_squares`): the same state (``optax.EmptyState``) and the same updates
    (for low-precision gradients the norm is accumulated in f32, optax's in their dtype),
    without a whole f32 copy of each gradient leaf on CPU.

    Args:
        max_norm: The largest global norm let through.
        chunking: The chunk budget of the sum of squares.

    Example:
        >>> import jax.numpy as jnp
        >>> tx = clip_by_global_norm(1.0)
        >>> g, _ = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(None))
        >>> g["w"].tolist()
        [0.6000000238418579, 0.800000011920929]
    """

    settings = resolve(chunking)

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        norm = jnp.sqrt(tree_sum_squares(updates, settings))
        keep = norm < max_norm

        def clip(t: jax.Array) -> jax.Array:
            return jax.lax.select(keep, t, (t / norm.astype(t.dtype)) * max_norm)

        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)
