"""Block-wise quantization: an array becomes ``uint8`` codes plus ``float32`` block scales.

:func:`quantize_blockwise` / :func:`dequantize_blockwise`: codes (two 4-bit codes per byte
when ``bits=4``) into a code table of :mod:`galorax.quantization.codes`, and one ``float32``
absmax scale per block.

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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from galorax.quantization.codes import Code, check_bits, code_table, dynamic_code

#: Default block length (values per scale).
DEFAULT_BLOCK_SIZE = 256


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
    block_size: int = dataclasses.field(default=DEFAULT_BLOCK_SIZE, metadata=dict(static=True))
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


def lead_axes(shape: tuple[int, ...], block_size: int) -> int:
    """How many leading axes of ``shape`` index whole rows of blocks: a block never spans
    two slices along them, so a quantized array can be cut along them.

    Example:
        >>> lead_axes((24, 2, 512), 256), lead_axes((24, 64, 8), 256), lead_axes((4, 8), 256)
        (2, 1, 0)
    """
    return len(_layout(tuple(shape), block_size)[0])


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
    block_size: int = DEFAULT_BLOCK_SIZE,
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
    check_bits(bits)
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
    block_size: int = DEFAULT_BLOCK_SIZE,
    code: Code = "dynamic",
    signed: bool = True,
) -> QuantizedArray:
    """``quantize_blockwise(jnp.zeros(shape, dtype), ...)`` without the full-size temporary.

    Example:
        >>> q = quantized_zeros((3, 4), signed=False)
        >>> dequantize_blockwise(q).sum().item()
        0.0
    """
    check_bits(bits)
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
