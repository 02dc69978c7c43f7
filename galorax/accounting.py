"""Byte accounting for any model and optimizer: bytes of pytrees (real or abstract), of a
training setup's weights, gradients and optimizer state (:func:`plan_memory`), and XLA's
memory analysis of a compiled step (:func:`compiled_memory`). The LLaMA presets and the
``galorax memory`` tables built on these are the application's (its planner).

Example:
    >>> import jax, jax.numpy as jnp
    >>> import galorax
    >>> params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros(32)}
    >>> state = jax.eval_shape(galorax.galore(0.1, rank=4).init, params)
    >>> [tree_bytes(s.projector) for s in find_galore_states(state)]
    [1024]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from optax.contrib import GaLoreState as OptaxGaLoreState

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


def projector_bytes(state: Any) -> int:
    """Bytes of the projectors of every GaLore state inside ``state``: galorax's and
    ``optax.contrib``'s.

    Example:
        >>> import jax, jax.numpy as jnp, galorax
        >>> state = jax.eval_shape(galorax.galore(0.1, rank=4).init, {"w": jnp.zeros((64, 32))})
        >>> projector_bytes(state)  # a 64 x 4 f32 projector
        1024
    """
    is_optax = lambda x: isinstance(x, OptaxGaLoreState)  # noqa: E731
    optax_states = [s for s in jax.tree.leaves(state, is_leaf=is_optax) if is_optax(s)]
    return sum(tree_bytes(s.projector) for s in [*find_galore_states(state), *optax_states])


class MemoryPlan(NamedTuple):
    """Bytes of a training setup, by what holds them (:func:`plan_memory`).

    Attributes:
        weights: Parameter bytes.
        grads: Gradient bytes held at once (one per parameter, in its dtype, unless a
            per-layer step holds fewer).
        state: Optimizer state bytes (GaLore: moments, projectors, schedules).
        projectors: The part of ``state`` held by GaLore projectors.
    """

    weights: int
    grads: int
    state: int
    projectors: int

    @property
    def total(self) -> int:
        """Weights + gradients + optimizer state."""
        return self.weights + self.grads + self.state


def plan_memory(
    params: Any, tx: optax.GradientTransformation, *, grads: int | None = None
) -> MemoryPlan:
    """Bytes of ``params``, their gradients and ``tx``'s state, for any model and any
    optax transformation; ``params`` real or abstract (``jax.ShapeDtypeStruct``): nothing
    is allocated (``jax.eval_shape`` of ``tx.init``).

    Args:
        params: The parameters.
        tx: The optimizer.
        grads: Gradient bytes held at once, if not one gradient per parameter (a per-layer
            step holds one layer's).

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> params = {"w": jax.ShapeDtypeStruct((1024, 256), jnp.float32)}
        >>> plan = plan_memory(params, optax.adam(1e-3))
        >>> plan.weights, plan.state == 2 * plan.weights + 4, plan.total > 4 * plan.weights
        (1048576, True, True)
    """
    state = jax.eval_shape(tx.init, params)
    weights = tree_bytes(params)
    return MemoryPlan(
        weights=weights,
        grads=weights if grads is None else grads,
        state=tree_bytes(state),
        projectors=projector_bytes(state),
    )


class StepMemory(NamedTuple):
    """XLA's memory analysis of a compiled step, in bytes.

    Attributes:
        argument: Input buffers (params, state, batch).
        output: Output buffers.
        alias: Outputs written into donated inputs (counted once).
        temp: Temporaries (activations, gradients, SVD workspace...).
    """

    argument: int
    output: int
    alias: int
    temp: int

    @property
    def peak(self) -> int:
        """The bytes the step needs live at once: arguments + outputs - aliased + temps."""
        return self.argument + self.output - self.alias + self.temp

    def as_dict(self) -> dict[str, int]:
        """``argument``, ``output``, ``alias``, ``temp`` and ``peak``."""
        return {**self._asdict(), "peak": self.peak}


def step_memory(compiled: Any) -> StepMemory | None:
    """The memory record of a compiled program; None if the backend does not report it."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    return StepMemory(
        argument=int(m.argument_size_in_bytes),
        output=int(m.output_size_in_bytes),
        alias=int(m.alias_size_in_bytes),
        temp=int(m.temp_size_in_bytes),
    )


def compiled_memory(
    step: Callable[..., Any], *args: Any, donate_argnums: int | tuple[int, ...] = ()
) -> StepMemory:
    """XLA's memory analysis of ``step`` compiled for ``args`` (real or abstract: compile
    only, nothing runs or is allocated): the peak of the step you give it.

    Args:
        step: A train step (or any function).
        *args: Its arguments, e.g. ``jax.ShapeDtypeStruct`` trees.
        donate_argnums: Arguments the step overwrites (params, state): their outputs alias.

    Raises:
        RuntimeError: The backend reports no memory analysis.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x = jax.ShapeDtypeStruct((256, 256), jnp.float32)
        >>> compiled_memory(lambda x: x @ x, x).argument
        262144
    """
    compiled = jax.jit(step, donate_argnums=donate_argnums).lower(*args).compile()
    memory = step_memory(compiled)
    if memory is None:
        raise RuntimeError("this backend reports no memory analysis")
    return memory
