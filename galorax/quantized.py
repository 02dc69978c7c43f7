"""Block-wise quantization and an 8-bit Adam (optax ``GradientTransformation``).

Three pieces:

* :func:`quantize_blockwise` / :func:`dequantize_blockwise`: an array becomes ``uint8`` codes
  (two 4-bit codes per byte when ``bits=4``) plus one ``float32`` absmax scale per block. The
  code is either the *dynamic* (non-linear, "dynamic tree") map of 8-bit Adam
  (Dettmers et al., 2022, arXiv 2110.02861), which spends its levels on orders of magnitude
  like a float does, or a *linear* (uniform) map, which suits near-Gaussian data such as
  projector matrices.
* :func:`scale_by_adam_8bit` / :func:`adamw_8bit`: Adam whose first moment (signed dynamic
  code) and second moment (unsigned dynamic code) are stored quantized between steps, with
  per-block scales; small tensors stay ``float32``. About 2 bytes of state per parameter
  instead of 8.
* :func:`quantize_projector` / :func:`projector_error`: opt-in int8 / int4 storage of GaLore
  projectors, and the error measurements that decide whether it pays.

Blocks. A tensor of shape ``lead + trail`` is cut into *rows*, where ``trail`` is the fewest
trailing axes whose product reaches ``block_size`` (all axes for a small tensor); each row is
split into ``ceil(row / block_size)`` blocks of equal length (at most ``block_size``). Codes keep
the tensor's own shape (8-bit) and the scales have shape ``lead + (blocks_per_row,)``, so the
leading axes (a stacked layer axis, a sharded axis) stay intact and no padding is stored.

The container :class:`QuantizedArray` is a pytree whose *leaves are only arrays* (``codes``,
``scales``); its shape, dtype and code are static pytree metadata. Hence it jits without
recompilation, ``jax.eval_shape`` sizes it, and orbax checkpoints it like any array tree.

Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.linspace(-1.0, 1.0, 1000).reshape(10, 100)
    >>> q = quantize_blockwise(x, block_size=256)
    >>> q.codes.dtype, q.codes.shape, q.scales.shape
    (dtype('uint8'), (10, 100), (4,))
    >>> bool(jnp.max(jnp.abs(dequantize_blockwise(q) - x)) < 0.01)
    True
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

Code = Literal["dynamic", "linear"]

_DEFAULT_BLOCK_SIZE = 256
_DEFAULT_MIN_8BIT_SIZE = 4096


# --------------------------------------------------------------------------------------------
# Code tables
# --------------------------------------------------------------------------------------------


@functools.cache
def dynamic_code(bits: int = 8, signed: bool = True) -> np.ndarray:
    """The dynamic (dynamic-tree) quantization map of 8-bit Adam, sorted, in ``[-1, 1]``.

    Same construction as ``bitsandbytes.functional.create_dynamic_map`` with
    ``max_exponent_bits = bits - 1``: for each decade ``10**(e - bits + 2)`` (``e = 0 ..
    bits - 2``) the interval ``[0.1, 1]`` is split into ``2**e`` (signed) or ``2**(e + 1)``
    (unsigned) linear steps whose midpoints become levels, mirrored for the sign; then 0 and 1
    are added. Levels are dense near 1 and sparse but present down to ``~1e-7`` (8-bit), so
    small moments keep a relative rather than absolute precision.

    Args:
        bits: 8 or 4.
        signed: Signed map (first moment) or unsigned map (second moment, twice the levels).

    Returns:
        ``2**bits`` sorted ``float32`` levels.

    Example:
        >>> c = dynamic_code(8, signed=True)
        >>> c.shape, float(c[-1]), float(c.min()) > -1.0
        ((256,), 1.0, True)
    """
    _check_bits(bits)
    levels: list[float] = []
    n = bits - 1  # non-sign bits; bitsandbytes uses max_exponent_bits = n as well
    for e in range(n):
        items = 2 ** (e + (0 if signed else 1)) + 1
        bounds = np.linspace(0.1, 1.0, items)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        decade = 10.0 ** (-(n - 1) + e)
        levels += list(decade * means)
        if signed:
            levels += list(-decade * means)
    levels += [0.0, 1.0]
    assert len(levels) == 2**bits, len(levels)
    return np.sort(np.asarray(levels, np.float32))


@functools.cache
def linear_code(bits: int = 8, signed: bool = True) -> np.ndarray:
    """The uniform map in ``[-1, 1]`` (signed, symmetric, exact zero) or ``[0, 1]``.

    The signed map has ``2**bits - 1`` levels (index ``2**bits - 1`` repeats 1.0, unused) so
    that 0 is exact and the map is symmetric; the unsigned one has ``2**bits``.

    Example:
        >>> linear_code(4, signed=True)[:3].tolist(), float(linear_code(4)[7])
        ([-1.0, -0.8571428656578064, -0.7142857313156128], 0.0)
    """
    _check_bits(bits)
    if signed:
        levels = np.linspace(-1.0, 1.0, 2**bits - 1)
        levels = np.concatenate([levels, [1.0]])
    else:
        levels = np.linspace(0.0, 1.0, 2**bits)
    return levels.astype(np.float32)


def code_table(code: Code, bits: int, signed: bool) -> np.ndarray:
    """The sorted level table of ``code`` (see :func:`dynamic_code`, :func:`linear_code`)."""
    if code == "dynamic":
        return dynamic_code(bits, signed)
    if code == "linear":
        return linear_code(bits, signed)
    raise ValueError(f"code must be 'dynamic' or 'linear', got {code!r}")


def _check_bits(bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")


# --------------------------------------------------------------------------------------------
# The container
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A block-wise quantized array: ``uint8`` codes and ``float32`` per-block scales.

    A pytree with two array leaves; everything else is static metadata (part of the treedef),
    so jit caches on it and checkpoints hold only arrays.

    Attributes:
        codes: ``uint8`` indices into the code table: the original shape for 8 bits; for 4 bits
            ``lead + (ceil(row / 2),)`` with two codes per byte (low nibble first).
        scales: ``float32`` absmax of each block, shape ``lead + (blocks_per_row,)``.
        shape: Shape of the original array.
        dtype: Dtype of the original array (what :func:`dequantize_blockwise` returns).
        bits: 8 or 4.
        block_size: The requested maximum block length.
        code: ``"dynamic"`` or ``"linear"``.
        signed: Whether the code covers ``[-1, 1]`` (else ``[0, 1]``).
    """

    codes: jax.Array
    scales: jax.Array
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: Any = dataclasses.field(metadata=dict(static=True))
    bits: int = dataclasses.field(default=8, metadata=dict(static=True))
    block_size: int = dataclasses.field(default=_DEFAULT_BLOCK_SIZE, metadata=dict(static=True))
    code: Code = dataclasses.field(default="dynamic", metadata=dict(static=True))
    signed: bool = dataclasses.field(default=True, metadata=dict(static=True))

    @property
    def config(self) -> dict[str, Any]:
        """Keyword arguments that re-quantize another array the same way."""
        return dict(bits=self.bits, block_size=self.block_size, code=self.code, signed=self.signed)


