"""galorax.app.step: the per-layer train step equals the plain one; one memory record."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import galorax
from galorax.app import model as M
from galorax.app.config import TrainConfig, resolve_config
from galorax.app.optimizers import run_optimizer
from galorax.app.step import make_train_step, run_step_memory


def _run(optimizer: str, per_layer: bool, steps: int = 4) -> tuple:
    run = resolve_config(
        TrainConfig(
            preset="micro",
            optimizer=optimizer,
            steps=steps,
            grad_clip=0.0,
            remat=True,
            update_proj_gap=2,
            per_layer_updates=per_layer,
        )
    )
    mcfg = M.get_preset("micro")
    params = M.init_params(mcfg, jax.random.key(0))
    opt = run_optimizer(run, params)
    assert isinstance(opt, galorax.PerLayerTransformation) == per_layer
    state, step = opt.init(params), make_train_step(mcfg, opt, remat=True)
    losses = []
    for t in range(steps):
        batch = jax.random.randint(jax.random.key(t), (4, 33), 0, 256)
        params, state, loss = step(params, state, batch)
        losses.append(float(loss))
    return params, losses


@pytest.mark.parametrize("optimizer", ["galore", "galore8bit", "adamw"])
def test_per_layer_step_equals_the_plain_step(optimizer):
    """Default GaLore (randomized refresh, staggered, rotated moments): 4 steps alike."""
    plain, plain_losses = _run(optimizer, per_layer=False)
    layered, layered_losses = _run(optimizer, per_layer=True)
    np.testing.assert_allclose(layered_losses, plain_losses, rtol=1e-6)
    # An 8-bit code may round the other way when its f32 input differs by rounding (the
    # plain step runs GaLore a leaf at a time): one parameter of 8192 by 6e-5 here.
    atol = 1e-4 if optimizer == "galore8bit" else 1e-6
    for a, b in zip(jax.tree.leaves(layered), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, atol=atol)


def test_per_layer_step_needs_less_memory():
    """XLA's record of the step ``train`` compiles: the per-layer step's peak is lower."""
    kw = dict(preset="tiny", optimizer="galore", batch_size=2, seq_len=64, dtype="bfloat16")
    plain = run_step_memory(resolve_config(TrainConfig(**kw)), M.get_preset("tiny"))
    layered = run_step_memory(
        resolve_config(TrainConfig(per_layer_updates=True, **kw)), M.get_preset("tiny")
    )
    if plain is None or layered is None:
        pytest.skip("this backend reports no memory analysis")
    assert layered.peak < plain.peak


def test_adamw_reference_is_plain_adamw_in_per_layer_mode():
    """The summary's AdamW column is plain AdamW's step, whatever this run's mode."""
    from galorax.app.step import adamw_reference

    kw = dict(preset="micro", optimizer="galore8bit", batch_size=2, seq_len=16)
    abstract = M.abstract_params(M.get_preset("micro"))
    plain = adamw_reference(resolve_config(TrainConfig(**kw)), M.get_preset("micro"), abstract)
    layered = adamw_reference(
        resolve_config(TrainConfig(per_layer_updates=True, **kw)), M.get_preset("micro"), abstract
    )
    assert layered == plain
