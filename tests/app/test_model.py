"""The LLaMA-style model: shapes, causality, stacked/scanned layers, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from galorax.app import model as M

CFG = M.ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, d_ff=48)


def test_param_tree_is_stacked():
    p = M.init_params(CFG, jax.random.key(0))
    assert p["layers"]["wq"].shape == (2, 32, 32)
    assert p["layers"]["w_gate"].shape == (2, 32, 48)
    assert p["layers"]["w_down"].shape == (2, 48, 32)
    assert p["layers"]["attn_norm"].shape == (2, 32)
    assert p["embed"].shape == (256, 32) and p["head"].shape == (32, 256)


def test_presets_match_the_paper():
    for name, (d, n_layers, h, f) in {
        "60m": (512, 8, 8, 1376),
        "130m": (768, 12, 12, 2048),
        "350m": (1024, 24, 16, 2736),
        "1b": (2048, 24, 32, 5461),
        "7b": (4096, 32, 32, 11008),
    }.items():
        c = M.get_preset(name)
        assert (c.d_model, c.n_layers, c.n_heads, c.d_ff) == (d, n_layers, h, f)
    # 7b built abstractly: no allocation.
    a = M.abstract_params(M.get_preset("7b", vocab_size=32000), jnp.bfloat16)
    assert 6.5e9 < M.count_params(a) < 6.8e9


def test_tiny_is_dominated_by_projected_matrices():
    a = M.abstract_params(M.get_preset("tiny"))
    matrices = sum(np.prod(a["layers"][k].shape) for k in M.MATRIX_NAMES)
    assert matrices / M.count_params(a) > 0.9


def test_unknown_preset():
    with pytest.raises(KeyError, match="choose one of"):
        M.get_preset("huge")


def test_causal():
    p = M.init_params(CFG, jax.random.key(0))
    t = jax.random.randint(jax.random.key(1), (1, 12), 0, 256)
    t2 = t.at[0, 8].set((t[0, 8] + 1) % 256)
    a, b = M.forward(p, t, CFG), M.forward(p, t2, CFG)
    np.testing.assert_allclose(a[0, :8], b[0, :8], atol=1e-5)
    assert not np.allclose(a[0, 8:], b[0, 8:])


def test_scan_equals_layer_loop_and_remat():
    p = M.init_params(CFG, jax.random.key(0))
    t = jax.random.randint(jax.random.key(1), (2, 10), 0, 256)
    x = p["embed"][t]
    for i in range(CFG.n_layers):
        x = M._block(CFG, x, jax.tree.map(lambda w, i=i: w[i], p["layers"]))
    ref = M._rms_norm(x, p["final_norm"], CFG.norm_eps) @ p["head"]
    np.testing.assert_allclose(M.forward(p, t, CFG), ref, atol=1e-5)
    np.testing.assert_allclose(M.forward(p, t, CFG, remat=True), ref, atol=1e-5)


def test_bfloat16():
    p = M.init_params(CFG, jax.random.key(0), jnp.bfloat16)
    assert p["layers"]["wq"].dtype == jnp.bfloat16
    t = jnp.zeros((2, 9), jnp.int32)
    loss_and_grad = jax.jit(jax.value_and_grad(lambda p, t: M.loss_fn(p, t, CFG)))  # one compile
    loss, g = loss_and_grad(p, t)
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    assert g["layers"]["wq"].dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_embedding_gradient_equals_the_gather_gradient(dtype):
    """embed_tokens' own backward pass (a scatter-add into a late zero buffer) gives the
    gradient of a plain ``table[tokens]``, repeated tokens included."""
    table = jax.random.normal(jax.random.key(0), (16, 8)).astype(dtype)
    tokens = jnp.array([[1, 3, 3], [0, 1, 15]])
    w = jax.random.normal(jax.random.key(1), (2, 3, 8)).astype(dtype)
    ours = jax.grad(lambda t: jnp.sum(M.embed_tokens({"embed": t}, tokens) * w))(table)
    ref = jax.grad(lambda t: jnp.sum(t[tokens] * w))(table)
    assert ours.dtype == dtype
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(ref, np.float32))