jax.tree_util.register_dataclass(
    QuantizedArray,
    data_fields=["codes", "scales"],
    meta_fields=["shape", "dtype", "bits", "block_size", "code", "signed"],
)


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a :class:`QuantizedArray` (use as ``is_leaf`` in ``jax.tree.map``)."""
    return isinstance(x, QuantizedArray)


def _layout(shape: tuple[int, ...], block_size: int) -> tuple[tuple[int, ...], int, int, int]:
    """(lead, row, blocks_per_row, block_len) of ``shape`` cut into rows and equal blocks."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    k, row = len(shape), 1
    while k > 0 and row < block_size:  # fewest trailing axes whose product reaches block_size
        k -= 1
        row *= shape[k]
    lead = tuple(shape[:k])
    row = max(row, 1)
    nb = -(-row // block_size)
    return lead, row, nb, -(-row // nb)


def _blocks(x: jax.Array, lead: tuple[int, ...], row: int, nb: int, bl: int) -> jax.Array:
    """``x`` (any shape with ``lead`` and ``row`` elements per row) as ``lead + (nb, bl)``."""
    x = x.reshape(lead + (row,))
    if nb * bl != row:  # equal blocks: pad at most nb - 1 elements per row, transiently
        x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, nb * bl - row)])
    return x.reshape(lead + (nb, bl))


