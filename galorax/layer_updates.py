"""Per-layer weight updates for ``lax.scan``-ned layer stacks: one layer's gradient at a time.

GaLore's 7B-on-one-24GB-GPU run updates each layer's weights as soon as its gradient is
ready, so the full gradient tree never exists. For a model whose layers are stacked along
a leading axis (``params[stack]``, applied with ``jax.lax.scan``), :func:`per_layer_step`
does that in JAX: the forward pass keeps each layer's input (as ``jax.checkpoint`` would),
the backward pass is a reverse scan over the layers, and each iteration recomputes one
layer, takes its gradient, updates that layer's weights and its slice of the optimizer
state in place, and drops the gradient. The parameters outside the stack (embeddings,
head, final norm) are updated at the end.

:func:`per_layer` is the same update as an ordinary ``GradientTransformation`` over a whole
gradient tree, with the same state: what ``init`` builds, the reference the per-layer step
equals (to f32 rounding), and a plain step for the same checkpoints.

Semantics that differ from a plain step, on purpose:

- **Clipping** (``max_grad_norm``) scales this step's gradients by the *previous* step's
  global norm, ``min(1, max_grad_norm / norm_prev)`` (the first step is not clipped): the
  current global norm is known only after the last layer has been updated.
- **Accumulation**: each call is one update of one batch; the full gradients are never
  summed. To accumulate, use a plain step with ``optax.MultiSteps`` (the memory of a whole
  gradient tree) or a larger batch with this step.
- **Non-finite values**: a non-finite loss leaves everything unchanged. A non-finite
  gradient leaves the layers it reaches (their weights and state slices) unchanged, while
  the layers already updated stay updated and the shared counters advance.

The base transformation must keep, for the stack, every state array either per layer
(layer axis first) or a scalar shared by all layers (a count); optax's and galorax's
transformations do (GaLore with the layer axis as a batch axis: each layer has its own
projector).

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> params = {"w_in": jnp.ones((3, 4)), "layers": {"w": jnp.ones((2, 4, 4)) * 0.1}}
    >>> embed = lambda outer, x: x @ outer["w_in"]
    >>> layer = lambda lp, h: jnp.tanh(h @ lp["w"])
    >>> head = lambda outer, h, x: jnp.mean(h**2)
    >>> tx = per_layer(optax.adam(1e-2))
    >>> state = tx.init(params)
    >>> step = jax.jit(per_layer_step(tx, embed, layer, head))
    >>> loss, params, state = step(params, state, jnp.ones((5, 3)))
    >>> loss.shape, params["layers"]["w"].shape
    ((), (2, 4, 4))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from galorax.chunking import WHOLE, loop_variant
from galorax.layer_stack import forward_layers, n_layers, put_layer, take_layer, unstack
from galorax.quantization.blockwise import is_quantized, lead_axes
from galorax.reductions import tree_all_finite, tree_sum_squares
from galorax.step_gate import StepGate

__all__ = [
    "PerLayerState",
    "PerLayerTransformation",
    "per_layer",
    "per_layer_step",
    "put_layer",
    "take_layer",
]


class PerLayerState(NamedTuple):
    """State of :func:`per_layer`.

    Attributes:
        outer: The base transformation's state for the parameters outside the stack (the
            stack's leaves masked, as ``optax.masked`` leaves them).
        layers: Its state for the stack (everything else masked); per-layer arrays have the
            layer axis first.
        grad_norm: Global norm of the last step's gradients (f32; 0 before the first step),
            what the next step clips by; not finite if some of its gradients were not (the
            next step is then not clipped).
    """

    outer: optax.OptState
    layers: optax.OptState
    grad_norm: jax.Array


class PerLayerTransformation(optax.GradientTransformation):
    """A :func:`per_layer` transformation; it carries its settings for :func:`per_layer_step`
    as the attributes ``inner``, ``stack`` and ``max_grad_norm``."""

    inner: optax.GradientTransformation
    stack: str
    max_grad_norm: float | None


def _masked(tree: Any) -> Any:
    return jax.tree.map(lambda _: optax.MaskedNode(), tree)


def split_stack(tree: dict[str, Any], stack: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``tree`` twice: with the ``stack`` subtree masked, and with all but it masked.

    Example:
        >>> outer, layers = split_stack({"a": 1.0, "layers": {"w": 2.0}}, "layers")
        >>> outer["layers"]["w"], layers["a"]
        (MaskedNode(), MaskedNode())
    """
    if not isinstance(tree, dict) or stack not in tree:
        keys = list(tree) if isinstance(tree, dict) else type(tree).__name__
        raise ValueError(
            f"per-layer updates need a dict of params with the layer stack under "
            f"stack={stack!r}; got {keys}: pass stack= the key of the stacked layers."
        )
    outer = {k: _masked(v) if k == stack else v for k, v in tree.items()}
    layers = {k: v if k == stack else _masked(v) for k, v in tree.items()}
    return outer, layers


