"""Tests of galorax.quantization and galorax.adam8bit: codes, 8-bit Adam, quantized projectors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from galorax.accounting import tree_bytes
from galorax.adam8bit import ScaleByAdam8bitState, adamw_8bit, scale_by_adam_8bit
from galorax.projector import projector_error, quantize_projector
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


@settings(max_examples=15, deadline=None)
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


# ----------------------------------------------------------------------------------- 8-bit Adam


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "w": jax.random.normal(k1, (2, 64, 96)),  # quantized
        "v": jax.random.normal(k2, (64, 80)),  # quantized
        "b": jnp.zeros(96),  # below min_8bit_size: f32
    }


def _grads(t: int, params):
    """Gradients with log-normal per-row and per-column scales plus a persistent mean, so
    each block mixes magnitudes over ~2 decades (harder than i.i.d. noise)."""
    out = {}
    for i, (name, p) in enumerate(sorted(params.items())):
        k = jax.random.fold_in(jax.random.key(1), i)
        rows = jnp.exp(jax.random.normal(jax.random.fold_in(k, 0), p.shape[:-1] + (1,)))
        cols = jnp.exp(0.5 * jax.random.normal(jax.random.fold_in(k, 1), p.shape[-1:]))
        mean = 0.5 * jax.random.normal(jax.random.fold_in(k, 2), p.shape)
        noise = jax.random.normal(jax.random.fold_in(k, 3 + t), p.shape)
        out[name] = (mean + noise) * rows * cols
    return out


def test_state_structure_and_bytes_at_most_30_percent_of_f32_adam():
    params = _params()
    state = scale_by_adam_8bit().init(params)
    assert isinstance(state, ScaleByAdam8bitState)
    assert is_quantized(state.mu["w"]) and is_quantized(state.nu["v"])
    assert state.mu["w"].signed and not state.nu["w"].signed
    assert state.mu["b"].dtype == jnp.float32  # small tensor stays f32
    ratio = tree_bytes(state) / tree_bytes(optax.scale_by_adam().init(params))
    assert ratio <= 0.30, ratio
    # 2 bytes of codes + 8 / 256 bytes of scales per quantized parameter, vs 8 bytes.
    big = {"w": jnp.zeros((1024, 1024))}
    ratio = tree_bytes(scale_by_adam_8bit().init(big)) / tree_bytes(optax.scale_by_adam().init(big))
    assert abs(ratio - (2 + 8 / 256) / 8) < 1e-3


def test_first_step_equals_adam():
    """Step 1 is computed from the f32 moments before they are stored: exact."""
    params = _params()
    g = _grads(0, params)
    ref, _ = jax.jit(optax.scale_by_adam().update)(g, optax.scale_by_adam().init(params))
    ours, _ = jax.jit(scale_by_adam_8bit().update)(g, scale_by_adam_8bit().init(params))
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(ours), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block_size", [64, 256])
def test_updates_track_f32_adam(block_size):
    """Differential test against optax.scale_by_adam over 40 steps.

    Tolerance: each stored moment is off by at most half a level gap relative to its block's
    absmax. The dynamic map has 64 levels per sign in [0.1, 1] of the absmax (<= 7% error at
    0.1, 0.7% at 1) but 32 in [0.01, 0.1] and 16 below, so elements 10-100x smaller than
    their block's largest carry 10-30% errors; the update error therefore grows with the
    spread of magnitudes inside a block. Measured (relative Frobenius error of the update, per
    step, mean / max): i.i.d. gradients 2.0% / 2.4% (block 64), 2.3% / 2.7% (256); these
    log-normal row/column scales 3.2% / 4.1% (64), 6.0% / 7.7% (256); row scales exp(2 N)
    mixed inside one 256-block: 27% / 29% (smaller blocks help: 6% / 8% at 64). The error
    does not accumulate (every step re-quantizes fresh f32 values). Bounds: ~1.5x margin over
    the measured maxima; the f32-state leaf ``b`` must match to f32 precision.
    """
    params = _params()
    ref, ours = optax.scale_by_adam(), scale_by_adam_8bit(block_size=block_size)
    s_ref, s_ours = ref.init(params), ours.init(params)
    up_ref, up_ours = jax.jit(ref.update), jax.jit(ours.update)
    rel, cos = [], []
    for t in range(40):
        g = _grads(t, params)
        a, s_ref = up_ref(g, s_ref)
        b, s_ours = up_ours(g, s_ours)
        np.testing.assert_allclose(a["b"], b["b"], rtol=1e-5, atol=1e-6)
        fa, fb = (jnp.concatenate([x.ravel() for x in jax.tree.leaves(u)]) for u in (a, b))
        rel.append(float(jnp.linalg.norm(fa - fb) / jnp.linalg.norm(fa)))
        cos.append(float(fa @ fb / jnp.linalg.norm(fa) / jnp.linalg.norm(fb)))
    assert max(rel) < {64: 0.06, 256: 0.12}[block_size], max(rel)
    assert min(cos) > 0.99, min(cos)
    assert np.mean(rel[-10:]) < 1.5 * np.mean(rel[10:20])  # no drift


def test_adamw_8bit_minimizes_a_quadratic_like_adamw():
    target = jax.random.normal(jax.random.key(3), (64, 128))
    scales = jnp.exp(jax.random.normal(jax.random.key(4), (64, 1)))

    def loss(p):
        return jnp.mean(scales * (p["w"] - target) ** 2)

    def run(opt):
        p = {"w": jnp.zeros_like(target)}
        s = opt.init(p)

        @jax.jit
        def step(p, s):
            g = jax.grad(loss)(p)
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s

        for _ in range(300):
            p, s = step(p, s)
        return float(loss(p))

    l32, l8 = run(optax.adamw(0.05, weight_decay=0.0)), run(adamw_8bit(0.05, weight_decay=0.0))
    assert l8 < 1e-2 * float(loss({"w": jnp.zeros_like(target)}))
    assert l8 < 3 * l32 + 1e-4, (l8, l32)


def test_adamw_8bit_weight_decay_and_mask_like_optax():
    params = {"w": jnp.ones((64, 64)), "b": jnp.ones(64)}
    g = jax.tree.map(jnp.zeros_like, params)
    mask = {"w": True, "b": False}
    opt = adamw_8bit(0.1, weight_decay=0.5, mask=mask)
    u, _ = opt.update(g, opt.init(params), params)
    ref = optax.adamw(0.1, weight_decay=0.5, mask=mask)
    r, _ = ref.update(g, ref.init(params), params)
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(r), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-7)


def test_jit_no_recompilation_on_second_call():
    params = _params()
    opt = adamw_8bit(1e-3)
    update = jax.jit(opt.update)
    state = jax.jit(opt.init)(params)
    g = _grads(0, params)
    _, state = update(g, state, params)
    _, state = update(g, state, params)
    assert update._cache_size() == 1


def test_inject_hyperparams_and_static_args():
    params = _params()
    opt = optax.inject_hyperparams(adamw_8bit)(learning_rate=optax.linear_schedule(1e-3, 0, 10))
    state = opt.init(params)
    u, state = jax.jit(opt.update)(_grads(0, params), state, params)
    assert set(state.hyperparams) >= {"learning_rate", "b1", "b2", "eps", "weight_decay"}
    state.hyperparams["b1"] = jnp.asarray(0.5)
    jax.jit(opt.update)(_grads(1, params), state, params)
    opt = optax.inject_hyperparams(scale_by_adam_8bit, static_args=("block_size",))(
        b2=0.99, block_size=128
    )
    assert opt.init(params).inner_state.mu["w"].block_size == 128
    with pytest.raises(TypeError, match="static_args"):
        bad = optax.inject_hyperparams(scale_by_adam_8bit)(block_size=128)
        jax.jit(bad.update)(_grads(0, params), bad.init(params))


def test_abstract_init_allocates_nothing_and_matches():
    params = _params()
    abstract = jax.eval_shape(scale_by_adam_8bit().init, params)
    real = scale_by_adam_8bit().init(params)
    assert jax.tree.structure(abstract) == jax.tree.structure(real)
    assert tree_bytes(abstract) == tree_bytes(real)


def test_orbax_roundtrip_is_bit_exact(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params = _params()
    opt = adamw_8bit(1e-3)
    state = opt.init(params)
    for t in range(3):
        _, state = jax.jit(opt.update)(_grads(t, params), state, params)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "state", state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "state", jax.eval_shape(opt.init, params))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # The restored state continues exactly like the original.
    g = _grads(9, params)
    u1, _ = opt.update(g, state, params)
    u2, _ = opt.update(g, restored, params)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
        np.testing.assert_array_equal(a, b)


def test_as_galore_base_optimizer():
    galorax = pytest.importorskip("galorax")
    if not hasattr(galorax, "galore"):
        pytest.skip("galorax.galore not available")
    params = {"w": jax.random.normal(jax.random.key(0), (256, 128))}
    opt = galorax.galore(
        1e-2, rank=32, update_proj_gap=5, base_optimizer=scale_by_adam_8bit(min_8bit_size=256)
    )
    state = opt.init(params)
    loss = lambda p: jnp.sum((p["w"] - 1.0) ** 2)
    step = jax.jit(lambda p, s: opt.update(jax.grad(loss)(p), s, p))
    l0 = float(loss(params))
    for _ in range(12):  # crosses two refreshes
        u, state = step(params, state)
        params = optax.apply_updates(params, u)
    assert np.isfinite(float(loss(params))) and float(loss(params)) < l0
    assert step._cache_size() == 1


# ---------------------------------------------------------------------------------- projectors


@functools.cache
def _gradient_and_projector() -> tuple[jax.Array, jax.Array]:
    """A 256 x 128 gradient with a 1/i spectrum and its exact top-32 left basis."""

    @jax.jit
    def make():
        k1, k2 = jax.random.split(jax.random.key(7))
        g = (jax.random.normal(k1, (256, 128)) / jnp.arange(1, 129)) @ jax.random.normal(
            k2, (128, 128)
        )
        return g, jnp.linalg.svd(g, full_matrices=False)[0][:, :32]

    return make()


@pytest.mark.parametrize(
    "bits,group,max_rel,max_energy_drop",
    [(8, 256, 0.01, 1e-3), (4, 64, 0.12, 0.03), (4, 256, 0.15, 0.04)],
)
def test_projector_quantization_error(bits, group, max_rel, max_energy_drop):
    """Linear absmax code on a Gaussian-like orthonormal P: rms error ~ step / sqrt(12) with
    step = 2 * absmax / (2**bits - 2) and absmax ~ 2.5-3 sigma of a group: ~0.6% (8-bit),
    ~10% (4-bit). The captured energy of the gradient barely moves: quantization noise is
    spread over all m directions, only r / m of it lands in the subspace."""
    k1, k2 = jax.random.split(jax.random.key(7))
    g = (
        jax.random.normal(k1, (512, 256))
        @ jnp.diag(1.0 / jnp.arange(1, 257))
        @ (jax.random.normal(k2, (256, 256)))
    )
    p = jnp.linalg.svd(g, full_matrices=False)[0][:, :64]
    q = quantize_projector(p, bits=bits, group_size=group)
    err = projector_error(p, q, g)
    assert float(err.relative) < max_rel
    assert float(err.energy - err.energy_quantized) < max_energy_drop
    assert tree_bytes(q) < tree_bytes(p) * (bits / 32 + 4 / group + 1e-6)
