"""Tests of galorax.quantization: code tables, block-wise round trips, the container."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from galorax.accounting import tree_bytes
from galorax.quantization.blockwise import (
    QuantizedArray,
    _encode,
    dequantize_blockwise,
    is_quantized,
    quantize_blockwise,
    quantize_like,
    quantized_zeros,
)
from galorax.quantization.codes import code_table, dynamic_code, linear_code

CODES = [(c, b, s) for c in ("dynamic", "linear") for b in (8, 4) for s in (True, False)]


def _max_half_gap(code: str, bits: int, signed: bool) -> float:
    """Largest rounding error of a normalized value in [-1, 1] (or [0, 1]): half the widest
    gap between neighbouring levels, including the gap from -1 to the lowest level."""
    t = code_table(code, bits, signed).astype(np.float64)
    gaps = np.diff(t) / 2
    edge = t[0] - (-1.0 if signed else 0.0)  # -1 is not a level of the signed dynamic map
    return float(max(gaps.max(), edge))


# ------------------------------------------------------------------------------- code tables


@pytest.mark.parametrize("code,bits,signed", CODES)
def test_tables_sorted_in_range_with_exact_zero_and_one(code, bits, signed):
    t = code_table(code, bits, signed)
    assert t.shape == (2**bits,) and t.dtype == np.float32
    assert np.all(np.diff(t) >= 0)
    assert t.min() >= (-1.0 if signed else 0.0) and t.max() == 1.0
    assert 0.0 in t


def test_dynamic_code_matches_bitsandbytes_construction():
    # create_dynamic_map(signed=True): 127 negative, 0, 127 positive levels, 1.0 on top;
    # smallest magnitude 10**-6 * 0.55 (decade e=0 has one level: mean of 0.1 and 1).
    s = dynamic_code(8, signed=True)
    assert (s < 0).sum() == 127 and (s > 0).sum() == 128
    assert np.isclose(s[s > 0].min(), 0.55e-6) and np.isclose(s.min(), -(0.98594 + 1) / 2, 1e-4)
    u = dynamic_code(8, signed=False)
    assert (u == 0).sum() == 1 and np.isclose(u[1], 0.325e-6)
    assert len(np.unique(linear_code(8, True))) == 255  # symmetric, exact zero


@pytest.mark.parametrize("bits,signed", [(8, True), (8, False), (4, True), (4, False)])
def test_arithmetic_encoder_is_nearest_level(bits, signed):
    t = dynamic_code(bits, signed)
    rng = np.random.default_rng(0)
    lo = -1.0 if signed else 0.0
    x = np.concatenate(
        [
            rng.uniform(lo, 1, 20000),
            (1 if not signed else np.sign(rng.normal(size=20000)))
            * 10 ** rng.uniform(-9, 0, 20000),
            t,
            (t[1:] + t[:-1]) / 2,  # ties
            [0.0, 1.0, 1e-30],
        ]
    ).astype(np.float32)
    idx = np.asarray(_encode(jnp.asarray(x), "dynamic", bits, signed))
    best = np.abs(x[:, None] - t[None, :]).min(axis=1)
    err = np.abs(t[idx] - x)
    ok = err <= best + 1e-7
    if not signed:  # positive values below the smallest level round up, never to zero
        up = (x > 0) & (best == np.abs(x))
        assert np.all(idx[up] == 1)
        ok |= up
    assert ok.all(), x[~ok][:5]


# --------------------------------------------------------------------------------- round trip

shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=37)


@settings(max_examples=8, deadline=None)  # each example compiles new shapes
@given(
    x=hnp.arrays(
        np.float32,
        shapes,
        elements=st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False),
    ),
    block_size=st.sampled_from([1, 7, 64, 256]),
    spec=st.sampled_from(CODES),
)
def test_roundtrip_error_bound(x, block_size, spec):
    """|dequant(quant(x)) - x| <= half the widest level gap * the block absmax (+ f32 ulps)."""
    code, bits, signed = spec
    if not signed:
        x = np.abs(x)
    q = quantize_blockwise(
        jnp.asarray(x), bits=bits, block_size=block_size, code=code, signed=signed
    )
    y = np.asarray(dequantize_blockwise(q))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert q.codes.dtype == jnp.uint8 and q.scales.dtype == jnp.float32
    # The block absmax that applies to each element, broadcast back from the scales.
    absmax = np.asarray(dequantize_blockwise(_all_codes_at_one(q)))
    bound = _max_half_gap(code, bits, signed) * absmax * (1 + 1e-5) + 1e-30
    assert np.all(np.abs(y - x) <= bound)
    assert np.all(y[x == 0] == 0)  # zeros are exact (every code has a 0 level)


def _all_codes_at_one(q: QuantizedArray) -> QuantizedArray:
    """The same container with every code at the 1.0 level: dequantizes to the absmax of
    each element's block."""
    top = 2**q.bits - 1  # the last level is 1.0 in every table
    fill = top if q.bits == 8 else top | (top << 4)
    return QuantizedArray(
        codes=jnp.full(q.codes.shape, fill, jnp.uint8),
        scales=q.scales,
        shape=q.shape,
        dtype=q.dtype,
        bits=q.bits,
        block_size=q.block_size,
        code=q.code,
        signed=q.signed,
    )


@pytest.mark.parametrize(
    "shape,block_size,codes_shape,scales_shape",
    [
        ((3, 64, 128), 256, (3, 64, 128), (3, 32)),  # layer axis kept; rows of 64 x 128
        ((4, 1376), 256, (4, 1376), (4, 6)),  # 6 equal blocks of 230 (4 padded, transiently)
        ((5,), 256, (5,), (1,)),
        ((), 256, (), (1,)),
    ],
)
def test_layout_keeps_leading_axes_and_stores_no_padding(
    shape, block_size, codes_shape, scales_shape
):
    q = quantize_blockwise(jnp.ones(shape), block_size=block_size)
    assert q.codes.shape == codes_shape and q.scales.shape == scales_shape


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 9)])
def test_int4_packs_two_codes_per_byte(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    q = quantize_blockwise(x, bits=4, code="linear", block_size=4)
    assert q.codes.shape == shape[:-1] + (-(-shape[-1] // 2),)
    assert tree_bytes(q.codes) < x.size  # strictly less than one byte per value
    np.testing.assert_allclose(dequantize_blockwise(q), x, atol=float(jnp.abs(x).max()) / 7)


def test_quantized_zeros_equals_quantizing_zeros():
    for kw in [dict(), dict(signed=False), dict(bits=4, code="linear")]:
        a = quantized_zeros((3, 300), **kw)
        b = quantize_blockwise(jnp.zeros((3, 300)), **kw)
        assert jax.tree.structure(a) == jax.tree.structure(b)
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(u, v)


def test_quantize_like_and_container_is_a_pytree_of_arrays_only():
    q = quantize_blockwise(jnp.ones((16, 32)), bits=4, code="linear", block_size=64)
    r = quantize_like(2 * jnp.ones((16, 32)), q)
    assert jax.tree.structure(r) == jax.tree.structure(q)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(q))
    assert len(jax.tree.leaves(q)) == 2 and is_quantized(q)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        quantize_blockwise(jnp.ones(4), bits=3)
    with pytest.raises(ValueError, match="code"):
        quantize_blockwise(jnp.ones(4), code="nf4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block_size"):
        quantize_blockwise(jnp.ones(4), block_size=0)