def merge_masked(a: Any, b: Any) -> Any:
    """The leaves of ``a``, with ``b``'s where ``a`` holds a ``MaskedNode``.

    Example:
        >>> merge_masked({"x": optax.MaskedNode(), "y": 1}, {"x": 2, "y": optax.MaskedNode()})
        {'x': 2, 'y': 1}
    """
    is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    return jax.tree.map(lambda x, y: y if is_masked(x) else x, a, b, is_leaf=is_masked)


def clip_scale(prev_norm: jax.Array, max_grad_norm: float | None) -> jax.Array:
    """The factor this step's gradients get: ``min(1, max_grad_norm / prev_norm)``.

    Example:
        >>> float(clip_scale(jnp.float32(4.0), 1.0)), float(clip_scale(jnp.float32(0.0), 1.0))
        (0.25, 1.0)
    """
    if max_grad_norm is None:
        return jnp.ones([], jnp.float32)
    # A non-finite norm (its step's non-finite layers were kept) does not clip.
    clip = jnp.isfinite(prev_norm) & (prev_norm > max_grad_norm)
    safe = jnp.where(clip, prev_norm, 1.0)
    return jnp.where(clip, max_grad_norm / safe, 1.0).astype(jnp.float32)


def _scaled(tree: Any, scale: jax.Array) -> Any:
    return jax.tree.map(lambda g: (g * scale).astype(g.dtype), tree)


def _shared_from(tree: Any, part: Any) -> Any:
    """``tree`` with its scalars taken from ``part`` (one layer's new state)."""
    return jax.tree.map(
        lambda x, p: p if not is_quantized(x) and jnp.ndim(x) == 0 else x,
        tree,
        part,
        is_leaf=is_quantized,
    )


def check_layer_state(state: Any, n: int) -> None:
    """A ``ValueError`` naming a state array that is neither per layer (layer axis first)
    nor a scalar, so one layer's slice of it cannot be updated on its own."""
    for path, x in jax.tree_util.tree_leaves_with_path(state, is_leaf=is_quantized):
        shape = tuple(x.shape)
        per_layer_ok = len(shape) >= 1 and shape[0] == n
        if is_quantized(x):
            per_layer_ok &= lead_axes(shape, x.block_size) >= 1
        if shape and not per_layer_ok and is_quantized(x) and shape[0] == n:
            raise ValueError(
                f"per-layer updates: the quantized state {jax.tree_util.keystr(path)} of shape "
                f"{shape} has blocks that span layers (block_size={x.block_size}); raise the "
                "8-bit optimizer's min_8bit_size above its size or lower its block_size."
            )
        if shape and not per_layer_ok:
            raise ValueError(
                f"per-layer updates: optimizer state {jax.tree_util.keystr(path)} has shape "
                f"{shape}, neither a scalar nor per layer (leading axis {n}); use a "
                "base transformation whose state follows the params' shapes."
            )


def per_layer(
    tx: optax.GradientTransformation,
    *,
    stack: str = "layers",
    max_grad_norm: float | None = None,
) -> PerLayerTransformation:
    """``tx`` with per-layer semantics, as a whole-tree transformation (see the module).

    Args:
        tx: The base transformation, as for the whole params tree (GaLore's dimension
            numbers included: a tree for the whole params works).
        stack: The key of ``params`` holding the stacked layers.
        max_grad_norm: Clip by the previous step's global gradient norm; None: no clipping.

    Returns:
        A :class:`PerLayerTransformation` whose state is a :class:`PerLayerState`.
    """
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}.")

    def init_fn(params: Any) -> PerLayerState:
        outer, layers = split_stack(params, stack)
        layer_state = tx.init(layers)
        check_layer_state(layer_state, n_layers(params[stack]))
        return PerLayerState(tx.init(outer), layer_state, jnp.zeros([], jnp.float32))

    def update_fn(updates: Any, state: PerLayerState, params: Any = None) -> tuple[Any, Any]:
        norm = optax.global_norm(updates).astype(jnp.float32)
        grads_o, grads_l = split_stack(
            _scaled(updates, clip_scale(state.grad_norm, max_grad_norm)), stack
        )
        params_o, params_l = (None, None) if params is None else split_stack(params, stack)
        upd_o, state_o = tx.update(grads_o, state.outer, params_o)
        upd_l, state_l = tx.update(grads_l, state.layers, params_l)
        return merge_masked(upd_o, upd_l), PerLayerState(state_o, state_l, norm)

    out = PerLayerTransformation(init_fn, update_fn)
    out.inner, out.stack, out.max_grad_norm = tx, stack, max_grad_norm
    return out


