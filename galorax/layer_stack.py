"""Stacked layers (a ``lax.scan``-ned model's ``params["layers"]``, layer axis first), one
layer at a time: :func:`take_layer` / :func:`put_layer`, :func:`read_layer` inside a layer
loop, and :func:`scan_layers`, the rematerialized forward pass over a stack.

Reading a layer inside a loop goes through :func:`galorax.chunking.loop_variant`: CPU XLA
computes a bf16 dynamic slice in f32 and, for a loop-invariant stack, hoists that upcast
out of the loop, a whole-stack f32 copy; read this way only the layer is touched. A plain
``jax.lax.scan`` over a bf16 stack keeps such copies (BENCHMARKS.md, "one layer at a
time": the 7b per-layer step went from 32.76 to 21.45 GB).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from galorax.chunking import loop_variant
from galorax.quantization.blockwise import is_quantized

__all__ = [
    "forward_layers",
    "n_layers",
    "put_layer",
    "read_layer",
    "scan_layers",
    "take_layer",
    "unstack",
]


def _slice(x: jax.Array, i: Any) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, i, 1, axis=0)


def _put(x: jax.Array, part: jax.Array, i: Any) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(x, part.astype(x.dtype), i, axis=0)


def take_layer(tree: Any, i: Any) -> Any:
    """Layer ``i`` of a stacked tree, keeping a layer axis of size 1; scalars as they are.

    :class:`~galorax.QuantizedArray` leaves are cut along their codes and scales.

    Example:
        >>> take_layer({"w": jnp.arange(6.0).reshape(3, 2), "count": jnp.int32(7)}, 1)
        {'count': Array(7, dtype=int32), 'w': Array([[2., 3.]], dtype=float32)}
    """

    def take(x: Any) -> Any:
        if is_quantized(x):
            codes, scales = _slice(x.codes, i), _slice(x.scales, i)
            return dataclasses.replace(x, codes=codes, scales=scales, shape=(1, *x.shape[1:]))
        return x if jnp.ndim(x) == 0 else _slice(x, i)

    return jax.tree.map(take, tree, is_leaf=is_quantized)


def put_layer(tree: Any, i: Any, part: Any) -> Any:
    """``tree`` with layer ``i`` replaced by ``part`` (from :func:`take_layer`); scalars
    are left as they are in ``tree``.

    Example:
        >>> w = put_layer({"w": jnp.zeros((3, 2))}, 2, {"w": jnp.ones((1, 2))})["w"]
        >>> w.sum(axis=1).tolist()
        [0.0, 0.0, 2.0]
    """

    def put(x: Any, p: Any) -> Any:
        if is_quantized(x):
            return dataclasses.replace(
                x, codes=_put(x.codes, p.codes, i), scales=_put(x.scales, p.scales, i)
            )
        return x if jnp.ndim(x) == 0 else _put(x, p, i)

    return jax.tree.map(put, tree, part, is_leaf=is_quantized)


def read_layer(stack: Any, i: jax.Array) -> Any:
    """:func:`take_layer` for a loop body (the loop's index ``i``): only layer ``i`` is
    read, with no whole-stack copy (see the module).

    Example:
        >>> stack = {"w": jnp.arange(6.0, dtype=jnp.bfloat16).reshape(3, 2)}
        >>> jax.lax.map(lambda i: read_layer(stack, i)["w"][0], jnp.arange(3)).tolist()
        [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    """
    return take_layer(*loop_variant(stack, i))


def unstack(layer: Any) -> Any:
    """One layer from :func:`take_layer` without its layer axis of size 1."""
    return jax.tree.map(lambda a: a[0], layer)


def n_layers(stack: Any) -> int:
    """The stack's layer count: every leaf's leading size (a ``ValueError`` if they differ).

    Example:
        >>> n_layers({"w": jnp.zeros((4, 2, 2)), "b": jnp.zeros((4, 2))})
        4
    """
    sizes = {int(x.shape[0]) if jnp.ndim(x) else -1 for x in jax.tree.leaves(stack)}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(
            f"a layer stack needs the same leading layer axis on every leaf; got leading "
            f"sizes {sorted(map(str, sizes))}: stack only per-layer arrays under the stack key."
        )
    return next(iter(sizes))


def scan_layers(layer_fn: Callable[[Any, jax.Array], jax.Array], x: jax.Array, stack: Any) -> Any:
    """``x_L`` where ``x_{l+1} = layer_fn(layer_l, x_l)`` over the layers of ``stack``:
    ``jax.lax.scan`` with each layer rematerialized (``jax.checkpoint``), whose forward and
    backward loops read one layer at a time (:func:`read_layer`).

    The same values and gradients as a rematerialized scan; its gradient for ``stack`` is
    one stacked array per leaf, written layer by layer. ``layer_fn`` must be hashable (a
    function, not a traced value) and close over no traced values.

    Example:
        >>> stack = {"w": jnp.full((3, 2, 2), 0.5)}
        >>> f = lambda s, x: scan_layers(lambda lp, h: jnp.tanh(h @ lp["w"]), x, s).sum()
        >>> g = jax.grad(f)(stack, jnp.ones((1, 2)))
        >>> g["w"].shape
        (3, 2, 2)
    """
    return _scan_layers(layer_fn, x, stack)


def forward_layers(
    layer_fn: Callable[[Any, jax.Array], jax.Array], x: jax.Array, stack: Any
) -> tuple[jax.Array, jax.Array]:
    """``(x_L, inputs)``: the forward pass of :func:`scan_layers` and each layer's input
    stacked (what a rematerialized backward pass keeps), reading one layer at a time.

    Example:
        >>> y, inputs = forward_layers(lambda lp, h: h * lp, jnp.ones(2), jnp.arange(1.0, 4.0))
        >>> y.tolist(), inputs[:, 0].tolist()
        ([6.0, 6.0], [1.0, 1.0, 2.0])
    """
    step = lambda h, i: (layer_fn(unstack(read_layer(stack, i)), h), h)  # noqa: E731
    return jax.lax.scan(step, x, jnp.arange(n_layers(stack)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan_layers(layer_fn: Callable[..., jax.Array], x: jax.Array, stack: Any) -> jax.Array:
    return forward_layers(layer_fn, x, stack)[0]


def _scan_layers_fwd(layer_fn: Callable[..., jax.Array], x: jax.Array, stack: Any) -> Any:
    y, inputs = forward_layers(layer_fn, x, stack)
    return y, (inputs, stack)


def _scan_layers_bwd(layer_fn: Callable[..., jax.Array], res: Any, dy: jax.Array) -> Any:
    inputs, stack = res

    def step(dx: jax.Array, xs: Any) -> tuple[jax.Array, Any]:
        x_in, i = xs
        _, vjp = jax.vjp(layer_fn, unstack(read_layer(stack, i)), x_in)
        g, dx = vjp(dx)
        return dx, g

    dx, grads = jax.lax.scan(step, dy, (inputs, jnp.arange(n_layers(stack))), reverse=True)
    return dx, grads


_scan_layers.defvjp(_scan_layers_fwd, _scan_layers_bwd)
