"""Bad arguments and inputs of scale_by_galore raise one-line errors that name them
(issue 14, point 11), and the ``skip_nonfinite`` opt-in (point 12)."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galorax
from galorax import GaLoreDimensionNumbers as Dims

PARAMS = {"w": jnp.ones((8, 4)), "b": jnp.ones(4)}


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("name", ["rank", "update_proj_gap"])
def test_numpy_ints_are_accepted(name):
    tx = galorax.scale_by_galore(**{"rank": 2, "update_proj_gap": 3, name: np.int64(2)})
    state = tx.init(PARAMS)
    assert state.projector["w"].shape == (8, 2)
    ref = galorax.scale_by_galore(**{"rank": 2, "update_proj_gap": 3, name: 2})
    got, _ = tx.update(PARAMS, state)
    want, _ = ref.update(PARAMS, ref.init(PARAMS))
    jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(base_optimizer="adam"), TypeError, r"`base_optimizer`.*optax\.scale_by_adam\(\)"),
        (dict(base_optimizer=3), TypeError, "`base_optimizer`"),
        (dict(scale="abc"), TypeError, "`scale` must be a real number"),
        (dict(scale=None), TypeError, "`scale`"),
        (dict(stagger="no"), TypeError, "`stagger` must be True or False"),
        (dict(stagger=1), TypeError, "`stagger`"),
        (dict(skip_nonfinite="yes"), TypeError, "`skip_nonfinite`"),
        (dict(rank=2.0), TypeError, "`rank` must be a positive int"),
        (dict(rank=np.int64(0)), TypeError, "`rank`"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, exc, words):
    with pytest.raises(exc, match=words) as err:
        galorax.scale_by_galore(**kwargs)
    _one_line(err)
    with pytest.raises(exc, match=words):
        galorax.galore(1e-3, **kwargs)


@pytest.mark.parametrize("scale", [0.5, 2, np.float32(0.5), jnp.asarray(0.5)])
def test_numeric_scales_pass(scale):
    tx = galorax.scale_by_galore(rank=2, scale=scale)
    tx.update(PARAMS, tx.init(PARAMS))


def test_scale_under_inject_hyperparams():
    tx = optax.inject_hyperparams(galorax.scale_by_galore, static_args=("rank", "update_proj_gap"))(
        rank=2, scale=0.5
    )
    # A full-rank gradient: with PARAMS' rank-1 ones the second basis vector is rounding
    # noise, which Adam's first step scales up to a unit update (eager != jit).
    grads = {"w": jax.random.normal(jax.random.key(0), (8, 4)), "b": jnp.ones(4)}
    state = tx.init(PARAMS)
    updates, state = jax.jit(tx.update)(grads, state)
    ref = galorax.scale_by_galore(rank=2, scale=0.5)
    want, _ = ref.update(grads, ref.init(PARAMS))
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # noqa: E731
    jax.tree.map(close, updates, want)


@pytest.mark.parametrize(
    "grads,words",
    [
        ({"w": jnp.ones((8, 4))}, r"missing \['b'\]"),
        ({"w": jnp.ones((8, 4)), "b": jnp.ones(4), "c": jnp.ones(3)}, r"unexpected \['c'\]"),
        ({"w": jnp.ones((8, 4)), "b": {"x": jnp.ones(4)}}, "unlike the params"),
    ],
)
def test_update_tree_mismatch_names_it(grads, words):
    tx = galorax.scale_by_galore(rank=2)
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match=words) as err:
        tx.update(grads, state)
    _one_line(err)
    with pytest.raises(ValueError, match=words):
        jax.jit(tx.update)(grads, state)


@pytest.mark.parametrize("leaf", [1.0, 3])
@pytest.mark.parametrize("dims", [None, Dims(0, 1)])
def test_python_scalar_leaf_names_its_path(leaf, dims):
    tx = galorax.scale_by_galore(rank=2, weight_dimension_numbers=dims)
    with pytest.raises(TypeError, match=r"leaf at 'layer/b' is a (float|int).*jnp.asarray") as err:
        tx.init({"w": jnp.ones((8, 4)), "layer": {"b": leaf}})
    _one_line(err)


@pytest.mark.parametrize(
    "dims,words",
    [
        (Dims(0.5, 1), r"params\['w'\].*reduction_axis must be an int axis.*0\.5"),
        (Dims(0, (1, 0.5)), r"output_axis must be an int axis"),
        (Dims(0, "1"), r"output_axis"),
    ],
)
def test_non_int_axis_names_it(dims, words):
    tx = galorax.scale_by_galore(rank=2, weight_dimension_numbers=dims)
    with pytest.raises(TypeError, match=words) as err:
        tx.init(PARAMS)
    _one_line(err)


def test_numpy_int_axes_are_accepted():
    tx = galorax.scale_by_galore(rank=2, weight_dimension_numbers=Dims(np.int64(0), (1,)))
    assert tx.init(PARAMS).projector["w"].shape == (8, 2)


# ---- skip_nonfinite (point 12) ----------------------------------------------------------


def test_skip_nonfinite_keyword_on_both():
    for fn in (galorax.scale_by_galore, galorax.galore):
        param = inspect.signature(fn).parameters["skip_nonfinite"]
        assert param.kind is param.KEYWORD_ONLY and param.default is False


def _tree():
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {
        "w": jax.random.normal(keys[0], (8, 6)),
        "v": jax.random.normal(keys[1], (6, 5)),
        "b": jax.random.normal(keys[2], (6,)),
    }
    grads = [jax.tree.map(lambda p, i=i: p * (0.5 + i) + 0.1 * i, params) for i in range(4)]
    return params, grads


def _run(tx, params, grads):
    state = tx.init(params)
    update = jax.jit(tx.update)  # one compile per run, not op by op (compile-bound suite)
    outs, states = [], []
    for g in grads:
        out, state = update(g, state, params)
        outs.append(out)
        states.append(state)
    return outs, states


@pytest.mark.parametrize("residual", [None, True])
@pytest.mark.parametrize("poisoned", ["w", "b"])
def test_skip_nonfinite_leaves_a_nan_leaf_untouched(poisoned, residual):
    params, grads = _tree()
    bad = list(grads)
    bad[2] = {**grads[2], poisoned: grads[2][poisoned].at[0].set(jnp.nan)}
    kw = dict(rank=2, update_proj_gap=2, residual=residual, stagger=False, subspace="svd")
    on = galorax.scale_by_galore(skip_nonfinite=True, **kw)
    outs, states = _run(on, params, bad)
    others = [k for k in params if k != poisoned]
    # Without the NaN leaf, the others step as they do alone.
    sub = {k: params[k] for k in others}
    ref_outs, ref_states = _run(
        galorax.scale_by_galore(**kw), sub, [{k: g[k] for k in others} for g in bad]
    )
    for k in others:
        for a, b in zip(outs, ref_outs, strict=True):
            np.testing.assert_array_equal(a[k], b[k])
        for name in ("mu", "nu"):
            got = getattr(states[-1].base_optimizer_state, name)[k]
            want = getattr(ref_states[-1].base_optimizer_state, name)[k]
            np.testing.assert_array_equal(got, want)
    # The NaN leaf: zero update, moments and projector as before the step.
    np.testing.assert_array_equal(outs[2][poisoned], jnp.zeros_like(outs[2][poisoned]))
    before, after = states[1], states[2]
    for name in ("mu", "nu"):
        np.testing.assert_array_equal(
            getattr(after.base_optimizer_state, name)[poisoned],
            getattr(before.base_optimizer_state, name)[poisoned],
        )
    jax.tree.map(
        np.testing.assert_array_equal, after.projector[poisoned], before.projector[poisoned]
    )
    if poisoned == "w":  # a refresh step: without the guard the projector would change
        assert not np.array_equal(after.projector["v"], before.projector["v"])
    assert int(after.count) == 3
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((outs, states[-1])))


def test_skip_nonfinite_one_leaf_keeps_whole_state():
    param = jnp.ones((8, 4))
    tx = galorax.scale_by_galore(rank=2, skip_nonfinite=True)
    state = tx.init(param)
    out, state = tx.update(param, state)
    out2, state2 = tx.update(param.at[0, 0].set(jnp.inf), state)
    np.testing.assert_array_equal(out2, jnp.zeros_like(out2))
    jax.tree.map(
        np.testing.assert_array_equal, state2.base_optimizer_state, state.base_optimizer_state
    )


@pytest.mark.parametrize("with_nan", [False, True])
def test_skip_nonfinite_default_is_unchanged(with_nan):
    params, grads = _tree()
    if with_nan:
        grads[1] = {**grads[1], "w": grads[1]["w"].at[0].set(jnp.nan)}
    default = _run(galorax.scale_by_galore(rank=2, update_proj_gap=2), params, grads)
    off = _run(
        galorax.scale_by_galore(rank=2, update_proj_gap=2, skip_nonfinite=False), params, grads
    )
    jax.tree.map(np.testing.assert_array_equal, default, off)
    if not with_nan:  # finite gradients: the opt-in changes nothing, bit for bit
        on = _run(
            galorax.scale_by_galore(rank=2, update_proj_gap=2, skip_nonfinite=True), params, grads
        )
        jax.tree.map(np.testing.assert_array_equal, default, on)


def test_skip_nonfinite_jits_with_galore_chain():
    params, grads = _tree()
    bad = {**grads[0], "v": grads[0]["v"] * jnp.inf}
    tx = galorax.galore(1e-2, rank=2, skip_nonfinite=True)
    state = tx.init(params)
    out, state = jax.jit(tx.update)(bad, state, params)
    assert bool(jnp.all(out["v"] == 0)) and bool(jnp.all(jnp.isfinite(out["w"])))


@pytest.mark.parametrize("make", [galorax.galore, galorax.apollo])
def test_zero_size_leaves_pass_through_as_optax_galore(make):
    """A zero-size leaf has no subspace: it is not projected, its update has its shape
    (``optax.contrib.galore`` returns one; galorax raised an internal TypeError)."""
    params = {"w": jnp.ones((0, 8)), "v": jnp.ones((4, 8)), "s": jnp.ones((3, 0, 4))}
    tx = make(0.1, rank=2, weight_dimension_numbers=galorax.dimension_numbers_from_rules)
    updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
    assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, params)
