"""Tests of galorax.step_gate: a skipped step leaves galorax's states as they were, in place
(no copy of the state in the compiled step), and a finite step is unchanged by the gate,
which reaches the transforms as an argument (``update(..., gate=gate)``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galorax
from galorax.step_gate import StepGate, gate_of

PARAMS = {"stack": jnp.ones((4, 16, 8)), "w": jnp.ones((16, 8)), "b": jnp.ones(8)}
DIMS = {
    "stack": galorax.GaLoreDimensionNumbers((1,), (2,)),
    "w": galorax.GaLoreDimensionNumbers((0,), (1,)),
    "b": None,
}


CHUNKS = galorax.Chunking(max_bytes=2 * 16 * 8 * 4)  # stacks in chunks


def _optimizers():
    eight = galorax.scale_by_adam_8bit(min_8bit_size=16, block_size=32, chunking=CHUNKS)
    kw = {"rank": 2, "weight_dimension_numbers": DIMS, "chunking": CHUNKS}
    return {
        "galore": galorax.scale_by_galore(**kw),
        "galore-int8P-residual": galorax.scale_by_galore(
            **kw, projector_bits=8, residual=galorax.Residual()
        ),
        "galore-8bit": galorax.scale_by_galore(**kw, base_optimizer=eight),
        "adam8bit": eight,
        "chained": optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.inject_hyperparams(galorax.galore, static_args=("rank", "update_proj_gap"))(
                learning_rate=0.1, **kw
            ),
        ),
    }


def _grads(seed: int, bad: bool = False):
    keys = jax.random.split(jax.random.key(seed), 3)
    g = {
        k: jax.random.normal(key, p.shape) for (k, p), key in zip(PARAMS.items(), keys, strict=True)
    }
    return {**g, "b": jnp.full(8, jnp.nan)} if bad else g


def _gated_update(opt, finite):
    @jax.jit
    def update(grads, state, finite):
        gate = StepGate(finite)
        updates, new = opt.update(grads, state, PARAMS, gate=gate)
        return updates, gate.keep(new, state)

    return lambda grads, state: update(grads, state, jnp.asarray(finite))


def _assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _assert_trees_close(a, b):
    """Two programs (gated, not) may contract multiply-adds differently: to the last bits."""
    close = lambda x, y: np.testing.assert_allclose(  # noqa: E731
        np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=1e-6, atol=1e-7
    )
    jax.tree.map(close, a, b)


@pytest.mark.parametrize("name", list(_optimizers()))
def test_a_finite_step_is_what_it_is_without_the_gate(name):
    opt = _optimizers()[name]
    state = opt.init(PARAMS)
    plain = jax.jit(lambda g, s: opt.update(g, s, PARAMS))
    gated = _gated_update(opt, True)
    for t in range(2):  # the first step refreshes every projector
        want, want_state = plain(_grads(t), state)
        got, got_state = gated(_grads(t), state)
        _assert_trees_close(got, want)
        _assert_trees_close(got_state, want_state)
        state = want_state


@pytest.mark.parametrize("name", list(_optimizers()))
@pytest.mark.parametrize("bad", [False, True])
def test_a_skipped_step_leaves_the_state_as_it_was(name, bad):
    opt = _optimizers()[name]
    state = opt.init(PARAMS)
    _, state = jax.jit(lambda g, s: opt.update(g, s, PARAMS))(_grads(0), state)
    _, kept = _gated_update(opt, False)(_grads(1, bad), state)
    _assert_trees_equal(kept, state)


def test_galorax_transforms_cover_their_state_and_others_get_the_select():
    opt = _optimizers()["chained"]
    state = opt.init(PARAMS)
    gate = StepGate(jnp.asarray(False))
    _, new = opt.update(_grads(0), state, PARAMS, gate=gate)
    galore_state = new[1].inner_state[0]  # galore = chain(scale_by_galore, decay, lr)
    assert gate.covers(galore_state) and not gate.covers(new[1])
    kept = gate.keep(new, state)
    assert kept[1].inner_state[0] is galore_state  # passed as it is: it skipped in place
    _assert_trees_equal(kept[1].count, state[1].count)  # inject_hyperparams': selected


def _step_temp(opt, state, grads, gated: bool) -> int:
    """Temporaries of a compiled, state-donating step that skips when not ``finite``."""

    def step(grads, state, finite):
        if gated:
            gate = StepGate(finite)
            _, new = opt.update(grads, state, gate=gate)
            return gate.keep(new, state)
        _, new = opt.update(grads, state)
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)

    lowered = jax.jit(step, donate_argnums=1).lower(grads, state, jnp.asarray(True))
    return lowered.compile().memory_analysis().temp_size_in_bytes


def test_a_gated_8bit_step_needs_no_copy_of_the_codes():
    """The select after a chunked (in-place) 8-bit update copies every code; the gate's
    select inside the chunk loop does not."""
    two = galorax.Chunking(max_bytes=2 * 4 * 256 * 256)  # two f32 slices
    opt = galorax.scale_by_adam_8bit(chunking=two)
    grads = {"stack": jax.ShapeDtypeStruct((16, 256, 256), jnp.bfloat16)}
    state = jax.eval_shape(opt.init, grads)
    codes = 2 * 16 * 256 * 256  # mu's and nu's int8 codes
    gated, plain = (_step_temp(opt, state, grads, g) for g in (True, False))
    assert plain - gated >= codes, (gated, plain, codes)  # one copy of every code less


def test_the_gate_is_an_argument_not_ambient_state():
    """Without ``gate=`` the update is the ungated one; a wrong ``gate`` is named."""
    opt = _optimizers()["chained"]
    state = opt.init(PARAMS)
    plain, _ = opt.update(_grads(1, bad=True), state, PARAMS)
    assert not bool(
        jnp.all(jnp.isfinite(plain[1]["b"] if isinstance(plain, tuple) else plain["b"]))
    )
    with pytest.raises(TypeError, match="`gate` must be a galorax.StepGate"):
        gate_of({"gate": True})
