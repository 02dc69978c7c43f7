"""Tests of matrix views, dimension-number resolution and the rules helper."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import galorax
from galorax import GaLoreDimensionNumbers as Dims
from galorax import MatrixView, dimension_numbers_from_rules
from galorax.dimension_numbers import resolve_dimension_numbers


@st.composite
def _view_case(draw):
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    axes = draw(st.permutations(range(ndim)))
    n_red = draw(st.integers(1, ndim - 1))
    n_out = draw(st.integers(1, ndim - n_red))
    return shape, Dims(tuple(axes[:n_red]), tuple(a - ndim for a in axes[n_red : n_red + n_out]))


@settings(max_examples=30, deadline=None)
@given(_view_case())
def test_matrix_view_round_trip(case):
    shape, dims = case
    view = MatrixView.of(shape, dims)
    x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    mat = view.to_matrix(x)
    assert mat.shape == (*view.batch_shape, view.m, view.n)
    assert np.prod(view.batch_shape) * view.m * view.n == x.size
    np.testing.assert_array_equal(view.from_matrix(mat), x)


def test_batch_slices_are_the_named_layers():
    x = jnp.arange(2 * 3 * 4).reshape(2, 3, 4)  # (in, layers, out): MaxText's MLP
    view = MatrixView.of(x.shape, Dims(0, 2))
    for layer in range(3):
        np.testing.assert_array_equal(view.to_matrix(x)[layer], x[:, layer, :])


def test_resolution_rules_follow_optax():
    params = {
        "w": jnp.zeros((3, 4)),
        "t": jnp.zeros((2, 3, 4)),
        "b": jnp.zeros(4),
        "m": optax.MaskedNode(),
    }
    assert resolve_dimension_numbers(params, None) == [None, None, None, Dims()]  # sorted keys
    one = Dims(0, 1)
    assert resolve_dimension_numbers(params, one) == [None, None, one, one]
    assert resolve_dimension_numbers(params, lambda p: {k: None for k in p}) == [None] * 4


def test_rules_first_match_wins_and_bad_rules_name_the_path():
    params = {"attn": {"q": jnp.zeros((8, 2, 4))}, "mlp": jnp.zeros((3, 8, 16))}
    dims = dimension_numbers_from_rules(params, [(r"attn/q", Dims(0, (1, 2))), (r"attn", None)])
    assert dims["attn"]["q"] == Dims(0, (1, 2))
    assert dims["mlp"] == Dims(-2, -1)
    with pytest.raises(ValueError, match="'mlp'.*out of range"):
        dimension_numbers_from_rules(params, [(r"mlp", Dims(0, 5))])


def test_default_rules_know_framework_names():
    """Norms and embeddings as Equinox (`weight`), linen/NNX (`scale`) and MaxText name
    them: stacked over layers into 2-D, still never projected; kernels still are."""
    params = {
        "blocks": {
            "norm1": {"weight": jnp.zeros((3, 16)), "bias": jnp.zeros((3, 16))},
            "ln_2": {"weight": jnp.zeros((3, 16))},
            "LayerNorm_0": {"scale": jnp.zeros((3, 16))},
            "mlp": {"weight": jnp.zeros((3, 16, 16)), "kernel": jnp.zeros((3, 16, 16))},
        },
        "embedding": {"weight": jnp.zeros((50, 16))},
        "ln_f": {"weight": jnp.zeros((3, 16))},
        "token_embedder": {"embedding": jnp.zeros((50, 16))},
        "head": {"weight": jnp.zeros((16, 50))},
    }
    dims = dimension_numbers_from_rules(params)
    blocks = dims["blocks"]
    assert blocks["norm1"] == {"weight": None, "bias": None}
    assert blocks["ln_2"]["weight"] is None and blocks["LayerNorm_0"]["scale"] is None
    assert blocks["mlp"] == {"weight": Dims(-2, -1), "kernel": Dims(-2, -1)}
    assert dims["embedding"]["weight"] is None and dims["ln_f"]["weight"] is None
    assert dims["token_embedder"]["embedding"] is None
    assert dims["head"]["weight"] == Dims(0, 1)


def test_rules_see_through_nnx_variables():
    """nnx.Optimizer's init sees `layers/bias/value` paths, its update `layers/bias`."""
    nnx = pytest.importorskip("flax.nnx")
    boxed = {
        "bias": nnx.Param(jnp.zeros((3, 8))),
        "kernel": nnx.Param(jnp.zeros((3, 8, 8))),
        "norm": {"scale": nnx.Param(jnp.zeros((3, 8)))},
    }
    plain = {"bias": jnp.zeros((3, 8)), "kernel": jnp.zeros((3, 8, 8)), "norm": {"scale": None}}
    plain["norm"]["scale"] = jnp.zeros((3, 8))
    want = {"bias": None, "kernel": Dims(-2, -1), "norm": {"scale": None}}
    assert dimension_numbers_from_rules(boxed) == want == dimension_numbers_from_rules(plain)
    assert resolve_dimension_numbers(boxed, dimension_numbers_from_rules) == [
        None,
        Dims(-2, -1),
        None,
    ]


