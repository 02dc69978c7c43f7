"""The default layouts of :func:`galorax.dimension_numbers_from_rules` (galorax/rules.py):
each framework's names (Flax linen/NNX attention, MaxText scanned stacks, Equinox), shapes
where names do not tell, one-time warnings for what remains a guess."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import pytest

import galorax
from galorax import GaLoreDimensionNumbers as Dims
from galorax import dimension_numbers_from_rules
from galorax.dimension_numbers import resolve_dimension_numbers
from galorax.rules import infer_layout

ATTN_IN, ATTN_OUT = Dims(0, (1, 2)), Dims((0, 1), 2)


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught]


def _shapes(tree):
    return jax.tree.map(lambda s: jnp.zeros(s), tree, is_leaf=lambda x: isinstance(x, tuple))


def test_nnx_multi_head_attention_kernels():
    """Issue 15, point 8: an NNX MHA query kernel (64, 4, 16) is one 64 x 64 matrix, not
    64 projectors of (4, 16); `out` (heads, head_dim, out) likewise; biases stay out."""
    nnx = pytest.importorskip("flax.nnx")
    mha = nnx.MultiHeadAttention(num_heads=4, in_features=64, decode=False, rngs=nnx.Rngs(0))
    params = nnx.state(mha, nnx.Param)
    dims, messages = _caught(lambda: dimension_numbers_from_rules(params))
    assert messages == []
    for name in ("query", "key", "value"):
        assert dims[name]["kernel"] == ATTN_IN and dims[name]["bias"] is None
    assert dims["out"]["kernel"] == ATTN_OUT and dims["out"]["bias"] is None
    tx = galorax.galore(1e-2, rank=8, weight_dimension_numbers=dimension_numbers_from_rules)
    proj = tx.init(params)[0].projector
    assert proj["query"]["kernel"].shape == (64, 8) and proj["out"]["kernel"].shape == (64, 8)


def test_stacked_nnx_attention_keeps_one_projector_per_layer():
    nnx = pytest.importorskip("flax.nnx")

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return nnx.MultiHeadAttention(num_heads=2, in_features=16, decode=False, rngs=rngs)

    params = nnx.state(create(nnx.Rngs(0)), nnx.Param)
    dims, messages = _caught(lambda: dimension_numbers_from_rules(params))
    assert messages == []
    assert dims["query"]["kernel"] == Dims(-3, (-2, -1))  # (3, 16, 2, 8)
    assert dims["out"]["kernel"] == Dims((-3, -2), -1)  # (3, 2, 8, 16)
    assert dims["query"]["bias"] is None and dims["out"]["bias"] is None


def test_linen_attention_kernels():
    nn = pytest.importorskip("flax.linen")
    mha = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16)
    params = mha.init(jax.random.key(0), jnp.ones((1, 3, 16)))["params"]
    dims = dimension_numbers_from_rules(params)
    assert dims["query"]["kernel"] == ATTN_IN and dims["out"]["kernel"] == ATTN_OUT


def test_maxtext_scanned_layers_are_the_second_axis():
    """Issue 15, point 8: MaxText scans layers into axis 1: `wi_0` (embed, layers, mlp) is 3
    layers of 32 x 48, not 32 matrices of 3 x 48; attention (embed, layers, heads,
    head_dim) and out (heads, layers, head_dim, embed) too; GQA's fewer kv heads."""
    emb, layers, heads, kv, hd, mlp = 32, 3, 4, 2, 8, 48
    params = _shapes(
        {
            "token_embedder": {"embedding": (64, emb)},
            "decoder": {
                "layers": {
                    "mlp": {
                        "wi_0": {"kernel": (emb, layers, mlp)},
                        "wo": {"kernel": (mlp, layers, emb)},
                    },
                    "self_attention": {
                        "query": {"kernel": (emb, layers, heads, hd)},
                        "key": {"kernel": (emb, layers, kv, hd)},
                        "out": {"kernel": (heads, layers, hd, emb)},
                    },
                    "pre_self_attention_layer_norm": {"scale": (emb, layers)},
                },
                "decoder_norm": {"scale": (emb,)},
                "logits_dense": {"kernel": (emb, 64)},
            },
        }
    )
    dims, messages = _caught(lambda: dimension_numbers_from_rules(params))
    assert messages == []
    block = dims["decoder"]["layers"]
    assert block["mlp"] == {"wi_0": {"kernel": Dims(0, 2)}, "wo": {"kernel": Dims(0, 2)}}
    attn = block["self_attention"]
    assert attn["query"]["kernel"] == attn["key"]["kernel"] == Dims(0, (2, 3))
    assert attn["out"]["kernel"] == Dims((0, 2), 3)
    assert block["pre_self_attention_layer_norm"]["scale"] is None
    assert dims["token_embedder"]["embedding"] is None
    assert dims["decoder"]["logits_dense"]["kernel"] == Dims(0, 1)
    proj = galorax.galore(1e-2, rank=4, weight_dimension_numbers=dims).init(params)[0].projector
    assert proj["decoder"]["layers"]["mlp"]["wi_0"]["kernel"].shape == (layers, mlp, 4)
    assert proj["decoder"]["layers"]["self_attention"]["query"]["kernel"].shape == (layers, emb, 4)


