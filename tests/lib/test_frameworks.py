"""GaLore where JAX users train: Flax NNX's nnx.Optimizer, Equinox, optax's wrappers."""

from __future__ import annotations

import dataclasses
import doctest
import functools
import pathlib
import re
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galorax
from galorax import GaLoreDimensionNumbers as Dims
from galorax import MatrixView, dimension_numbers_from_rules
from galorax.compat import unbox

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
    opt, losses = _nnx_train(model, tx, x, y, steps=5, jit=jit)
    assert losses[-1] < losses[0]
    schedule = nnx.as_pure(opt.opt_state)[0].schedule
    assert isinstance(schedule["l1"]["kernel"], galorax.RefreshSchedule)

    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    want = _functional_loop(5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)


@functools.cache  # the same reference for both cases
def _functional_loop(steps):
    """optax's own loop (jitted: one compile, not op by op) from the same init and batch."""
    x, y = _batch(8, 4)
    tx = galorax.galore(1e-2, rank=RANK, update_proj_gap=2)
    model = Mlp(nnx.Rngs(0))
    graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))
    loss_of = lambda p: _mse(nnx.merge(graphdef, p), x, y)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss_of)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params


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
    update, plain_update = jax.jit(tx.update), jax.jit(plain.update)  # not op by op
    for _ in range(3):
        got, state = update(params, state, params)
        want, ref = plain_update(params, ref, params)
        jax.tree.map(np.testing.assert_array_equal, got, want)


def test_boxed_params_in_a_functional_loop():
    """Variable trees at init *and* update (no nnx.Optimizer): the updates keep their
    boxes, the state keeps its structure (unprojected moments boxed, as optax.adam's), and
    unboxed it equals the state of the plain arrays."""
    model = Mlp(nnx.Rngs(0))
    boxed = nnx.state(model, nnx.Param)
    plain = nnx.as_pure(boxed)
    tx = galorax.galore(1e-2, rank=RANK, weight_dimension_numbers=dimension_numbers_from_rules)
    state, ref = tx.init(boxed), tx.init(plain)
    assert isinstance(state[0].base_optimizer_state.mu["l1"]["bias"], nnx.Param)
    assert jax.tree.structure(unbox(state)) == jax.tree.structure(ref)
    structure = jax.tree.structure(state)
    for _ in range(2):
        updates, state = tx.update(boxed, state, boxed)
        want, ref = tx.update(plain, ref, plain)
        assert jax.tree.structure(updates) == jax.tree.structure(boxed)
        assert jax.tree.structure(state) == structure
        jax.tree.map(np.testing.assert_array_equal, nnx.as_pure(updates), want)
        jax.tree.map(np.testing.assert_array_equal, unbox(state), ref)


def test_inject_hyperparams_user_callable():
    """Issue 15, point 6: inject_hyperparams calls a user's callable with the step count.
    One returning an array or a number fails naming static_args; one returning None (the
    drop-in default) warns naming it on a stacked tree; with static_args it works."""
    params = {"layers": {"kernel": jnp.ones((LAYERS, WIDTH, WIDTH)), "bias": jnp.ones((3, 8))}}
    kwargs = {"learning_rate": 1e-2, "rank": RANK, "update_proj_gap": 2}
    static = ("rank", "update_proj_gap")

    def by_ndim(p):
        return jax.tree.map(lambda x: Dims(-2, -1) if x.ndim == 3 else None, p)

    shift = lambda p: jax.tree.map(lambda x: x.ndim - 2, p)  # a number for the count
    for fn in (shift, lambda p: p * 0, lambda p: Dims(p * 0, -1)):  # arrays for it
        tx = optax.inject_hyperparams(galorax.galore, static_args=static)(
            weight_dimension_numbers=fn, **kwargs
        )
        with pytest.raises(TypeError, match=r"static_args=\('weight_dimension_numbers',\)") as err:
            tx.init(params)
        assert "\n" not in str(err.value)
    tx = optax.inject_hyperparams(galorax.galore, static_args=static)(
        weight_dimension_numbers=by_ndim, **kwargs
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tx.init(params)
    assert any("static_args=('weight_dimension_numbers',)" in str(w.message) for w in caught)
    tx = optax.inject_hyperparams(
        galorax.galore, static_args=("weight_dimension_numbers", *static)
    )(weight_dimension_numbers=by_ndim, **kwargs)
    state = tx.init(params)
    assert state.inner_state[0].projector["layers"]["kernel"].shape == (LAYERS, WIDTH, RANK)
    assert state.inner_state[0].projector["layers"]["bias"] == optax.MaskedNode()


def test_nnx_unprojected_moments_keep_the_param_sharding():
    """Issue 15, nnx note: under nnx.Optimizer the moments of unprojected leaves carry the
    nnx.Param's sharding metadata, as optax.adam's do, and a sharded jit step runs."""
    mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Explicit,))
    part = nnx.with_partitioning
    with jax.set_mesh(mesh):
        model = nnx.Linear(
            8,
            4,
            kernel_init=part(nnx.initializers.lecun_normal(), (None, "model")),
            bias_init=part(nnx.initializers.zeros, ("model",)),
            rngs=nnx.Rngs(0),
        )
        tx = galorax.galore(1e-2, rank=RANK, weight_dimension_numbers=dimension_numbers_from_rules)
        opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
        ref = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
        ours = opt.opt_state[0].base_optimizer_state
        for field in ("mu", "nu"):
            got, want = getattr(ours, field)["bias"], getattr(ref.opt_state[0], field)["bias"]
            assert got.get_metadata() == want.get_metadata()
        specs = nnx.get_partition_spec(nnx.state(opt))
        assert specs["opt_state"][0]["base_optimizer_state"]["mu"]["bias"].get_value() == jax.P(
            "model"
        )
        x, y = _batch(8, 4)

        @nnx.jit
        def step(model, opt):
            loss, grads = nnx.value_and_grad(_mse)(model, x, y)
            opt.update(model, grads)
            return loss

        losses = [float(step(model, opt)) for _ in range(4)]
        assert losses[-1] < losses[0]
        assert opt.opt_state[0].base_optimizer_state.mu["bias"].get_metadata() == (
            ref.opt_state[0].mu["bias"].get_metadata()
        )


