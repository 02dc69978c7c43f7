"""Adam that skips a non-finite step in place: ``optax.scale_by_adam`` and ``optax.adamw``,
the same updates and state, given a train step's :class:`galorax.StepGate` (``gate=``).

Why galorax owns this copy of optax's Adam: optax's cannot skip in place.

A step that selects ``where(finite, new, old)`` after ``optax.scale_by_adam`` reads each
new moment twice (for the update and for the select) and the old one after it is
overwritten: XLA keeps a copy of every moment (at 1b, ~2 GB of AdamW's peak). Here the
moments are selected first and the update is taken from the selected ones (equal when the
step is finite; a skipped step's update is discarded), so each old moment's only reader is
the select and it is overwritten in place. Without a gate it is ``optax.scale_by_adam``.
GaLore's default base optimizer.

Example:
    >>> import jax.numpy as jnp, optax
    >>> params = {"w": jnp.ones(3)}
    >>> ours, theirs = scale_by_adam(), optax.scale_by_adam()
    >>> g = {"w": jnp.array([1.0, -2.0, 3.0])}
    >>> a, _ = ours.update(g, ours.init(params))
    >>> b, _ = theirs.update(g, theirs.init(params))
    >>> bool((a["w"] == b["w"]).all())
    True
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from optax import ScaleByAdamState

from galorax.step_gate import gate_of

__all__ = ["adamw", "scale_by_adam"]


def scale_by_adam(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    mu_dtype: Any | None = None,
    *,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """``optax.scale_by_adam`` (same arguments, updates and ``ScaleByAdamState``) that,
    given a :class:`galorax.StepGate` (``update(..., gate=gate)``), skips a non-finite step
    in place (see the module).

    Args:
        b1: Decay rate of the first moment.
        b2: Decay rate of the second moment.
        eps: Added to the denominator outside the square root.
        eps_root: Added to the second moment inside the square root.
        mu_dtype: The first moment's dtype (None: the gradients').
        nesterov: Nadam's momentum.

    Returns:
        The transformation.
    """
    plain = optax.scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov)
    tree = optax.tree_utils  # the functions optax.scale_by_adam is made of
    dtype = None if mu_dtype is None else jax.dtypes.canonicalize_dtype(mu_dtype)

    def update_fn(updates: Any, state: ScaleByAdamState, params: Any = None, **extra_args: Any):
        gate = gate_of(extra_args)
        if gate is None:
            return plain.update(updates, state, params)
        # optax.scale_by_adam's update, the moments selected before the update is read.
        mu = tree.tree_update_moment(updates, state.mu, b1, 1)
        mu = tree.tree_where(gate.finite, mu, state.mu)
        nu = tree.tree_update_moment_per_elem_norm(updates, state.nu, b2, 2)
        nu = tree.tree_where(gate.finite, nu, state.nu)
        count_inc = optax.safe_increment(state.count)
        if nesterov:
            mu_hat = jax.tree.map(
                lambda m, g: b1 * m + (1 - b1) * g,
                tree.tree_bias_correction(mu, b1, optax.safe_increment(count_inc)),
                tree.tree_bias_correction(updates, b1, count_inc),
            )
        else:
            mu_hat = tree.tree_bias_correction(mu, b1, count_inc)
        nu_hat = tree.tree_bias_correction(nu, b2, count_inc)
        out = jax.tree.map(
            lambda m, v: None if m is None else m / (jnp.sqrt(v + eps_root) + eps),
            mu_hat,
            nu_hat,
            is_leaf=lambda x: x is None,
        )
        new = ScaleByAdamState(
            count=jnp.where(gate.finite, count_inc, state.count),
            mu=tree.tree_cast(mu, dtype),
            nu=tree.tree_cast_like(nu, state.nu),
        )
        return out, gate.cover(new)

    return optax.GradientTransformationExtraArgs(plain.init, update_fn)


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    mu_dtype: Any | None = None,
    weight_decay: jax.typing.ArrayLike = 1e-4,
    mask: Any = None,
    *,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """``optax.adamw`` (same arguments, chain and state) on :func:`scale_by_adam`.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> params = {"w": jnp.ones(3)}
        >>> opt = adamw(0.1)
        >>> jax.tree.structure(opt.init(params)) == jax.tree.structure(
        ...     optax.adamw(0.1).init(params))
        True
    """
    return optax.chain(
        scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
