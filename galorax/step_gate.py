"""Skipping a non-finite train step without a copy of the optimizer state.

A train step that skips updates whose loss or gradients are not finite returns
``where(finite, new, old)`` for every state leaf. Where a leaf is updated in place (a chunk
loop over 8-bit codes, a projector refresh under a cond), that select keeps the old leaf
alive beside the new one: XLA copies it, and the copy of every such leaf is in the step's
peak. :func:`gate_step` lets the transforms that can do better skip in place instead:
while an optimizer update is traced inside it, :func:`active_gate` hands them the step's
``finite`` flag; they write each chunk, refresh and moment only where it holds, and
:meth:`StepGate.cover` their state, which :meth:`StepGate.keep` then passes as it is.
galorax's :func:`~galorax.scale_by_galore`, :func:`~galorax.scale_by_adam` (and
:func:`~galorax.adamw`) and :func:`~galorax.scale_by_adam_8bit` do.

The gate is read while the update is traced: open it inside the jitted step (as
``galorax train`` does), not around a call of an update jitted on its own, whose cached
program would keep the gate (or miss it) for every later call.

The contract of a covered state: it equals the transform's new state where ``finite``
holds and the state it was given otherwise. Anything a wrapper builds anew (a
re-traced or re-packed state) is not covered and gets the select.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import galorax
    >>> opt = optax.chain(optax.clip(1.0), galorax.scale_by_adam_8bit(min_8bit_size=4))
    >>> params = {"w": jnp.ones((4, 4))}
    >>> state = opt.init(params)
    >>> grads = {"w": jnp.full((4, 4), jnp.nan)}
    >>> with gate_step(jnp.array(False)) as gate:
    ...     updates, new = opt.update(grads, state)
    >>> kept = gate.keep(new, state)
    >>> int(kept[1].count), bool((kept[1].mu["w"].codes == state[1].mu["w"].codes).all())
    (0, True)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["StepGate", "active_gate", "gate_step"]


class StepGate:
    """A train step's ``finite`` flag while its optimizer update is traced.

    Attributes:
        finite: Scalar bool: whether the step's loss and gradients are all finite.
    """

    def __init__(self, finite: jax.Array) -> None:
        self.finite = finite
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


_LOCAL = threading.local()


def _gates() -> list[StepGate]:
    if not hasattr(_LOCAL, "gates"):
        _LOCAL.gates = []
    return _LOCAL.gates


@contextlib.contextmanager
def gate_step(finite: jax.Array) -> Iterator[StepGate]:
    """The step's :class:`StepGate` for the optimizer updates traced inside.

    Args:
        finite: Scalar bool: whether the step may change anything.

    Yields:
        The gate: select the state with :meth:`StepGate.keep` after the update.
    """
    gate = StepGate(finite)
    _gates().append(gate)
    try:
        yield gate
    finally:
        _gates().pop()


def active_gate() -> StepGate | None:
    """The innermost :func:`gate_step`'s gate, or None outside one."""
    gates = _gates()
    return gates[-1] if gates else None
