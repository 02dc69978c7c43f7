"""``skip_nonfinite=True`` of :func:`galorax.scale_by_galore`: non-finite leaves left as they were.

Example:
    >>> import jax.numpy as jnp
    >>> import galorax
    >>> tx = galorax.scale_by_galore(rank=2, skip_nonfinite=True)
    >>> params = {"w": jnp.ones((8, 4)), "b": jnp.ones(4)}
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.ones((8, 4)), "b": jnp.full(4, jnp.nan)}
    >>> updates, new = tx.update(grads, state)
    >>> updates["b"].tolist(), bool(jnp.all(new.base_optimizer_state.mu["b"] == 0))
    ([0.0, 0.0, 0.0, 0.0], True)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from galorax.dimension_numbers import is_masked
from galorax.moments import per_parameter_fields


def keep_nonfinite_leaves(updates: Any, old: Any, new: tuple[Any, Any]) -> tuple[Any, Any]:
    """``new`` (an update's ``(updates, GaLoreState)``) with each leaf whose gradient in
    ``updates`` is not all finite given a zero update and its state from ``old``.

    Per leaf: the projector, schedule, residual norm and the base optimizer's per-parameter
    fields (those laid out like the gradients: ``mu``, ``nu``, ..., a leaf's moment a float
    array or a :class:`~galorax.quantization.QuantizedArray`, whose codes and scales are
    kept together) keep their old values; the other leaves and the count step as usual.
    With a single leaf the whole base state is kept, as ``optax.apply_if_finite`` does.
    """
    out, state = new
    treedef: Any = jax.tree.structure(updates, is_leaf=is_masked)
    finite = [
        None if is_masked(g) else jnp.all(jnp.isfinite(g)) for g in treedef.flatten_up_to(updates)
    ]

    def keep(new_tree: Any, old_tree: Any) -> Any:  # per leaf: new where finite, else old
        news, olds = treedef.flatten_up_to(new_tree), treedef.flatten_up_to(old_tree)
        kept = [
            n if f is None else jax.tree.map(functools.partial(_where, f), n, o)
            for f, n, o in zip(finite, news, olds, strict=True)
        ]
        return treedef.unflatten(kept)

    if treedef.num_leaves == 1:  # one leaf: its fields cannot be told from the others
        where = functools.partial(_where, True if finite[0] is None else finite[0])
        base = jax.tree.map(where, state.base_optimizer_state, old.base_optimizer_state)
    else:  # the fields with the updates' structure (mu, nu, ...) hold one entry per leaf
        base_def, news, flags = per_parameter_fields(state.base_optimizer_state, treedef)
        olds = base_def.flatten_up_to(old.base_optimizer_state)
        pairs = zip(news, olds, flags, strict=True)
        base = base_def.unflatten([keep(n, o) if pp else n for n, o, pp in pairs])
    zeros = jax.tree.map(jnp.zeros_like, out)
    return keep(out, zeros), state._replace(
        base_optimizer_state=base,
        projector=keep(state.projector, old.projector),
        schedule=keep(state.schedule, old.schedule),
        residual_norm=None
        if state.residual_norm is None
        else keep(state.residual_norm, old.residual_norm),
    )


def _where(finite: Any, new: Any, old: Any) -> Any:
    return jnp.where(finite, new, old)
