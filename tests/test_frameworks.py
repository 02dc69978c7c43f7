"""GaLore where JAX users train: Flax NNX's nnx.Optimizer, Equinox, optax's wrappers."""

from __future__ import annotations

import doctest
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galorax
from galorax import GaLoreDimensionNumbers as Dims
from galorax import dimension_numbers_from_rules

nnx = pytest.importorskip("flax.nnx")
eqx = pytest.importorskip("equinox")

LAYERS, WIDTH, RANK = 3, 8, 2


class Mlp(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(8, 16, rngs=rngs)
        self.norm = nnx.LayerNorm(16, rngs=rngs)
        self.l2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.norm(self.l1(x))))


class Stack(nnx.Module):
    """``LAYERS`` Linear layers created with ``nnx.vmap``, run with ``nnx.scan``."""

    def __init__(self, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return nnx.Linear(WIDTH, WIDTH, rngs=rngs)

        self.layers = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(h, layer):
            return jnp.tanh(layer(h))

        return body(x, self.layers)


def _batch(d_in, d_out):
    x = jax.random.normal(jax.random.key(1), (16, d_in))
    return x, jnp.sin(x[:, :d_out] * 3)


def _mse(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


def _nnx_train(model, tx, x, y, steps, jit):
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def step(model, opt):
        loss, grads = nnx.value_and_grad(_mse)(model, x, y)
        opt.update(model, grads)
        return loss

    step = nnx.jit(step) if jit else step
    losses = [float(step(model, opt)) for _ in range(steps)]
    return opt, losses


@pytest.mark.parametrize("jit", [False, True])
def test_nnx_optimizer_matches_a_functional_loop(jit):
    """nnx writes the state back through nnx.state(...) at each update: GaLore's state
    survives it (schedules stay RefreshSchedules) and the steps equal optax's own loop."""
    x, y = _batch(8, 4)
    tx = galorax.galore(1e-2, rank=RANK, update_proj_gap=2)
    model = Mlp(nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    opt, losses = _nnx_train(model, tx, x, y, steps=5, jit=jit)
    assert losses[-1] < losses[0]
    schedule = nnx.as_pure(opt.opt_state)[0].schedule
    assert isinstance(schedule["l1"]["kernel"], galorax.RefreshSchedule)

    graphdef = nnx.graphdef(Mlp(nnx.Rngs(0)))
    loss_of = lambda p: _mse(nnx.merge(graphdef, p), x, y)
    state = tx.init(params)
    for _ in range(5):
        updates, state = tx.update(jax.grad(loss_of)(params), state, params)
        params = optax.apply_updates(params, updates)
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, params)


def test_nnx_stacked_layers_get_per_layer_projectors():
    """nnx.vmap-created layers: one projector per layer from the rules, though init sees
    ``layers/bias/value`` paths and update ``layers/bias``; each layer's update lies in
    its own projector's span."""
    x, y = _batch(WIDTH, WIDTH)
    tx = galorax.galore(
        3e-2, rank=RANK, update_proj_gap=3, weight_dimension_numbers=dimension_numbers_from_rules
    )
    model = Stack(nnx.Rngs(0))
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))["layers"]["kernel"]
    opt, losses = _nnx_train(model, tx, x, y, steps=1, jit=True)
    state = nnx.as_pure(opt.opt_state)[0]
    proj = state.projector["layers"]["kernel"]
    assert proj.shape == (LAYERS, WIDTH, RANK)
    assert optax.tree_utils.tree_get(state.projector, "bias") == optax.MaskedNode()
    delta = nnx.to_pure_dict(nnx.state(model, nnx.Param))["layers"]["kernel"] - before
    for i in range(LAYERS):
        inside = proj[i] @ (proj[i].T @ delta[i])
        np.testing.assert_allclose(inside, delta[i], atol=1e-6)
    assert not np.allclose(proj[0], proj[1])
    _, losses = _nnx_train(model, tx, x, y, steps=6, jit=True)
    assert losses[-1] < losses[0]


def test_equinox_filter_jit_with_none_leaves():
    """eqx.filter of an MLP holds None leaves (activations, missing biases)."""
    model = eqx.nn.MLP(6, 3, 16, depth=2, use_bias=False, key=jax.random.key(0))
    x, y = _batch(6, 3)
    params, static = eqx.partition(model, eqx.is_array)
    tx = galorax.galore(
        1e-2, rank=RANK, update_proj_gap=2, weight_dimension_numbers=dimension_numbers_from_rules
    )
    state = tx.init(params)
    assert state[0].projector.layers[1].weight.shape == (16, RANK)

    @eqx.filter_jit
    def step(params, state):
        loss, grads = eqx.filter_value_and_grad(
            lambda p: jnp.mean((jax.vmap(eqx.combine(p, static))(x) - y) ** 2)
        )(params)
        updates, state = tx.update(grads, state, params)
        return eqx.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(6):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_equinox_module_as_a_static_dimension_numbers_tree():
    """Every eqx.Module is callable: a tree of them is still a tree, never called."""
    model = eqx.nn.MLP(6, 3, 16, depth=1, key=jax.random.key(0))
    params = eqx.filter(model, eqx.is_array)
    dims = jax.tree.map(lambda p: Dims() if p.ndim == 2 else None, params)
    assert callable(dims)
    state = galorax.galore(1e-2, rank=RANK, weight_dimension_numbers=dims).init(params)
    assert state[0].projector.layers[0].weight.shape == (16, RANK)
    assert state[0].projector.layers[0].bias == optax.MaskedNode()