# ------------------------------------------------------- the recipes of docs/frameworks.md

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "frameworks.md"


def _tuple_step(g: dict) -> None:
    g["params"], g["state"], _ = g["step"](g["params"], g["state"])


def _linen_step(g: dict) -> None:
    g["ts"], _ = g["step"](g["ts"])


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to step a recipe's objects and read its params, gradients and GaLore state."""

    advance: Callable[[dict], None]
    params: Callable[[dict], Any]
    grads: Callable[[dict], Any]
    galore: Callable[[dict], Any]
    leaves: tuple[Callable[[Any], Any], ...]


_jit_grad = functools.cache(lambda fn: jax.jit(jax.grad(fn)))  # one compile per recipe
_kernel = lambda t: t["layers"]["kernel"]
_mt = lambda part, name: lambda t: t["decoder"]["layers"][part][name]["kernel"]
RECIPES = {
    "Flax NNX: `nnx.Optimizer`": Recipe(
        advance=lambda g: g["step"](g["model"], g["optimizer"]),
        params=lambda g: nnx.to_pure_dict(nnx.state(g["model"], nnx.Param)),
        grads=lambda g: nnx.to_pure_dict(nnx.grad(g["loss_fn"])(g["model"])),
        galore=lambda g: nnx.as_pure(g["optimizer"].opt_state)[0],
        leaves=(_kernel,),
    ),
    "Flax NNX: a functional loop": Recipe(
        advance=_tuple_step,
        params=lambda g: unbox(g["params"]),
        grads=lambda g: unbox(_jit_grad(g["loss_fn"])(g["params"])),
        galore=lambda g: g["state"][0],
        leaves=(_kernel,),
    ),
    "Flax Linen: `TrainState`": Recipe(
        advance=_linen_step,
        params=lambda g: unbox(g["ts"].params),
        grads=lambda g: unbox(_jit_grad(g["loss_fn"])(g["ts"].params)),
        galore=lambda g: g["ts"].opt_state[0],
        leaves=(lambda t: t["ScanBlock_0"]["Dense_0"]["kernel"],),
    ),
    "Equinox: `eqx.filter_jit`": Recipe(
        advance=_tuple_step,
        params=lambda g: g["params"],
        grads=lambda g: eqx.filter_grad(g["loss_fn"])(g["params"]),
        galore=lambda g: g["state"][0],
        leaves=(lambda t: t.layers.weight,),
    ),
    "MaxText-style scanned trees": Recipe(
        advance=_tuple_step,
        params=lambda g: g["params"],
        grads=lambda g: _jit_grad(g["loss_fn"])(g["params"]),
        galore=lambda g: g["state"][0],
        leaves=tuple(
            _mt(*pn)
            for pn in [("mlp", "wi_0"), ("mlp", "wo"), ("self_attention", "query")]
            + [("self_attention", "out")]
        ),
    ),
    "optax.partition": Recipe(
        advance=_tuple_step,
        params=lambda g: g["params"],
        grads=lambda g: _jit_grad(g["loss_fn"])(g["params"]),
        galore=lambda g: g["state"].inner_states["galore"].inner_state[0],
        leaves=(_kernel,),
    ),
}