def test_path_names_drop_a_trailing_value_attribute():
    from galorax.dimension_numbers import path_str as _path_str

    key, attr = jax.tree_util.DictKey, jax.tree_util.GetAttrKey
    assert _path_str((key("layers"), key("bias"), attr("value"))) == "layers/bias"
    assert _path_str((key("attn"), key("value"), key("kernel"))) == "attn/value/kernel"


def test_none_and_masked_leaves_resolve():
    """eqx.filter leaves None, optax.partition MaskedNode: per-leaf trees and callables
    (the rules among them) accept both."""
    params = {"w": jnp.zeros((3, 4)), "b": None, "m": optax.MaskedNode(), "t": jnp.zeros((2, 3))}
    tree = {"w": Dims(), "b": None, "m": optax.MaskedNode(), "t": None}
    assert resolve_dimension_numbers(params, tree) == [None, None, Dims()]  # m, t, w
    assert resolve_dimension_numbers(params, dict(tree, m=None)) == [None, None, Dims()]
    by_rules = resolve_dimension_numbers(params, dimension_numbers_from_rules)
    assert by_rules == [None, Dims(0, 1), Dims(0, 1)]
    assert dimension_numbers_from_rules(params)["m"] is None


def test_callable_static_tree_is_not_called():
    """A static tree whose nodes are callable (every eqx.Module is) stays a tree; a
    jax.tree_util.Partial of the rules is still a function."""

    class CallableTree(dict):
        def __call__(self, *args):
            raise AssertionError("a static tree was called")

    jax.tree_util.register_pytree_node(
        CallableTree,
        lambda d: (list(d.values()), list(d)),
        lambda k, v: CallableTree(zip(k, v, strict=True)),
    )
    params = CallableTree(w=jnp.zeros((3, 4)), b=jnp.zeros(4))
    dims = CallableTree(w=Dims(1, 0), b=None)
    assert resolve_dimension_numbers(params, dims) == [Dims(1, 0), None]
    rules = jax.tree_util.Partial(dimension_numbers_from_rules, rules=[("w", Dims(1, 0))])
    assert resolve_dimension_numbers({"w": jnp.zeros((3, 4))}, rules) == [Dims(1, 0)]


def test_rules_called_with_a_step_count_name_static_args():
    with pytest.raises(TypeError, match="static_args=\\('weight_dimension_numbers',\\)"):
        dimension_numbers_from_rules(jnp.zeros([], jnp.int32))


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught]


def test_drop_in_default_warns_once_about_stacked_leaves():
    params = {"stack_once": jnp.zeros((3, 4, 5)), "w": jnp.zeros((4, 5))}
    first = _caught(lambda: resolve_dimension_numbers(params, None))
    assert len(first) == 1 and "3+ axes stay unprojected (stack_once (3, 4, 5))" in first[0]
    assert _caught(lambda: resolve_dimension_numbers(params, None)) == []
    assert _caught(lambda: resolve_dimension_numbers({"w": jnp.zeros((4, 5))}, None)) == []


def test_layout_guesses_that_look_wrong_warn():
    """Under the number-of-axes default, NNX MHA query kernels and MaxText stacks (layers
    second) warn; the default layouts get them right (tests/lib/test_rules.py)."""
    for name, shape in [("attn/query/kernel", (64, 4, 16)), ("mlp/wi_0", (32, 3, 48))]:
        outer, inner = name.rsplit("/", 1)
        params = {outer: {inner: jnp.zeros(shape)}}
        by_ndim = galorax.default_dimension_numbers
        messages = _caught(lambda p=params, d=by_ndim: dimension_numbers_from_rules(p, default=d))
        assert len(messages) == 1 and f"{name!r} {shape}" in messages[0]
        assert "rule" in messages[0]


def test_plain_stacks_do_not_warn():
    params = {"layers": {"kernel": jnp.zeros((3, 8, 16)), "bias": jnp.zeros((3, 16))}}
    assert _caught(lambda: dimension_numbers_from_rules(params)) == []


@pytest.mark.parametrize(
    "rules,exc,words",
    [
        ([("w", (0, 1))], TypeError, r"rules\[0\].*GaLoreDimensionNumbers or None"),
        ([("b", None), ("w", "abc")], TypeError, r"rules\[1\]"),
        ([("w(", None)], ValueError, r"rules\[0\].*bad regex 'w\('"),
        (["w"], TypeError, r"rules\[0\].*pair"),
        ([(3, None)], TypeError, r"rules\[0\].*pattern must be a regex"),
        ([("nomatch", Dims(0.5, 1))], TypeError, r"rules\[0\].*reduction_axis must be an int"),
        ("w", TypeError, "`rules` must be a list"),
    ],
)
def test_bad_rules_name_the_rule(rules, exc, words):
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    with pytest.raises(exc, match=words) as err:
        dimension_numbers_from_rules(params, rules)
    assert "\n" not in str(err.value)


def test_rule_with_float_axis_names_the_path_when_matched_at_shape_check():
    params = {"w": jnp.zeros((4, 3))}
    dims = dimension_numbers_from_rules(params, [(r"w", Dims(np.int64(0), (1,)))])
    assert MatrixView.of((4, 3), dims["w"]).m == 4
