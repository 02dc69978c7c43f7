"""Tests of galorax.moments: the rotation math, which state fields are moments, and the
error (or the ``moment_fields`` opt-in) for fields galorax does not know."""

from __future__ import annotations

import inspect
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galorax
from galorax.moments import (
    DEFAULT_MOMENT_FIELDS,
    Transition,
    map_moment_fields,
    moment_kinds,
    rotate_moment,
    rotate_moments,
    unrecognized_fields,
)
from galorax.projector_storage import change_of_basis

PARAMS = {"w": jnp.zeros((12, 6)), "b": jnp.zeros(6)}


def _grads(t):
    key = jax.random.fold_in(jax.random.key(0), t)
    return {"w": jax.random.normal(key, (12, 6)), "b": jnp.ones(6) * t}


def _run(tx, steps=5):
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    out = []
    for t in range(steps):
        u, state = update(_grads(t), state, PARAMS)
        out.append(u)
    return out, state


# ---------------------------------------------------------------- the math


def test_rotation_is_exact_for_a_signed_permutation():
    old = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (8, 3)))[0]
    new = old[:, [2, 0, 1]] * jnp.array([1.0, -1.0, 1.0])
    m = jax.random.normal(jax.random.key(2), (3, 5))
    left = rotate_moment(m, new, old, left=True, second=False)
    np.testing.assert_allclose(new @ left, old @ m, atol=1e-5)  # same full-space image
    right = rotate_moment(m.T, new, old, left=False, second=False)
    np.testing.assert_allclose(right @ new.T, m.T @ old.T, atol=1e-5)


def test_second_moments_stay_non_negative():
    old = jnp.linalg.qr(jax.random.normal(jax.random.key(3), (10, 4)))[0]
    new = jnp.linalg.qr(jax.random.normal(jax.random.key(4), (10, 4)))[0]
    v = jax.random.uniform(jax.random.key(5), (4, 7))
    assert bool(jnp.all(rotate_moment(v, new, old, left=True, second=True) >= 0))


def test_rotate_moments_only_when_changed_and_only_moment_fields():
    state = optax.scale_by_amsgrad().init({"w": jnp.zeros((2, 1))})
    one = {"w": jnp.array([[1.0], [2.0]])}
    state = state._replace(mu=one, nu=one, nu_max=one)
    old = jnp.eye(3)[:, :2]
    swap = Transition(jnp.array(True), change_of_basis(old[:, ::-1], old), True, (2, 1))
    out = rotate_moments(state, [swap], moment_kinds())
    np.testing.assert_array_equal(out.mu["w"].ravel(), [2.0, 1.0])
    np.testing.assert_array_equal(out.nu["w"].ravel(), [2.0, 1.0])
    np.testing.assert_array_equal(out.nu_max["w"], one["w"])  # "none": left as it is
    still = rotate_moments(state, [swap._replace(changed=jnp.array(False))], moment_kinds())
    np.testing.assert_array_equal(still.mu["w"], one["w"])


def test_map_moment_fields_walks_wrapped_states():
    tx = optax.chain(optax.masked(optax.scale_by_adam(), {"w": True}), optax.trace(0.9))
    state = tx.init({"w": jnp.zeros(3)})
    seen = []
    map_moment_fields(state, lambda tree, second: seen.append(second) or tree, moment_kinds())
    assert sorted(seen) == [False, False, True]  # mu, trace; nu


# ---------------------------------------------------------------- which fields are moments


def test_known_fields():
    assert moment_kinds() == dict(DEFAULT_MOMENT_FIELDS)
    assert moment_kinds({"nu_max": "second"})["nu_max"] == "second"  # an override


class _Normed(NamedTuple):
    count: jax.Array
    scale: optax.Updates  # per-parameter, but one scalar per leaf: not a moment


def test_scalars_and_nested_states_are_not_unrecognized():
    like = {"w": jnp.zeros((2, 3)), "b": optax.MaskedNode()}
    state = (
        _Normed(jnp.zeros([], jnp.int32), {"w": jnp.zeros(()), "b": optax.MaskedNode()}),
        optax.masked(optax.trace(0.5), {"w": True, "b": False}).init(like),
        optax.inject_hyperparams(optax.scale_by_adam)(b1=0.9).init(like),
    )
    assert unrecognized_fields(state, like, moment_kinds()) == []


@pytest.mark.parametrize(
    "base",
    [
        optax.scale_by_adam(),
        optax.scale_by_lion(),
        optax.scale_by_rms(),
        optax.scale_by_amsgrad(),
        optax.scale_by_belief(),
        optax.scale_by_factored_rms(),
        optax.trace(0.9),
        optax.sgd(0.1, momentum=0.9),
        optax.identity(),
        galorax.scale_by_adam_8bit(min_8bit_size=1),
        optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam()),
        optax.masked(optax.scale_by_adam(), {"w": True, "b": False}),
        optax.inject_hyperparams(optax.scale_by_adam)(b1=0.9),
        optax.apply_if_finite(optax.scale_by_adam(), 3),
    ],
    ids=[
        "adam",
        "lion",
        "rms",
        "amsgrad",
        "belief",
        "factored_rms",
        "trace",
        "sgd",
        "identity",
        "adam_8bit",
        "chain",
        "masked",
        "inject_hyperparams",
        "apply_if_finite",
    ],
)
def test_known_base_optimizers_need_no_opt_in(base):
    galorax.scale_by_galore(rank=2, base_optimizer=base).init(PARAMS)


