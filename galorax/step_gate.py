"""Skipping a non-finite train step without a copy of the optimizer state: the step's gate,
passed to the optimizer's ``update`` as an argument.

A train step that skips updates whose loss or gradients are not finite returns
``where(finite, new, old)`` for every state leaf. Where a leaf is updated in place (a chunk
loop over 8-bit codes, a projector refresh), that select keeps the old leaf alive beside
the new one: XLA copies it, and the copy of every such leaf is in the step's peak. The
transforms that can do better skip in place instead when given the step's
:class:`StepGate` as optax's extra argument ``gate=``: they write each chunk, refresh and
moment only where ``gate.finite`` holds, and :meth:`StepGate.cover` their state, which
:meth:`StepGate.keep` then passes as it is. galorax's :func:`~galorax.scale_by_galore`
(and its base optimizer), :func:`~galorax.scale_by_adam` / :func:`~galorax.adamw` and
:func:`~galorax.scale_by_adam_8bit` do; ``optax.chain``, ``optax.masked`` and
``optax.inject_hyperparams`` pass the argument on, and transforms without extra arguments
never see it.

The contract of a covered state: it equals the transform's new state where ``finite``
holds and the state it was given otherwise. Anything a wrapper builds anew (a re-packed
state, an optax transform's count) is not covered and gets the select.

The gate is a Python object made inside the traced step (it is not a JAX value: a jitted
``update`` cannot take it across its boundary), so create it where the step is traced.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import galorax
    >>> opt = optax.chain(optax.clip(1.0), galorax.scale_by_adam_8bit(min_8bit_size=4))
    >>> params = {"w": jnp.ones((4, 4))}
    >>> state = opt.init(params)
    >>> grads = {"w": jnp.full((4, 4), jnp.nan)}
    >>> gate = galorax.StepGate(jnp.array(False))
    >>> updates, new = opt.update(grads, state, gate=gate)
    >>> kept = gate.keep(new, state)
    >>> int(kept[1].count), bool((kept[1].mu["w"].codes == state[1].mu["w"].codes).all())
    (0, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["StepGate", "gate_of"]


class StepGate:
    """A train step's ``finite`` flag for the optimizer update it is passed to.

    Attributes:
        finite: Scalar bool: whether the step's loss and gradients are all finite.
    """

    def __init__(self, finite: jax.typing.ArrayLike) -> None:
        self.finite = jnp.asarray(finite)
        self._covered: list[Any] = []

    def cover(self, state: Any) -> Any:
        """Marks ``state`` as already gated (see the module's contract); returns it."""
        self._covered.append(state)
        return state

    def covers(self, node: Any) -> bool:
        """Whether ``node`` (this very object) was :meth:`cover`-ed."""
        return any(node is c for c in self._covered)

    def keep(self, new: Any, old: Any) -> Any:
        """``new`` where the step is finite, else ``old``, leaf by leaf; covered nodes
        of ``new`` pass as they are (they skipped in place)."""
        select = lambda n, o: n if self.covers(n) else jnp.where(self.finite, n, o)  # noqa: E731
        return jax.tree.map(select, new, old, is_leaf=self.covers)


def gate_of(extra_args: Mapping[str, Any]) -> StepGate | None:
    """The :class:`StepGate` among an ``update``'s extra arguments (``gate=``), or None.

    Raises:
        TypeError: ``gate`` is something else.

    Example:
        >>> gate_of({}) is None, type(gate_of({"gate": StepGate(True)})).__name__
        (True, 'StepGate')
    """
    gate = extra_args.get("gate")
    if gate is not None and not isinstance(gate, StepGate):
        raise TypeError(f"`gate` must be a galorax.StepGate, got {type(gate).__name__}.")
    return gate