def test_the_issue_shapes_bare():
    """The two shapes of the issue under their bare names (no `kernel`)."""
    params = {"attn": {"query": jnp.zeros((64, 4, 16))}, "mlp": {"wi_0": jnp.zeros((32, 3, 48))}}
    dims, messages = _caught(lambda: dimension_numbers_from_rules(params))
    assert messages == [] and dims == {"attn": {"query": ATTN_IN}, "mlp": {"wi_0": Dims(0, 2)}}


def test_names_without_the_shapes_are_plain_stacks():
    """A stacked Linear named `query` (layers, d, d) is not attention (its first axis is
    smaller than the heads); an `out` without attention beside it is a plain stack."""
    params = _shapes({"blk": {"query": {"kernel": (3, 8, 8)}, "out": {"kernel": (3, 8, 16)}}})
    dims, messages = _caught(lambda: dimension_numbers_from_rules(params))
    assert messages == []
    assert dims["blk"] == {"query": {"kernel": Dims(-2, -1)}, "out": {"kernel": Dims(-2, -1)}}
    assert infer_layout("attn/out/kernel", (4, 16, 64)) == Dims(-2, -1)  # no sibling heads


def test_equinox_and_leading_stacks_unchanged():
    params = _shapes({"blocks": {"mlp": {"weight": (3, 16, 8)}, "norm": {"weight": (3, 16)}}})
    dims, messages = _caught(lambda: dimension_numbers_from_rules(params))
    assert messages == [] and dims["blocks"] == {
        "mlp": {"weight": Dims(-2, -1)},
        "norm": {"weight": None},
    }


def test_what_remains_a_guess_warns_once():
    """Shape alone moves the stack axis: said once. Nothing fits: the old warning."""
    params = {"guessed_x": jnp.zeros((3, 2, 8)), "heads_y": jnp.zeros((5, 16, 1))}
    dims, messages = _caught(lambda: dimension_numbers_from_rules(params))
    assert dims == {"guessed_x": Dims(0, 2), "heads_y": Dims(-2, -1)}
    assert len(messages) == 2 and all("\n" not in m for m in messages)
    assert "'guessed_x' (3, 2, 8)" in messages[0] and "second axis" in messages[0]
    assert "'heads_y' (5, 16, 1)" in messages[1] and "rule" in messages[1]
    assert _caught(lambda: dimension_numbers_from_rules(params))[1] == []


def test_default_by_number_of_axes_is_still_available():
    params = {"attn_by_ndim": {"query": {"kernel": jnp.zeros((64, 4, 16))}}}
    dims, messages = _caught(
        lambda: dimension_numbers_from_rules(params, default=galorax.default_dimension_numbers)
    )
    assert dims["attn_by_ndim"]["query"]["kernel"] == Dims(-2, -1)
    assert len(messages) == 1 and "likely not its layout" in messages[0]


def test_drop_in_default_stays_optax_and_says_what_it_does():
    """Issue 15, point 9: weight_dimension_numbers=None is optax's rule (2-D leaves only),
    so stacked kernels stay unprojected and (L, D) norms/biases are projected: said once,
    with the fix (and static_args for inject_hyperparams)."""
    params = _shapes(
        {"layers_p9": {"kernel": (3, 8, 8), "bias": (3, 8), "norm": {"scale": (3, 8)}}, "w": (8, 8)}
    )
    dims, messages = _caught(lambda: resolve_dimension_numbers(params, None))
    assert dims == [Dims(), None, Dims(), Dims()]  # layers_p9/{bias, kernel, norm/scale}, w
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "layers_p9/kernel (3, 8, 8)" in messages[0]
    assert "2 stacked norms/biases are projected" in messages[0]
    assert "static_args=('weight_dimension_numbers',)" in messages[0]
