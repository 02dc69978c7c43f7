"""APOLLO and APOLLO-Mini: SGD-like memory, AdamW-level updates (Zhu et al., MLSys 2025).

``scale_by_apollo`` keeps Adam's moments on a random rank-``r`` projection of each weight's
gradient and turns them into a per-channel (or, APOLLO-Mini, per-matrix) scale of the raw
gradient; ``apollo`` / ``apollo_mini`` chain it with decoupled weight decay and the learning
rate, as ``galorax.galore``. Built on GaLore's pieces: leaves become matrices by the same
dimension numbers (batch axes: one projection and one set of moments per layer of a stack),
the work runs through the same executor (:mod:`galorax.chunking`: a stacked leaf a chunk of
layers at a time, 8-bit moments with ``moment_bits=8``), a train step's
:class:`galorax.StepGate` skips it in place, explicit meshes run it in automatic axes.

Choices, with their reason:

* **Which side**: ``side="std"`` (apollo-torch's and galore-torch's default): the short side
  is projected, so the channels kept (and scaled one by one) are the long side's.
* **The projection** is Gaussian, ``N(0, 1/r)``, drawn from a counter-based key (the seed,
  the projected side's size, the refresh number ``count // update_proj_gap``) every step,
  never stored: its state is the moments, the count and the limiter's last norm per
  matrix. One matrix per size of the projected side, shared by every layer of a stack (a
  per-layer step, :func:`galorax.per_layer`, draws the same one) and every leaf of that
  size: a draw costs as much as Adam's whole step on CPU (7 matrices of a 1B layer at rank
  512: 166 ms, Adam 77 ms), one per size costs a seventh of it.
* **Moments at a re-draw** are kept (apollo-torch's choice): they only estimate a scale.
* **Bias correction, epsilon and the limiter** are apollo-torch 1.0.3's: ``eps`` outside the
  square root of the uncorrected second moment, the scale from uncorrected moments, the
  limiter (``growth=1.01``, Fira's; None: off) on the scaled gradient, then ``sqrt(scale)``
  and ``sqrt(1 - b2^t) / (1 - b1^t)``. Leaves that are not projected (vectors, leaves
  without dimension numbers) get that same Adam in full.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import galorax
    >>> solver = galorax.apollo(learning_rate=0.01, rank=4)
    >>> params = {'w': jnp.ones((32, 16)), 'b': jnp.zeros(16)}
    >>> state = solver.init(params)
    >>> state[0].mu['w'].shape  # rank-4 moments of the 32 x 16 weight
    (32, 4)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = solver.update(grads, state, params)
    >>> jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, params)
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from galorax import apollo_math, placement, projector
from galorax.chunking import Chunking, buffer_after, map_slices, map_stored
from galorax.compat import as_plain, rebox
from galorax.dimension_numbers import GaLoreDimNumsOrFn, check_same_tree, is_masked
from galorax.leaf import LeafProjector, make_projectors, map_leaves
from galorax.options import galore_options, with_keywords_of
from galorax.quantization.blockwise import quantized_zeros
from galorax.step_gate import gate_of

__all__ = ["ApolloState", "apollo", "apollo_mini", "scale_by_apollo"]

#: Moments of fewer elements than this stay f32 under ``moment_bits=8`` (as 8-bit Adam's).
_MIN_8BIT_SIZE = 4096


class ApolloState(NamedTuple):
    """State of :func:`scale_by_apollo`.

    Attributes:
        count: Updates so far (int32); with the seed, it keys the random projections.
        mu: Adam's first moments: low-rank for projected leaves, ``(*batch, r, n)`` or
            ``(*batch, m, r)``, else like the param; f32, or 8-bit with ``moment_bits=8``.
        nu: The second moments, laid out as ``mu``.
        norm: The norm-growth limiter's last norm per matrix (batch-shaped) of each
            projected leaf; ``optax.MaskedNode()`` elsewhere.
    """

    count: jax.Array  # type: ignore[assignment]
    mu: optax.Updates
    nu: optax.Updates
    norm: optax.Updates


def scale_by_apollo(
    rank: int = 256,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    weight_dimension_numbers: GaLoreDimNumsOrFn | None = None,
    *,
    scale_type: Literal["channel", "tensor"] = "channel",
    side: Literal["auto", "std", "reverse_std", "left", "right"] = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    growth: float | None = 1.01,
    seed: int = 0,
    moment_bits: int | None = None,
    chunking: Chunking | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Scale updates by APOLLO: Adam on a random projection, as a scale of the raw gradient.

    Args:
        rank: Rank of the random projection (clipped to ``min(m, n)`` per matrix).
        update_proj_gap: Steps between draws of a new projection.
        scale: The update is multiplied by ``sqrt(scale)`` (APOLLO-Mini: 128).
        weight_dimension_numbers: How weights become matrices, as :func:`galorax.galore`'s
            (None: 2-D leaves only; :func:`galorax.dimension_numbers_from_rules` for
            stacked layers).
        scale_type: ``"channel"``: one factor per channel (the side the projection keeps);
            ``"tensor"``: one per matrix (APOLLO-Mini).
        side: Which side is projected, galore-torch's ``proj_type`` names (``"std"``: the
            short one).
        b1: Decay of the first moment.
        b2: Decay of the second moment.
        eps: Added to the second moment's square root (apollo-torch's default, 1e-6).
        growth: The norm-growth limiter's largest growth per step (Fira's 1.01); None: off.
        seed: Seed of the random projections.
        moment_bits: None (f32 moments) or 8 (block-wise 8-bit, as 8-bit Adam's).
        chunking: How a stacked leaf is updated in bounded chunks (:class:`galorax.Chunking`).

    Returns:
        A ``GradientTransformationExtraArgs`` whose state is an :class:`ApolloState`.
    """
    if scale_type not in ("channel", "tensor"):
        raise ValueError(f"scale_type must be 'channel' or 'tensor', got {scale_type!r}.")
    if isinstance(moment_bits, jax.Array):
        raise TypeError(
            "`moment_bits` is static: under optax.inject_hyperparams pass "
            "static_args=('rank', 'update_proj_gap', 'moment_bits')."
        )
    if moment_bits not in (None, 8):
        raise ValueError(f"moment_bits must be None or 8, got {moment_bits!r}.")
    if isinstance(growth, int | float) and not growth >= 1.0:  # (a traced one: unchecked)
        raise ValueError(f"growth must be >= 1 or None, got {growth!r}.")
    # The leaves' facts as GaLore decides them (same dimension numbers, sides, ranks).
    opts = galore_options(rank, update_proj_gap, scale, side=side, stagger=False, chunking=chunking)
    hyper = _Hyper(b1, b2, eps, growth, seed, scale_type == "channel", opts.chunking)

    def init_fn(params: optax.Params) -> ApolloState:
        plain = as_plain(params)
        leaves = make_projectors(plain, weight_dimension_numbers, opts)
        mu, nu, norm = map_leaves(leaves, lambda leaf, p: _zeros(leaf, p, moment_bits), plain)
        return ApolloState(jnp.zeros([], jnp.int32), mu, nu, norm)

    def update_fn(
        updates: optax.Updates,
        state: ApolloState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ApolloState]:
        del params
        grads = as_plain(updates)
        check_same_tree(grads, state.norm)
        leaves = make_projectors(grads, weight_dimension_numbers, opts)
        gate = gate_of(extra_args)  # a step that may be skipped: skip in place
        keep = None if gate is None else gate.finite
        count = optax.safe_int32_increment(state.count)
        factor = apollo_math.bias_correction(count, b1, b2) * jnp.sqrt(jnp.float32(scale))

        def one(leaf: LeafProjector | None, g: Any, mu: Any, nu: Any, prev: Any) -> tuple:
            if is_masked(g):
                return g, mu, nu, prev
            if leaf is None:
                return _full_adam(hyper, g, mu, nu, factor, keep)
            return _projected(hyper, leaf, g, mu, nu, prev, state.count, factor, keep)

        out, mu, nu, norm = map_leaves(leaves, one, grads, state.mu, state.nu, state.norm)
        norm = norm if gate is None else gate.keep(norm, state.norm)
        count = count if keep is None else jnp.where(keep, count, state.count)
        new_state = ApolloState(count, mu, nu, norm)
        return rebox(updates, out), new_state if gate is None else gate.cover(new_state)

    return optax.GradientTransformationExtraArgs(init_fn, placement.auto_axes_update(update_fn))


