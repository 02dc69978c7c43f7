"""The one train step: :func:`make_train_step` (what ``galorax train`` runs and
``galorax memory --xla`` compiles) and :func:`compile_step`; its memory record is the
library's :class:`galorax.StepMemory`.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from galorax.app import model
    >>> from galorax.app.optimizers import make_optimizer
    >>> mcfg = model.ModelConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=2, d_ff=64)
    >>> params = model.abstract_params(mcfg)
    >>> opt = make_optimizer("adamw", params)
    >>> state = jax.eval_shape(opt.init, params)
    >>> batch = jax.ShapeDtypeStruct((2, 17), jnp.int32)
    >>> mem = galorax.step_memory(compile_step(mcfg, opt, params, state, batch))
    >>> mem is None or mem.peak == mem.argument + mem.output - mem.alias + mem.temp
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

import galorax
from galorax import StepMemory, reductions, step_memory, tree_bytes
from galorax.app import model as model_lib
from galorax.app.checkpoint import with_shardings
from galorax.app.config import DTYPES, RunConfig
from galorax.app.distributed import TrainPlacement
from galorax.app.optimizers import run_optimizer


def make_train_step(
    mcfg: model_lib.ModelConfig,
    opt: optax.GradientTransformation,
    remat: bool = False,
    out_shardings: Any = None,
) -> Any:
    """A jitted ``(params, opt_state, batch) -> (params, opt_state, loss)``; donates the state.

    A step whose loss or gradients are not all finite is skipped: params and optimizer
    state come back unchanged (its count included) and the loss returned is not finite
    (NaN if only the gradients were). The caller tells a skipped step by its loss.

    With a :class:`galorax.PerLayerTransformation` (``--per-layer-updates``) it is
    :func:`per_layer_train_step`. On a mesh, ``out_shardings`` (params', state's, loss's)
    pins the outputs to the inputs' shardings, so every step runs the same compiled program.
    """

    if isinstance(opt, galorax.PerLayerTransformation):
        step = per_layer_train_step(mcfg, opt)
    else:
        step = plain_train_step(mcfg, opt, remat)
    if out_shardings is not None:
        return jax.jit(step, donate_argnums=(0, 1), out_shardings=out_shardings)
    return jax.jit(step, donate_argnums=(0, 1))


def per_layer_train_step(mcfg: model_lib.ModelConfig, opt: Any) -> Any:
    """The model's step under :func:`galorax.per_layer_step` (its layers rematerialized):
    one layer's gradient alive at a time; a non-finite loss changes nothing and a
    non-finite gradient leaves the layers it reaches as they were."""
    step = galorax.per_layer_step(
        opt,
        lambda outer, batch: model_lib.embed_tokens(outer, batch[:, :-1]),
        lambda lp, x: model_lib.block(mcfg, lp, x),
        lambda outer, x, batch: model_lib.head_loss(outer, x, batch, mcfg),
    )

    def train_step(params: Any, opt_state: Any, batch: jax.Array) -> tuple[Any, Any, jax.Array]:
        loss, params, opt_state = step(params, opt_state, batch)
        finite = jnp.isfinite(loss) & jnp.isfinite(opt_state.grad_norm)
        return params, opt_state, jnp.where(finite | ~jnp.isfinite(loss), loss, jnp.nan)

    return train_step


def plain_train_step(mcfg: model_lib.ModelConfig, opt: Any, remat: bool) -> Any:
    """The whole-gradient step (unjitted) of :func:`make_train_step`."""

    def step(params: Any, opt_state: Any, batch: jax.Array) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(model_lib.loss_fn)(params, batch, mcfg, remat)
        # Per leaf, not the global norm: finite gradients whose squares overflow are kept.
        finite = jnp.isfinite(loss) & reductions.tree_all_finite(grads)
        # A select, not a cond: the finite path computes what it did unguarded (to the
        # last bit where XLA fuses the gated program alike).
        # galorax's transforms skip in place given the gate (no copy of their state).
        gate = galorax.StepGate(finite)
        update = optax.with_extra_args_support(opt).update
        updates, new_state = update(grads, opt_state, params, gate=gate)
        new_params = optax.apply_updates(params, updates)
        loss = jnp.where(finite | ~jnp.isfinite(loss), loss, jnp.nan)
        return gate.keep(new_params, params), gate.keep(new_state, opt_state), loss

    return step


def compile_step(
    mcfg: model_lib.ModelConfig,
    opt: optax.GradientTransformation,
    params: Any,
    opt_state: Any,
    batch: Any,
    remat: bool = False,
    out_shardings: Any = None,
) -> Any:
    """:func:`make_train_step` lowered on (real or abstract) inputs and compiled."""
    step = make_train_step(mcfg, opt, remat, out_shardings)
    return step.lower(params, opt_state, batch).compile()


def run_step_memory(
    run: RunConfig,
    mcfg: model_lib.ModelConfig,
    device: jax.Device | None = None,
    placement: TrainPlacement | None = None,
) -> StepMemory | None:
    """XLA's memory record of the step ``galorax train`` compiles for ``run`` (the same
    optimizer factory and step builder), compiled on abstract inputs: nothing is
    allocated, so any size compiles on CPU.

    Args:
        run: The run's settings.
        mcfg: The model.
        device: Compile for this one device (default: JAX's default device), e.g. a
            compile-only GPU from :func:`galorax.app.targets.target_device`.
        placement: Compile sharded on this mesh instead (the memory is then per device).
    """
    abstract = model_lib.abstract_params(mcfg, DTYPES[run.dtype])
    opt = run_optimizer(run, abstract)
    return _step_memory(run, mcfg, opt, abstract, device, placement)[1]


def _step_memory(
    run: RunConfig,
    mcfg: model_lib.ModelConfig,
    opt: optax.GradientTransformation,
    abstract: Any,
    device: jax.Device | None,
    placement: TrainPlacement | None,
) -> tuple[Any, StepMemory | None]:
    """``(abstract state, memory)`` of ``opt``'s step compiled on one device or sharded."""
    state = jax.eval_shape(opt.init, abstract)
    shape = (run.batch_size, run.seq_len + 1)
    batch: Any = jax.ShapeDtypeStruct(shape, jnp.int32)
    shardings = None
    if placement is not None:
        shardings = (placement.params, placement.state(opt, abstract), placement.replicated)
        abstract, state = with_shardings((abstract, state), shardings[:2])
        batch = placement.abstract_batch(shape, jnp.int32)
    elif device is not None:
        one = jax.sharding.SingleDeviceSharding(device)
        abstract, state, batch = with_shardings((abstract, state, batch), one)
    compiled = compile_step(mcfg, opt, abstract, state, batch, run.remat, shardings)
    return state, step_memory(compiled)


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """Phase 4's result: the compiled step, its compile time and XLA's memory record."""

    fn: Any
    seconds: float
    memory: StepMemory | None


def adamw_reference(
    run: RunConfig,
    mcfg: model_lib.ModelConfig,
    abstract: Any,
    placement: TrainPlacement | None = None,
) -> dict[str, Any]:
    """AdamW's optimizer-state bytes and compiled step memory, computed without running it.

    AdamW with ``run``'s learning rate, clipping and weight decay, 32-bit state. With a
    ``placement``, AdamW's step is compiled sharded the same way (its memory is then per
    device).
    """
    opt = run_optimizer(
        dataclasses.replace(run, optimizer="adamw", state_bits=32, per_layer_updates=False),
        abstract,
    )
    state, memory = _step_memory(run, mcfg, opt, abstract, None, placement)
    return {
        "opt_state_bytes": tree_bytes(state),
        "step_memory": None if memory is None else memory.as_dict(),
    }