@functools.cache
def _dynamic_encoder(bits: int, signed: bool) -> tuple[np.ndarray, ...]:
    """Constants of the dynamic map's arithmetic encoder, derived from its table.

    Per decade ``e``: the midpoint threshold above which a magnitude belongs to it, its
    scale ``10**(e - bits + 2)``, its number of levels and its first magnitude rank.
    """
    n, s = bits - 1, 0 if signed else 1
    table = dynamic_code(bits, signed).astype(np.float64)
    mags = table[(table > 0) & (table < 1)]  # the K magnitudes below 1, ascending
    starts = np.array([2 ** (e + s) - 2**s for e in range(n)])
    thresholds = np.array([-np.inf] + [(mags[r - 1] + mags[r]) / 2 for r in starts[1:]])
    inv_scales = 10.0 ** -(np.arange(n) - n + 1.0)
    counts = 2.0 ** (np.arange(n) + s)
    edges = np.array([mags[0] / 2, (mags[-1] + 1.0) / 2])  # below: 0; above: 1.0
    return thresholds, inv_scales, counts, starts, edges


def _encode_dynamic(y: jax.Array, bits: int, signed: bool) -> jax.Array:
    """Nearest level of the dynamic map, by arithmetic: the decade comes from ``bits - 2``
    scalar comparisons, the step inside it from one rounding. Elementwise only: a binary
    search would cost ``bits`` gathers per element (10x slower on CPU)."""
    thresholds, inv_scales, counts, starts, edges = _dynamic_encoder(bits, signed)
    k_total = int(counts.sum())  # K magnitude levels below 1.0
    a = jnp.abs(y)
    inv_scale = jnp.full(a.shape, inv_scales[0], jnp.float32)
    count = jnp.full(a.shape, counts[0], jnp.float32)
    start = jnp.zeros(a.shape, jnp.int32)
    for e in range(1, len(thresholds)):
        above = a >= thresholds[e]
        inv_scale = jnp.where(above, np.float32(inv_scales[e]), inv_scale)
        count = jnp.where(above, np.float32(counts[e]), count)
        start = jnp.where(above, int(starts[e]), start)
    # Levels of a decade are 0.1 + (j + 0.5) * 0.9 / count (times its scale).
    j = jnp.round((a * inv_scale - 0.1) * count / 0.9 - 0.5)
    rank = start + jnp.clip(j, 0, count - 1).astype(jnp.int32)
    rank = jnp.where(a < edges[0], -1, rank)  # the zero level
    top = a >= edges[1]
    if signed:  # the map has +1.0 but no -1.0: negatives saturate at -M[K - 1]
        rank = jnp.where(top & (y > 0), k_total, rank)
        return jnp.where(y < 0, k_total - 1 - rank, k_total + 1 + rank)
    return jnp.where(top, k_total, rank) + 1


def _encode(y: jax.Array, code: Code, bits: int, signed: bool) -> jax.Array:
    """Nearest-level indices (int32) of ``y`` normalized to the code's range."""
    n = 2**bits
    if code == "linear":
        if signed:
            return jnp.round((y + 1.0) * ((n - 2) / 2)).astype(jnp.int32)
        return jnp.round(y * (n - 1)).astype(jnp.int32)
    idx = _encode_dynamic(y, bits, signed)
    if not signed:
        # No underflow to zero: a positive second moment that rounded to 0 would make
        # m / (sqrt(v) + eps) explode; rounding it up to the smallest level only shrinks that
        # step (the safe direction). Exactly-zero entries still encode as 0.
        idx = jnp.where((y > 0) & (idx == 0), 1, idx)
    return idx