# ---------------------------------------------------------------- unknown fields: error or opt-in


def test_unknown_moment_field_is_an_error_naming_it():
    for make in (galorax.scale_by_galore, lambda **kw: galorax.galore(0.1, **kw)):
        tx = make(rank=2, base_optimizer=optax.ema(0.9))
        with pytest.raises(ValueError, match=r"EmaState\.ema.*moment_fields"):
            tx.init(PARAMS)
    with pytest.raises(ValueError, match=r"ScaleByAdanState\.m\b.*ScaleByAdanState\.n\b"):
        galorax.scale_by_galore(rank=2, base_optimizer=optax.scale_by_adan()).init(PARAMS)


def test_unknown_fields_are_fine_without_rotation():
    for moments in ("keep", "align"):
        galorax.scale_by_galore(rank=2, base_optimizer=optax.ema(0.9), moments=moments).init(PARAMS)


class _Renamed(NamedTuple):
    count: jax.Array
    velocity: optax.Updates


class _Known(NamedTuple):
    count: jax.Array
    mu: optax.Updates


def _momentum(state_type):
    """Heavy-ball momentum whose state field is ``velocity`` or ``mu``."""

    def init(params):
        return state_type(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        new = jax.tree.map(lambda m, g: 0.9 * m + g, state[1], updates)
        return new, state_type(state.count + 1, new)

    return optax.GradientTransformation(init, update)


def test_opt_in_first_rotates_like_a_known_field():
    kw = dict(rank=3, update_proj_gap=2, stagger=False)
    known = _run(galorax.galore(0.1, base_optimizer=_momentum(_Known), **kw))
    renamed = _run(
        galorax.galore(
            0.1, base_optimizer=_momentum(_Renamed), moment_fields={"velocity": "first"}, **kw
        )
    )
    for a, b in zip(known[0], renamed[0], strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)
    np.testing.assert_array_equal(
        known[1][0].base_optimizer_state.mu["w"], renamed[1][0].base_optimizer_state.velocity["w"]
    )


def test_opt_in_none_leaves_the_field_as_align_does():
    kw = dict(rank=3, update_proj_gap=2, stagger=False, base_optimizer=_momentum(_Renamed))
    none = _run(galorax.scale_by_galore(moment_fields={"velocity": "none"}, **kw))[0]
    align = _run(galorax.scale_by_galore(moments="align", **kw))[0]
    for a, b in zip(none, align, strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("bad", [{"ema": "third"}, {1: "first"}, ["ema"]])
def test_bad_moment_fields(bad):
    with pytest.raises(TypeError, match="moment_fields"):
        galorax.scale_by_galore(moment_fields=bad)
    with pytest.raises(TypeError, match="moment_fields"):
        galorax.galore(0.1, moment_fields=bad)


def test_galore_and_scale_by_galore_share_the_keyword_list():
    def keywords(fn):
        params = inspect.signature(fn).parameters.values()
        return [(p.name, p.default) for p in params if p.kind is p.KEYWORD_ONLY]

    assert keywords(galorax.galore) == keywords(galorax.scale_by_galore)
    assert keywords(galorax.galore)[-1] == ("chunking", None)


def test_chunked_rotation_of_8bit_moments_is_bit_identical():
    """A stacked 8-bit moment rotated a slice at a time equals the whole rotation."""
    from galorax.moments import rotate_moment
    from galorax.quantization.blockwise import quantize_blockwise

    keys = jax.random.split(jax.random.key(0), 3)
    m = quantize_blockwise(jax.random.normal(keys[0], (4, 8, 256)))
    old = jnp.linalg.qr(jax.random.normal(keys[1], (4, 32, 8)))[0]
    new = jnp.linalg.qr(jax.random.normal(keys[2], (4, 32, 8)))[0]
    rot = jax.jit(lambda m, n, o: rotate_moment(m, n, o, left=True, second=False))
    whole = rot(m, new, old)
    one = galorax.Chunking(max_bytes=8 * 256 * 4)
    chunked = jax.jit(
        lambda m, n, o: rotate_moment(m, n, o, left=True, second=False, settings=one)
    )(m, new, old)
    jax.tree.map(np.testing.assert_array_equal, chunked, whole)


@pytest.mark.parametrize("when", [None, True, False])
def test_chunked_rotation_of_dense_moments_is_in_place_and_gated(when):
    """A stacked f32 moment is carried a chunk of slices at a time (in place), equal to the
    whole rotation; ``when=False`` runs no chunk and returns the moment."""
    from galorax.moments import carry_moment

    keys = jax.random.split(jax.random.key(1), 2)
    m = jax.random.normal(keys[0], (6, 8, 32))
    c = jax.random.normal(keys[1], (6, 8, 8))
    whole = jnp.matmul(c * c, m, precision=jax.lax.Precision.HIGHEST)
    two = galorax.Chunking(max_bytes=2 * 8 * 32 * 4)  # two slices a chunk
    flag = None if when is None else jnp.asarray(when)
    out = jax.jit(lambda m, c, w: carry_moment(m, c, left=True, second=True, when=w, settings=two))(
        m, c, flag
    )
    np.testing.assert_allclose(out, m if when is False else whole, rtol=1e-6, atol=1e-6)