def test_equinox_stacked_norms_are_not_projected():
    """A vmapped stack of Equinox blocks: LayerNorm's stacked `weight` stays unprojected."""

    class Block(eqx.Module):
        norm: eqx.nn.LayerNorm
        mlp: eqx.nn.Linear

        def __init__(self, key):
            self.norm = eqx.nn.LayerNorm(WIDTH)
            self.mlp = eqx.nn.Linear(WIDTH, WIDTH, key=key)

    blocks = eqx.filter_vmap(Block)(jax.random.split(jax.random.key(0), LAYERS))
    dims = dimension_numbers_from_rules(eqx.filter(blocks, eqx.is_array))
    assert dims.norm.weight is None and dims.norm.bias is None
    assert dims.mlp.weight == Dims(-2, -1) and dims.mlp.bias is None


def test_optax_partition_with_rules_as_the_callable():
    """optax.partition hands each inner transform MaskedNode leaves for the others."""
    params = {
        "embed": jnp.ones((10, WIDTH)) * 0.1,
        "layers": {"kernel": jnp.ones((LAYERS, WIDTH, WIDTH)) * 0.1, "bias": jnp.zeros((3, 8))},
    }
    labels = {"embed": "adam", "layers": {"kernel": "galore", "bias": "galore"}}
    galore = galorax.galore(
        1e-2, rank=RANK, update_proj_gap=2, weight_dimension_numbers=dimension_numbers_from_rules
    )
    tx = optax.partition({"galore": galore, "adam": optax.adam(1e-2)}, labels)
    target = jax.random.normal(jax.random.key(0), (LAYERS, WIDTH, WIDTH))

    def loss(p):
        return jnp.sum((p["layers"]["kernel"] - target) ** 2) + jnp.sum(p["embed"] ** 2)

    state = tx.init(params)
    inner = state.inner_states["galore"].inner_state[0]
    assert inner.projector["layers"]["kernel"].shape == (LAYERS, WIDTH, RANK)
    assert inner.projector["layers"]["bias"] == optax.MaskedNode()
    losses = []
    for _ in range(5):
        losses.append(float(loss(params)))
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    assert losses[-1] < losses[0]


def test_inject_hyperparams_callable_dimension_numbers():
    """A callable is a schedule to inject_hyperparams unless named in static_args."""
    params = {"layers": {"kernel": jnp.ones((LAYERS, WIDTH, WIDTH)), "bias": jnp.ones((3, 8))}}
    kwargs = {"learning_rate": 1e-2, "rank": RANK, "update_proj_gap": 2}
    rules = dimension_numbers_from_rules
    with pytest.raises(TypeError, match="static_args"):
        optax.inject_hyperparams(galorax.galore)(weight_dimension_numbers=rules, **kwargs).init(
            params
        )
    static = ("weight_dimension_numbers", "rank", "update_proj_gap")
    tx = optax.inject_hyperparams(galorax.galore, static_args=static)(
        weight_dimension_numbers=rules, **kwargs
    )
    state = tx.init(params)
    assert state.inner_state[0].projector["layers"]["kernel"].shape == (LAYERS, WIDTH, RANK)
    plain = galorax.galore(weight_dimension_numbers=rules, **kwargs)
    ref = plain.init(params)
    for _ in range(3):
        got, state = tx.update(params, state, params)
        want, ref = plain.update(params, ref, params)
        jax.tree.map(np.testing.assert_array_equal, got, want)


def test_boxed_params_in_a_functional_loop():
    """Variable trees at init *and* update (no nnx.Optimizer): the updates keep their
    boxes, the state has none, and it equals the state of the plain arrays."""
    model = Mlp(nnx.Rngs(0))
    boxed = nnx.state(model, nnx.Param)
    plain = nnx.as_pure(boxed)
    tx = galorax.galore(1e-2, rank=RANK, weight_dimension_numbers=dimension_numbers_from_rules)
    state, ref = tx.init(boxed), tx.init(plain)
    assert jax.tree.structure(state) == jax.tree.structure(ref)
    updates, state = tx.update(boxed, state, boxed)
    want, ref = tx.update(plain, ref, plain)
    assert jax.tree.structure(updates) == jax.tree.structure(boxed)
    jax.tree.map(np.testing.assert_array_equal, nnx.as_pure(updates), want)


def test_docs_frameworks_recipes_run():
    """Every recipe in docs/frameworks.md runs and prints what it says."""
    path = pathlib.Path(__file__).resolve().parent.parent / "docs" / "frameworks.md"
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testfile(str(path), module_relative=False, optionflags=flags)
    assert result.attempted > 0 and result.failed == 0


def test_linen_train_state_with_partitioned_params():
    """Linen TrainState over boxed (nn.Partitioned) params: grads come boxed too; the
    updates keep the boxes and the stacked kernel gets one projector per layer."""
    nn = pytest.importorskip("flax.linen")
    train_state = pytest.importorskip("flax.training.train_state")

    class Scanned(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "embed", "mlp"))
            kernel = self.param("kernel", init, (LAYERS, WIDTH, WIDTH))
            for i in range(LAYERS):
                x = jnp.tanh(x @ kernel[i])
            return x

    x, y = _batch(WIDTH, WIDTH)
    model = Scanned()
    params = model.init(jax.random.key(0), x)["params"]
    assert isinstance(params["kernel"], nn.Partitioned)
    tx = galorax.galore(
        3e-2, rank=RANK, update_proj_gap=3, weight_dimension_numbers=dimension_numbers_from_rules
    )
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    assert state.opt_state[0].projector["kernel"].shape == (LAYERS, WIDTH, RANK)

    @jax.jit
    def step(state):
        def loss_fn(p):
            return jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    losses = []
    for _ in range(6):
        state, loss = step(state)
        losses.append(float(loss))
    assert isinstance(state.params["kernel"], nn.Partitioned)
    assert losses[-1] < losses[0]