def _update_outer(
    inner: optax.GradientTransformation,
    stack: str,
    grads: Any,
    state: Any,
    outer: Any,
    masked_stack: Any,
    ok: jax.Array,
) -> tuple[Any, Any]:
    """The parameters outside the stack, updated (unless their gradients or the loss are
    not finite), and their state; galorax's transforms skip in place (:mod:`galorax.step_gate`)."""
    gate = StepGate(ok & tree_all_finite(grads, WHOLE))
    upd, new_state = optax.with_extra_args_support(inner).update(
        {**grads, stack: masked_stack}, state, {**outer, stack: masked_stack}, gate=gate
    )
    new_outer = optax.apply_updates(outer, {k: upd[k] for k in outer})
    return gate.keep((new_outer, new_state), (outer, state))


def per_layer_step(
    tx: PerLayerTransformation,
    embed_fn: Callable[[Any, Any], jax.Array],
    layer_fn: Callable[[Any, jax.Array], jax.Array],
    head_fn: Callable[[Any, jax.Array, Any], jax.Array],
) -> Callable[[Any, PerLayerState, Any], tuple[jax.Array, Any, PerLayerState]]:
    """A train step ``(params, state, batch) -> (loss, params, state)`` that updates each
    layer of the stack as its gradient is ready (see the module); jit it, donating params
    and state, so the updates are written in place.

    The loss is ``head_fn(outer, x_L, batch)`` where ``x_{l+1} = layer_fn(layer_l, x_l)``
    over the stack's layers and ``x_0 = embed_fn(outer, batch)``; ``outer`` is ``params``
    without the stack key. The same update as ``tx`` on the gradient of that loss.

    Args:
        tx: From :func:`per_layer`; ``state`` is its ``init(params)``.
        embed_fn: ``(outer, batch) -> x_0``.
        layer_fn: ``(one layer's params, x) -> x`` (the scanned body).
        head_fn: ``(outer, x_L, batch) -> scalar loss``.
    """
    inner, stack = tx.inner, tx.stack

    def step(params: Any, state: PerLayerState, batch: Any) -> tuple[jax.Array, Any, PerLayerState]:
        outer = {k: v for k, v in params.items() if k != stack}
        n = n_layers(params[stack])
        x0, embed_vjp = jax.vjp(lambda o: embed_fn(o, batch), outer)
        x, inputs = forward_layers(layer_fn, x0, params[stack])
        loss, head_vjp = jax.vjp(lambda o, h: head_fn(o, h, batch), outer, x)
        grads_head, dx = head_vjp(jnp.ones_like(loss))
        scale, ok = clip_scale(state.grad_norm, tx.max_grad_norm), jnp.isfinite(loss)
        masked_outer = _masked(outer)

        def backward(carry: Any, xs: Any) -> tuple[Any, None]:
            layers, layer_state, dx, _, sq = carry
            x_in, i = xs
            # Read and write the stack behind the same barrier: the write is then in
            # place (written into the original, XLA copies the whole stack each layer).
            layers, i = loop_variant(layers, i)
            p1 = take_layer(layers, i)
            _, layer_vjp = jax.vjp(layer_fn, unstack(p1), x_in)
            g, dx = layer_vjp(dx)
            g1 = jax.tree.map(lambda a: a[None], _scaled(g, scale))
            s1 = take_layer(layer_state, i)
            # Selected, not gated: the shared counters advance (s1_new is carried on).
            # Whole reductions: in chunks, 1b GaLore per-layer 6.64 -> 6.81 GB (XLA fuses
            # these into the layer's backward pass; a chunk loop materializes its input).
            gate = StepGate(ok & tree_all_finite(g, WHOLE))
            upd, s1_new = inner.update({**masked_outer, stack: g1}, s1, {**masked_outer, stack: p1})
            p1_new = gate.keep(optax.apply_updates(p1, upd[stack]), p1)
            layer_state = put_layer(layer_state, i, gate.keep(s1_new, s1))
            sq = sq + tree_sum_squares(g, WHOLE)
            return (put_layer(layers, i, p1_new), layer_state, dx, s1_new, sq), None

        first = take_layer(state.layers, 0)
        carry = (params[stack], state.layers, dx, first, jnp.zeros([]))
        carry, _ = jax.lax.scan(backward, carry, (inputs, jnp.arange(n)), reverse=True)
        layers, layer_state, dx, last, sq = carry
        # The shared scalars (counts) advance once, unless the loss was not finite.
        layer_state = _shared_from(layer_state, optax.tree_utils.tree_where(ok, last, first))
        (grads_embed,) = embed_vjp(dx)
        grads = jax.tree.map(jnp.add, grads_head, grads_embed)
        norm = jnp.sqrt(sq + tree_sum_squares(grads, WHOLE))
        new_outer, outer_state = _update_outer(
            inner, stack, _scaled(grads, scale), state.outer, outer, _masked(layers), ok
        )
        grad_norm = jnp.where(ok, norm, state.grad_norm)
        new_state = PerLayerState(outer_state, layer_state, grad_norm)
        return loss, {**new_outer, stack: layers}, new_state

    return step
