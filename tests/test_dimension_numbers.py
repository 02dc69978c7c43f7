"""Tests of matrix views, dimension-number resolution and the rules helper."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