def _pack4(idx: jax.Array) -> jax.Array:
    """Packs 4-bit indices along the last axis, two per byte (low nibble first)."""
    if idx.shape[-1] % 2:
        idx = jnp.pad(idx, [(0, 0)] * (idx.ndim - 1) + [(0, 1)])
    pairs = idx.reshape(idx.shape[:-1] + (idx.shape[-1] // 2, 2)).astype(jnp.uint8)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def _unpack4(codes: jax.Array, row: int) -> jax.Array:
    low, high = codes & 0x0F, codes >> 4
    idx = jnp.stack([low, high], axis=-1).reshape(codes.shape[:-1] + (2 * codes.shape[-1],))
    return idx[..., :row]


def quantize_blockwise(
    x: jax.Array,
    *,
    bits: int = 8,
    block_size: int = _DEFAULT_BLOCK_SIZE,
    code: Code = "dynamic",
    signed: bool = True,
) -> QuantizedArray:
    """Quantizes ``x`` block-wise: each block is divided by its absmax, then rounded to the
    nearest level of the code.

    Args:
        x: A real array of any shape (also a scalar).
        bits: 8, or 4 (two codes per byte).
        block_size: Maximum elements per block (one ``float32`` scale each).
        code: ``"dynamic"`` (8-bit Adam's non-linear map) or ``"linear"`` (uniform).
        signed: ``False`` for non-negative data (e.g. Adam's second moment): the unsigned map
            has twice the resolution; negative inputs are clipped to 0.

    Returns:
        A :class:`QuantizedArray`. ``dequantize_blockwise(q)`` differs from ``x`` element-wise
        by at most half the largest gap between levels times the block's absmax (linear 8-bit
        signed: ``absmax / 254``).

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_blockwise(jnp.array([0.5, -1.0, 0.0, 2.0]), bits=4, code="linear")
        >>> q.codes.shape, q.scales.tolist()
        ((2,), [2.0])
        >>> [round(v, 3) for v in dequantize_blockwise(q).tolist()]  # error <= absmax / 14
        [0.571, -0.857, 0.0, 2.0]
    """
    _check_bits(bits)
    code_table(code, bits, signed)  # validates ``code``
    _layout((), block_size)  # validates ``block_size``
    x = jnp.asarray(x)
    codes, scales = _quantize(x, bits, block_size, code, signed)
    return QuantizedArray(
        codes=codes,
        scales=scales,
        shape=tuple(x.shape),
        dtype=jnp.dtype(x.dtype),
        bits=bits,
        block_size=block_size,
        code=code,
        signed=signed,
    )


# One compiled program per shape and code (eager mode would dispatch ~40 small ops).
@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantize(
    x: jax.Array, bits: int, block_size: int, code: Code, signed: bool
) -> tuple[jax.Array, jax.Array]:
    shape = tuple(x.shape)
    lead, row, nb, bl = _layout(shape, block_size)
    xb = _blocks(x.astype(jnp.float32), lead, row, nb, bl)
    if not signed:
        xb = jnp.maximum(xb, 0.0)
    scales = jnp.max(jnp.abs(xb), axis=-1)
    inv = jnp.where(scales > 0, 1.0 / jnp.where(scales > 0, scales, 1.0), 0.0)
    idx = _encode(xb * inv[..., None], code, bits, signed)
    idx = idx.reshape(lead + (nb * bl,))[..., :row]
    if bits == 8:
        codes = idx.astype(jnp.uint8).reshape(shape)
    else:
        codes = _pack4(idx)
    return codes, scales


def dequantize_blockwise(q: QuantizedArray, dtype: Any = None) -> jax.Array:
    """Reconstructs the array: ``level[codes] * scale`` per block.

    Args:
        q: The quantized array.
        dtype: Output dtype; defaults to the original array's dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_blockwise(jnp.arange(6.0).reshape(2, 3), code="linear")
        >>> [round(v, 1) for v in dequantize_blockwise(q).ravel().tolist()]
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    """
    return _dequantize(q, jnp.dtype(q.dtype if dtype is None else dtype))


@functools.partial(jax.jit, static_argnums=1)
def _dequantize(q: QuantizedArray, dtype: Any) -> jax.Array:
    lead, row, nb, bl = _layout(q.shape, q.block_size)
    idx = q.codes if q.bits == 8 else _unpack4(q.codes, row)
    table = jnp.asarray(code_table(q.code, q.bits, q.signed))
    vals = jnp.take(table, _blocks(idx, lead, row, nb, bl).astype(jnp.int32), axis=0)
    x = (vals * q.scales[..., None]).reshape(lead + (nb * bl,))[..., :row]
    return x.reshape(q.shape).astype(dtype)


def quantized_zeros(
    shape: tuple[int, ...],
    dtype: Any = jnp.float32,
    *,
    bits: int = 8,
    block_size: int = _DEFAULT_BLOCK_SIZE,
    code: Code = "dynamic",
    signed: bool = True,
) -> QuantizedArray:
    """``quantize_blockwise(jnp.zeros(shape, dtype), ...)`` without the full-size temporary.

    Example:
        >>> q = quantized_zeros((3, 4), signed=False)
        >>> dequantize_blockwise(q).sum().item()
        0.0
    """
    _check_bits(bits)
    table = code_table(code, bits, signed)
    zero = int(np.argmin(np.abs(table)))  # index of the exact 0 level
    lead, row, nb, _ = _layout(tuple(shape), block_size)
    if bits == 8:
        codes = jnp.full(shape, zero, jnp.uint8)
    else:
        codes = jnp.full(lead + (-(-row // 2),), zero | (zero << 4), jnp.uint8)
    return QuantizedArray(
        codes=codes,
        scales=jnp.zeros(lead + (nb,), jnp.float32),
        shape=tuple(shape),
        dtype=jnp.dtype(dtype),
        bits=bits,
        block_size=block_size,
        code=code,
        signed=signed,
    )


def quantize_like(x: jax.Array, like: QuantizedArray) -> QuantizedArray:
    """Quantizes ``x`` with ``like``'s bits, block size, code and sign (e.g. after rotating a
    dequantized moment)."""
    return quantize_blockwise(x.astype(like.dtype), **like.config)


# --------------------------------------------------------------------------------------------
# 8-bit Adam
# --------------------------------------------------------------------------------------------


class ScaleByAdam8bitState(NamedTuple):
    """State of :func:`scale_by_adam_8bit`.

    ``mu`` and ``nu`` have the structure of the parameters; each leaf is either a
    :class:`QuantizedArray` (tensors of at least ``min_8bit_size`` elements: ``mu`` with the
    signed dynamic code, ``nu`` with the unsigned one) or a ``float32`` array (smaller
    tensors). To transform a moment (e.g. rotate ``mu`` when GaLore's subspace changes),
    :func:`dequantize_blockwise` it, transform, and :func:`quantize_like` it back.
    """

    count: jax.Array  # type: ignore[assignment]  # int32 scalar: updates so far
    mu: optax.Updates
    nu: optax.Updates


def _static_int(value: Any, default: int, name: str) -> int:
    if value is None:
        return default
    try:
        return int(value)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise TypeError(
            f"{name} must be a Python int (it fixes array shapes); under "
            f"optax.inject_hyperparams pass static_args=({name!r}, ...)"
        ) from e


def scale_by_adam_8bit(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    *,
    block_size: int | None = None,
    min_8bit_size: int | None = None,
) -> optax.GradientTransformation:
    """Rescales updates by Adam's rule, storing both moments in 8 bits between steps.

    Each step dequantizes the moments, updates them in ``float32`` exactly as
    :func:`optax.scale_by_adam` does, computes the update from the ``float32`` values, and
    re-quantizes them (block-wise absmax, dynamic code: signed for ``mu``, unsigned for
    ``nu``). Tensors with fewer than ``min_8bit_size`` elements keep ``float32`` moments.
    Works as GaLore's ``base_optimizer`` (``params`` is not used).

    Args:
        b1: Decay of the first moment.
        b2: Decay of the second moment.
        eps: Added to the denominator outside the square root.
        eps_root: Added to the second moment inside the square root.
        block_size: Elements per quantization block (default 256; static: under
            ``optax.inject_hyperparams`` list it in ``static_args``).
        min_8bit_size: Tensors smaller than this stay ``float32`` (default 4096; static).

    Returns:
        A ``GradientTransformation`` whose state is a :class:`ScaleByAdam8bitState`.

    Example:
        >>> import jax.numpy as jnp
        >>> opt = scale_by_adam_8bit(min_8bit_size=16)
        >>> params = {'w': jnp.ones((8, 8)), 'b': jnp.ones(8)}
        >>> state = opt.init(params)
        >>> type(state.mu['w']).__name__, type(state.mu['b']).__name__
        ('QuantizedArray', 'ArrayImpl')
        >>> updates, state = opt.update({'w': jnp.ones((8, 8)), 'b': -jnp.ones(8)}, state)
        >>> updates['w'][0, 0].round(3).item(), updates['b'][0].round(3).item()
        (1.0, -1.0)
    """
    bs = _static_int(block_size, _DEFAULT_BLOCK_SIZE, "block_size")
    min_size = _static_int(min_8bit_size, _DEFAULT_MIN_8BIT_SIZE, "min_8bit_size")

    def quantizes(x: Any) -> bool:
        return math.prod(x.shape) >= min_size

    def init_fn(params: optax.Params) -> ScaleByAdam8bitState:
        def zeros(p: Any, signed: bool) -> Any:
            if quantizes(p):
                return quantized_zeros(p.shape, jnp.float32, block_size=bs, signed=signed)
            return jnp.zeros(p.shape, jnp.float32)

        return ScaleByAdam8bitState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(lambda p: zeros(p, True), params),
            nu=jax.tree.map(lambda p: zeros(p, False), params),
        )

    def update_fn(
        updates: optax.Updates, state: ScaleByAdam8bitState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, ScaleByAdam8bitState]:
        del params
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        bc1 = 1.0 - jnp.asarray(b1, jnp.float32) ** t
        bc2 = 1.0 - jnp.asarray(b2, jnp.float32) ** t

        def leaf(g: jax.Array, mu: Any, nu: Any) -> tuple[jax.Array, Any, Any]:
            m = dequantize_blockwise(mu) if is_quantized(mu) else mu
            v = dequantize_blockwise(nu) if is_quantized(nu) else nu
            g32 = g.astype(jnp.float32)
            m = b1 * m + (1.0 - b1) * g32
            v = b2 * v + (1.0 - b2) * g32 * g32
            u = (m / bc1) / (jnp.sqrt(v / bc2 + eps_root) + eps)
            if is_quantized(mu):
                m, v = quantize_like(m, mu), quantize_like(v, nu)
            return u.astype(g.dtype), m, v

        out = jax.tree.map(leaf, updates, state.mu, state.nu)
        pick = lambda i: jax.tree.map(lambda _, o: o[i], updates, out)
        return pick(0), ScaleByAdam8bitState(count=count, mu=pick(1), nu=pick(2))

    return optax.GradientTransformation(init_fn, update_fn)


def adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    weight_decay: float | jax.Array = 1e-4,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    block_size: int | None = None,
    min_8bit_size: int | None = None,
) -> optax.GradientTransformation:
    """AdamW with 8-bit moments: :func:`scale_by_adam_8bit`, decoupled weight decay, learning
    rate; the same chain as :func:`optax.adamw`.

    Args:
        learning_rate: A scalar or a schedule.
        b1: Decay of the first moment.
        b2: Decay of the second moment.
        eps: Added to the denominator outside the square root.
        eps_root: Added to the second moment inside the square root.
        weight_decay: Decoupled weight decay coefficient.
        mask: A tree of booleans (or a function of the params returning one) selecting the
            leaves that decay, as in :func:`optax.adamw`.
        block_size: See :func:`scale_by_adam_8bit`.
        min_8bit_size: See :func:`scale_by_adam_8bit`.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> opt = adamw_8bit(1e-3)
        >>> params = {'w': jnp.zeros((64, 64))}
        >>> updates, state = opt.update({'w': jnp.ones((64, 64))}, opt.init(params), params)
        >>> round(updates['w'][0, 0].item(), 6)
        -0.001
    """
    return optax.chain(
        scale_by_adam_8bit(
            b1, b2, eps, eps_root, block_size=block_size, min_8bit_size=min_8bit_size
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


# --------------------------------------------------------------------------------------------
# Quantized projectors
# --------------------------------------------------------------------------------------------


def quantize_projector(p: jax.Array, bits: int = 8, group_size: int = 256) -> QuantizedArray:
    """Stores a GaLore projector in ``bits`` (8: int8-like, 4: two per byte) with one
    ``float32`` scale per group, using the symmetric *linear* code.

    Projector entries are roughly Gaussian with no outliers, where uniform levels beat the
    dynamic (log-like) map; see :func:`projector_error` for the measured cost.

    Example:
        >>> import jax
        >>> p, _ = jax.numpy.linalg.qr(jax.random.normal(jax.random.key(0), (512, 64)))
        >>> q = quantize_projector(p, bits=4, group_size=64)
        >>> q.codes.shape, q.codes.dtype
        ((512, 32), dtype('uint8'))
    """
    return quantize_blockwise(p, bits=bits, block_size=group_size, code="linear", signed=True)


class ProjectorError(NamedTuple):
    """Errors of a quantized projector ``Q`` against the original ``P`` (columns orthonormal).

    Attributes:
        relative: ``||Q - P||_F / ||P||_F``.
        orthogonality: ``||Q^T Q - I||_F / sqrt(r)``.
        energy: Fraction of ``G``'s energy captured by ``P`` (``||P^T G||^2 / ||G||^2``).
        energy_quantized: The same through ``Q`` (``||Q^T G||^2 / ||G||^2``).
        update_relative: ``||Q Q^T G - P P^T G||_F / ||P P^T G||_F``: the error of the
            projected-then-back-projected gradient, i.e. of the weight update direction.
    """

    relative: jax.Array
    orthogonality: jax.Array
    energy: jax.Array
    energy_quantized: jax.Array
    update_relative: jax.Array


def projector_error(p: jax.Array, q: QuantizedArray, g: jax.Array) -> ProjectorError:
    """Measures what quantizing the left projector ``p`` (m x r) costs on gradient ``g``
    (m x n).

    Example:
        >>> import jax
        >>> g = jax.random.normal(jax.random.key(0), (256, 128))
        >>> p = jax.numpy.linalg.svd(g, full_matrices=False)[0][:, :32]
        >>> err = projector_error(p, quantize_projector(p, bits=8), g)
        >>> bool(err.relative < 0.01), bool(abs(err.energy - err.energy_quantized) < 1e-3)
        (True, True)
    """
    p = p.astype(jnp.float32)
    pq = dequantize_blockwise(q, jnp.float32)
    r = p.shape[-1]
    g2 = jnp.sum(g * g)
    upd, upd_q = p @ (p.T @ g), pq @ (pq.T @ g)
    return ProjectorError(
        relative=jnp.linalg.norm(pq - p) / jnp.linalg.norm(p),
        orthogonality=jnp.linalg.norm(pq.T @ pq - jnp.eye(r)) / math.sqrt(r),
        energy=jnp.sum((p.T @ g) ** 2) / g2,
        energy_quantized=jnp.sum((pq.T @ g) ** 2) / g2,
        update_relative=jnp.linalg.norm(upd_q - upd) / jnp.linalg.norm(upd),
    )