class _Hyper(NamedTuple):
    b1: float
    b2: float
    eps: float
    growth: float | None
    seed: int
    per_channel: bool
    chunking: Chunking


def _zeros(leaf: LeafProjector | None, param: Any, bits: int | None) -> tuple[Any, Any, Any]:
    """``(mu, nu, norm)`` of one leaf, placed like ``param`` on a mesh."""
    if is_masked(param):
        return param, param, param
    if leaf is None:  # the param's dtype, as optax.adamw's and GaLore's full-rank moments
        shape, spec, norm = param.shape, None, optax.MaskedNode()
    else:
        specs = placement.galore_leaf_specs(param, leaf.view, leaf.left, leaf.rank) or {}
        shape, spec = leaf.low_shape, specs.get("low")
        batch = jnp.zeros(leaf.view.batch_shape, jnp.float32)
        norm = placement.place(batch, param, specs.get("batch"))

    def moment(signed: bool) -> Any:
        if bits is not None and math.prod(shape) >= _MIN_8BIT_SIZE:
            return quantized_zeros(shape, jnp.float32, signed=signed)
        if leaf is None:
            return placement.like(jnp.zeros(shape, param.dtype), param)
        return placement.place(jnp.zeros(shape, jnp.float32), param, spec)

    return moment(True), moment(False), norm