def _doc_sections() -> list[tuple[str, str]]:
    parts = re.split(r"^## ", DOC.read_text(), flags=re.M)
    return [("intro", parts[0])] + [(p.split("\n", 1)[0], p) for p in parts[1:]]


def _run_section(title: str, text: str, globs: dict) -> None:
    test = doctest.DocTestParser().get_doctest(text, globs, title, str(DOC), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    runner.run(test, out=report.append, clear_globs=False)
    globs.update(test.globs)  # DocTest ran on a copy
    assert runner.failures == 0, f"docs/frameworks.md, {title!r}:\n{''.join(report)}"


def _basis_check(grad, delta, proj, rank):
    """Per layer: the update lies in the span of that layer's projector, which holds
    (at a refresh) at least 90% of what the best rank-r subspace of that layer's gradient
    holds, and differs from the other layers' projectors."""
    layers, m, n = grad.shape
    left = proj.shape[-2] == m if m != n else True
    for i in range(layers):
        q = np.asarray(proj[i], np.float64)
        g, d = np.asarray(grad[i], np.float64), np.asarray(delta[i], np.float64)
        inside = q @ (q.T @ d) if left else (d @ q) @ q.T
        np.testing.assert_allclose(inside, d, atol=1e-5 * np.abs(d).max() + 1e-9)
        held = np.linalg.norm(q.T @ g if left else g @ q) ** 2
        best = np.sum(np.linalg.svd(g, compute_uv=False)[:rank] ** 2)
        assert held >= 0.9 * best, (i, held / best)
        for j in range(layers):
            other = np.asarray(proj[j], np.float64)
            if j != i:
                assert np.linalg.norm(q.T @ other) ** 2 / q.shape[1] < 0.99, (i, j)


def _check_recipe(recipe: Recipe, g: dict) -> None:
    """One refresh step more per stacked leaf, checked layer by layer."""
    for leaf in recipe.leaves:
        for _ in range(20):  # to the leaf's next refresh
            st = recipe.galore(g)
            if np.all(np.asarray(leaf(st.schedule).next_step) <= int(st.count)):
                break
            recipe.advance(g)
        else:
            raise AssertionError("no refresh within 20 steps")
        before, grads = recipe.params(g), recipe.grads(g)
        recipe.advance(g)
        after, st = recipe.params(g), recipe.galore(g)
        view = MatrixView.of(leaf(before).shape, leaf(dimension_numbers_from_rules(before)))
        assert view.batch_shape and view.batch_shape[0] > 1  # a stack: one projector per layer
        proj = leaf(st.projector)
        assert proj.shape[: len(view.batch_shape)] == view.batch_shape
        to_matrix = lambda x, v=view: v.to_matrix(jnp.asarray(x)).reshape(-1, v.m, v.n)
        delta = to_matrix(leaf(after)) - to_matrix(leaf(before))
        _basis_check(
            to_matrix(leaf(grads)), delta, proj.reshape(-1, *proj.shape[-2:]), proj.shape[-1]
        )


def test_docs_frameworks_recipes_run_and_train_per_layer():
    """Every recipe in docs/frameworks.md runs and prints what it says (loss falls, one
    projector per layer); after each, one more refresh step is checked layer by layer."""
    globs: dict = {}
    checked = []
    for title, text in _doc_sections():
        _run_section(title, text, globs)
        recipe = next((r for name, r in RECIPES.items() if title.startswith(name)), None)
        if recipe is not None:
            _check_recipe(recipe, globs)
            checked.append(title)
    assert len(checked) == len(RECIPES), checked
    nn = pytest.importorskip("flax.linen")
    kernel = globs["ts"].params["ScanBlock_0"]["Dense_0"]["kernel"]
    assert isinstance(kernel, nn.Partitioned)  # updates kept linen's boxes


def test_tree_get_count_is_ambiguous_as_in_optax_and_the_documented_ways_work():
    """Issue 15, case 10: two counts, as optax.contrib.galore's layout has; the docs' ways."""
    import optax

    import galorax

    params = {"w": jnp.ones((8, 4))}
    ours = galorax.galore(1e-2, rank=2).init(params)
    theirs = optax.contrib.galore(1e-2, rank=2).init(params)
    for state in (ours, theirs):
        with pytest.raises(KeyError, match="multiple values for 'count'"):
            optax.tree_utils.tree_get(state, "count")
    only_galore = lambda path, _: getattr(path[-1], "tuple_name", None) == "GaLoreState"  # noqa: E731
    assert optax.tree_utils.tree_get(ours, "count", filtering=only_galore) == 0
    assert ours[0].count == 0