def _full_adam(hyper: _Hyper, g: Any, mu: Any, nu: Any, factor: Any, keep: Any) -> tuple:
    """An unprojected leaf: apollo-torch's Adam in full (8-bit moments in chunks, in place)."""

    def step(bufs: tuple[Any, ...], _: Any) -> tuple[Any, ...]:
        g, mu, nu = bufs  # the math in f32, stored back in each buffer's dtype
        mu, nu = apollo_math.adam_moments(g, mu, nu, hyper.b1, hyper.b2)
        u = mu / (jnp.sqrt(nu) + hyper.eps) * factor
        return u.astype(g.dtype), mu, nu

    u, mu, nu = map_stored(
        step, (g, mu, nu), (), keep, isolate=True, skip_by="select", settings=hyper.chunking
    )
    return u, mu, nu, optax.MaskedNode()


def _projected(
    hyper: _Hyper,
    leaf: LeafProjector,
    g: Any,
    mu: Any,
    nu: Any,
    prev: Any,
    steps: Any,
    factor: Any,
    keep: Any,
) -> tuple:
    """A projected leaf: (1) draw the projection, (2) project, taking each channel's sum of
    squares in the same pass, (3) Adam's moments of the low-rank gradient, (4) the scale of
    each channel, limited, (5) the scaled raw gradient, written over the gradient; the
    gradient's passes a chunk of a stack's layers at a time."""
    g2 = projector.as_matrices(leaf, g)
    rows = leaf.proj_shape[-2]
    # One projection per row count and draw: every layer of a stack and every leaf of
    # the same rows share it (a draw of rows x r normals costs as much as Adam's step).
    key = jax.random.fold_in(jax.random.key(hyper.seed), rows)
    key = jax.random.fold_in(key, steps // leaf.options.update_proj_gap)
    p = apollo_math.random_projection(key, (), rows, leaf.rank)
    size, channel = leaf.chunk_bytes(g.dtype), (leaf.left, hyper.per_channel)

    def project(_: Any, reads: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        g2, p = reads
        low = apollo_math.project(g2.astype(jnp.float32), p, left=leaf.left)
        return low, apollo_math.channel_squares(g2, left=channel[0], per_channel=channel[1])

    shape = (1, leaf.view.n) if leaf.left else (leaf.view.m, 1)
    bufs = (
        buffer_after(leaf.low_shape, jnp.float32, g2),
        buffer_after((*leaf.view.batch_shape, *shape), jnp.float32, g2),
    )
    if not hyper.per_channel:
        bufs = (bufs[0], jnp.zeros((*leaf.view.batch_shape, 1, 1), jnp.float32))
    p_all = jnp.broadcast_to(p, leaf.proj_shape)
    low, squares = map_slices(project, bufs, (g2, p_all), leaf.n_batch, size, None, hyper.chunking)

    def moments(bufs: tuple[Any, Any, Any], low: jax.Array) -> tuple[Any, Any, Any]:
        mu, nu = apollo_math.adam_moments(low, *bufs[:2], hyper.b1, hyper.b2)
        normalized = mu / (jnp.sqrt(nu) + hyper.eps)
        return mu, nu, apollo_math.scaling(normalized, low, left=channel[0], per_channel=channel[1])

    # The scale is taken chunk by chunk with the moments: 8-bit moments are never all f32.
    # Chunks of layers only: a scale reads every row of its matrix's moments.
    state = (mu, nu, buffer_after(squares.shape, jnp.float32, low))
    mu, nu, s = map_stored(
        moments, state, low, keep, split=leaf.n_batch > 0, skip_by="select", settings=hyper.chunking
    )
    if hyper.growth is not None:
        s, prev = apollo_math.limit_growth(s, squares, prev, hyper.growth)

    def scaled(g2: jax.Array, reads: tuple[jax.Array]) -> jax.Array:
        return (g2.astype(jnp.float32) * reads[0]).astype(g.dtype)

    full = map_slices(scaled, g2, (s * factor,), leaf.n_batch, size, None, hyper.chunking)
    return leaf.view.from_matrix(full), mu, nu, prev


@with_keywords_of(scale_by_apollo)
def apollo(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 256,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    weight_decay: jax.typing.ArrayLike = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    weight_dimension_numbers: GaLoreDimNumsOrFn | None = None,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    """APOLLO: ``chain(scale_by_apollo, add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate))``, as :func:`galorax.galore`. Keyword-only
    arguments (``scale_type``, ``side``, ``b1``, ``b2``, ``eps``, ``growth``, ``seed``,
    ``moment_bits``, ``chunking``) go to :func:`scale_by_apollo`.
    """
    return optax.chain(
        scale_by_apollo(rank, update_proj_gap, scale, weight_dimension_numbers, **kwargs),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


@with_keywords_of(scale_by_apollo)
def apollo_mini(
    learning_rate: optax.ScalarOrSchedule,
    update_proj_gap: int = 200,
    weight_decay: jax.typing.ArrayLike = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    weight_dimension_numbers: GaLoreDimNumsOrFn | None = None,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    """APOLLO-Mini: :func:`apollo` with rank 1, one scale per matrix and the paper's
    ``scale=128`` (both keyword-overridable), a third of GaLore's state or less.

    Example:
        >>> import jax.numpy as jnp
        >>> state = apollo_mini(0.01).init({'w': jnp.ones((64, 32))})
        >>> state[0].mu['w'].shape
        (64, 1)
    """
    kwargs = {"scale_type": "tensor", "scale": 128.0, **kwargs}
    scale = kwargs.pop("scale")
    return apollo(
        learning_rate,
        1,
        update_proj_gap,
        scale,
        weight_decay,
        mask,
        weight_dimension_numbers,
        **kwargs,
    )
