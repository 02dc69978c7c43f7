"""The GaLore transform: ``scale_by_galore`` and its ``galore`` alias.

A drop-in for ``optax.contrib.galore`` (same signatures, defaults, state fields and
semantics) with keyword-only extensions that fix what the seed implementation gets
wrong: per-slice projectors for stacked weights (batch axes), a matmul-only randomized
refresh, moments carried across refreshes, staggered refreshes, a f32 projector for
low-precision weights and refreshes that survive zero or non-finite gradients.

An update, per projected leaf: (1) refresh the projector where a slice is due, (2)
project the gradient, (3) carry the base optimizer's moments into the new basis, (4) the
base optimizer's step on the low-rank gradient, (5) project back (plus the residual).
The steps over the tree: :mod:`galorax.galore_state`; each step on one leaf:
:mod:`galorax.projector`; its math on dense arrays: :mod:`galorax.galore_math`; how it runs
(chunks, in place, quantized storage): :mod:`galorax.chunking`; the options, each declared
once: :mod:`galorax.options`. Here they become the optax transformation (boxes, checks,
the step's gate, non-finite leaves, explicit meshes). The whole map:
``docs/architecture.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import optax

from galorax import adam, placement
from galorax.compat import as_plain, box_moments, rebox, restore_boxes, unbox
from galorax.dimension_numbers import GaLoreDimNumsOrFn, check_same_tree
from galorax.galore_state import GaLoreState, init_state, update_state
from galorax.leaf import make_projectors
from galorax.moments import moment_kinds
from galorax.nonfinite import keep_nonfinite_leaves
from galorax.options import (
    check_base_optimizer,
    document_options,
    galore_options,
    given_options,
    with_keywords_of,
)
from galorax.residual import Residual
from galorax.schedule import AdaptiveRefresh
from galorax.step_gate import gate_of

if TYPE_CHECKING:
    from galorax.chunking import Chunking
    from galorax.options import MomentKind, Moments, Side, Subspace

__all__ = ["GaLoreState", "galore", "scale_by_galore"]


def scale_by_galore(
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    base_optimizer: optax.GradientTransformation | None = None,
    weight_dimension_numbers: GaLoreDimNumsOrFn | None = None,
    *,
    subspace: Subspace = "randomized",
    moments: Moments = "rotate",
    stagger: bool = True,
    side: Side = "auto",
    projector_dtype: Any = "float32",
    precision: jax.lax.Precision | str | None = jax.lax.Precision.HIGHEST,
    residual: Residual | bool | None = None,
    adaptive: AdaptiveRefresh | bool | None = None,
    projector_bits: int | None = None,
    refresh_axes: str | Sequence[str] | None = None,
    skip_nonfinite: bool = False,
    moment_fields: Mapping[str, MomentKind] | None = None,
    leafwise_base: bool | None = None,
    chunking: Chunking | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Scale updates using GaLore (Gradient Low-Rank Projection).

    Same signature, defaults and state fields as ``optax.contrib.scale_by_galore``; the
    keyword-only arguments extend it. With ``subspace="svd", moments="keep",
    stagger=False`` the updates equal optax's (the tests check it).

    The ``base_optimizer`` must be a gradient-only transformation (``scale_by_adam``,
    ``scale_by_lion``, ...): it runs on low-rank shaped tensors with ``params=None``. For
    weight decay use :func:`galore`'s ``weight_decay``.

    Args:
        rank: Target rank of the projection (clipped to ``min(m, n)`` per matrix).
        update_proj_gap: Steps between projector refreshes.
        scale: Factor applied to the projected updates (not to unprojected leaves).
        base_optimizer: Optimizer run in the low-rank space; ``scale_by_adam()`` if None.
        weight_dimension_numbers: How weights become matrices: None projects 2-D leaves
            only; one ``GaLoreDimensionNumbers`` applies to every leaf with 2+ axes; a tree
            like the params (None = skip) or a callable returning one. Axes in neither
            ``reduction_axis`` nor ``output_axis`` are batch axes: one projector and one set
            of moments per slice.
        subspace: ``"svd"``: exact thin SVD (the seed). ``"randomized"`` (=
            ``Randomized()``) or a :class:`galorax.Randomized` with its settings: a
            randomized range finder made of matmuls, an order of magnitude faster for
            the same captured energy (``BENCHMARKS.md``).
        moments: What happens to the base optimizer's moments when a projector changes.
            ``"keep"``: nothing (the seed). ``"align"``: flip the signs of the new
            projector's columns to match the old ones (an SVD picks signs at random,
            which scrambles the moments). ``"rotate"``: align, then carry the moments
            into the new basis: first moments ``m`` become ``C m`` with ``C = P_new^T
            P_old``, second moments ``v`` become ``(C * C) v`` (:mod:`galorax.moments`).
        stagger: Spread the leaves' refreshes evenly over the gap, so no single step
            pays them all; every leaf still gets its projector at the first step.
        side: ``"auto"``: least state, the seed's (projector ``(m, r)`` when ``m >= n``,
            else ``(n, r)``). ``"std"``, ``"reverse_std"``, ``"left"``, ``"right"``:
            galore-torch's ``proj_type`` conventions.
        projector_dtype: Storage dtype of the projectors (f32 whatever the params' dtype:
            projections and low-rank moments are computed in f32).
        precision: Matmul precision of the projections and the refresh.
        residual: Add back the gradient outside the subspace, scaled and limited as in
            Fira (:class:`galorax.Residual`; ``True`` for the defaults). Costs one more
            projection per step and one scalar of state per matrix.
        adaptive: Lengthen each slice's refresh gap while its subspace is stable
            (:class:`galorax.AdaptiveRefresh`; ``True`` for the defaults). Refreshes are
            counted in ``state.schedule``.
        projector_bits: ``None`` (float projectors in ``projector_dtype``), ``8`` or ``4``:
            store each projector quantized (:func:`galorax.quantize_projector`: symmetric
            linear code, one ``float32`` scale per group of 256 values, never across two
            slices of a stacked leaf), a :class:`galorax.QuantizedArray` in
            ``state.projector``; every use dequantizes it to the compute dtype first.
            3.9x / 7.8x fewer projector bytes; what it costs: :mod:`galorax.projector_storage`.
        refresh_axes: Mesh axes (a name or a tuple) over which the weights are
            replicated, typically the data-parallel ones, e.g. ``"data"``. A refresh of
            a stacked weight then splits its slices (layers) over these axes: each device
            factorizes its share and the new projectors are gathered, instead of every
            device factorizing every slice (``BENCHMARKS.md``, "Spread refreshes").
            Leaves without batch axes, and batch sizes no sub-product of the axes
            divides, are refreshed whole on each device; without a mesh it does nothing.
            Naming an axis the gradients are sharded over moves them (an error when the
            mesh has no such axis).
        moment_fields: With ``moments="rotate"``, how the base optimizer's state fields
            that ``galorax.moments.DEFAULT_MOMENT_FIELDS`` does not know move at a
            refresh: ``{name: "first" | "second" | "none"}`` (``"none"``: left as they
            are), e.g. ``{"ema": "first"}``. Without it, ``init`` raises on a per-parameter
            field it does not know, naming it (rather than leave moments in a stale basis).
        skip_nonfinite: Per leaf, a gradient that is not all finite leaves that leaf's
            state as it was (its base-optimizer moments, projector, schedule, residual
            norm) and gives it a zero update; the other leaves and ``count`` step as
            usual (so its next bias correction uses the later count). Base-state fields
            are found by their tree structure: a subtree shaped like the low-rank
            gradients (``mu``, ``nu``, ...); fields of another structure step anyway.
        leafwise_base: Run project, base optimizer and back-projection one leaf at a
            time, each leaf after the last, so only one leaf's low-rank temporaries are
            alive at once (1b: 0.5 GB less peak, ``BENCHMARKS.md``). The same updates for
            a base optimizer that treats each leaf on its own and keeps one state entry
            per leaf in fields laid out like the gradients (Adam, 8-bit Adam, Lion, SGD
            momentum, AMSGrad): not one that mixes leaves (a global norm, shared noise)
            or nests its own partition (``optax.masked``, ``multi_transform``, SM3's
            lists). None: on for the default base optimizer, off for any other.
        chunking: How large leaves are updated in bounded chunks
            (:class:`galorax.chunking.Chunking`: the largest temporary a chunk may need,
            whether GaLore's update of a stacked low-precision leaf is chunked); None: its
            defaults.

    Returns:
        A ``GradientTransformationExtraArgs``; extra arguments reach the base optimizer.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> tx = scale_by_galore(rank=2, update_proj_gap=10)
        >>> state = tx.init({'w': jnp.zeros((8, 4)), 'b': jnp.zeros(4)})
        >>> state.projector['w'].shape, state.base_optimizer_state.mu['w'].shape
        ((8, 2), (2, 4))
        >>> state.projector['b']
        MaskedNode()
    """
    options = given_options(locals())  # every option as given (galorax.options.OPTIONS)
    if leafwise_base is None:  # on for the default base optimizer (one entry per leaf)
        options["leafwise_base"] = base_optimizer is None
    opts = galore_options(**options)
    if check_base_optimizer(base_optimizer) is None:  # optax's, skipping in place
        base_optimizer = adam.scale_by_adam()
    base_tx = optax.with_extra_args_support(base_optimizer)
    kinds = moment_kinds(opts.moment_fields)

    def init_fn(params: optax.Params) -> GaLoreState:
        plain = as_plain(params)  # no nnx.Param, no None: a state nnx round-trips
        projectors = make_projectors(plain, weight_dimension_numbers, opts)
        state = init_state(plain, projectors, opts, base_tx, kinds)
        # Unprojected moments boxed like their params (an nnx.Param's sharding), as optax's.
        base = box_moments(params, state.base_optimizer_state, state.projector)
        return state._replace(base_optimizer_state=base)

    def update_fn(
        updates: optax.Updates,
        state: GaLoreState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, GaLoreState]:
        del params
        plain, boxed, state = as_plain(updates), state, unbox(state)
        check_same_tree(plain, state.projector)
        projectors = make_projectors(plain, weight_dimension_numbers, opts)
        gate = gate_of(extra_args)  # a step that may be skipped: skip in place
        new = update_state(plain, state, projectors, opts, base_tx, kinds, extra_args, gate)
        out, state = keep_nonfinite_leaves(plain, state, new) if opts.skip_nonfinite else new
        state = restore_boxes(boxed, state)
        return rebox(updates, out), state if gate is None else gate.cover(state)

    # Explicit-axes meshes: the update body runs with automatic axes (see placement.py).
    return optax.GradientTransformationExtraArgs(init_fn, placement.auto_axes_update(update_fn))


@with_keywords_of(scale_by_galore)
@document_options
def galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    base_optimizer: optax.GradientTransformation | None = None,
    weight_decay: jax.typing.ArrayLike = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    weight_dimension_numbers: GaLoreDimNumsOrFn | None = None,
    **options: Any,
) -> optax.GradientTransformationExtraArgs:
    """GaLore: Memory-efficient training via gradient low-rank projection.

    ``chain(scale_by_galore, add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate))``, as ``optax.contrib.galore``. Keyword-only
    extensions (``subspace``, ``moments``, ``stagger``, ``side``, ``projector_dtype``,
    ``precision``, ...) are passed to :func:`scale_by_galore`.

    Examples:
        >>> import optax
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import galorax
        >>> def f(x): return jnp.sum(jnp.square(x['w']))
        >>> solver = galorax.galore(learning_rate=0.01, rank=16)
        >>> params = {'w': jnp.ones((100, 100)), 'b': jnp.ones((100,))}
        >>> print('Objective function: ', f(params))
        Objective function:  10000.0
        >>> opt_state = solver.init(params)
        >>> for _ in range(5):
        ...  grad = jax.grad(f)(params)
        ...  updates, opt_state = solver.update(grad, opt_state, params)
        ...  params = optax.apply_updates(params, updates)
        ...  print('Objective function: {:.2E}'.format(f(params)))
        Objective function: 9.98E+03
        Objective function: 9.96E+03
        Objective function: 9.94E+03
        Objective function: 9.92E+03
        Objective function: 9.90E+03

        Using weight decay (equivalent to AdamW behavior):

        >>> solver = galorax.galore(
        ...     learning_rate=0.01,
        ...     rank=16,
        ...     weight_decay=0.01,  # Use this, NOT adamw as base_optimizer
        ... )

        Using a custom base optimizer:

        >>> solver = galorax.galore(
        ...     learning_rate=0.01,
        ...     rank=16,
        ...     base_optimizer=optax.scale_by_adam(b1=0.9, b2=0.99),
        ... )

        Projecting 3D attention weights as 2D matrices:

        >>> from galorax import GaLoreDimensionNumbers
        >>> # For attention weights shaped (embed_dim, num_heads, head_dim)
        >>> dim_nums = {'attn': GaLoreDimensionNumbers(
        ...     reduction_axis=0,      # embed_dim
        ...     output_axis=(1, 2),    # heads*head_dim
        ... )}
        >>> solver = galorax.galore(
        ...     learning_rate=0.01, rank=16, weight_dimension_numbers=dim_nums
        ... )

    Args:
        learning_rate: A global scaling factor, fixed or a schedule.
        rank: Target rank of the low-rank projection.
        update_proj_gap: Steps between projector refreshes.
        scale: Additional scaling factor for the projected updates.
        base_optimizer: Gradient-only transform run in the low-rank space (default
            ``optax.scale_by_adam()``); not ``adamw``/``lamb``/``lars``.
        weight_decay: Decoupled weight decay, applied in full parameter space.
        mask: Tree of booleans (or a callable returning one) selecting the leaves that
            get weight decay.
        weight_dimension_numbers: See :func:`scale_by_galore`.

    The keyword-only arguments are :func:`scale_by_galore`'s, passed to it unchanged (see
    there); each in one line under Keyword Args, from its declaration
    (:data:`galorax.options.OPTIONS`).

    Returns:
        A ``GradientTransformationExtraArgs`` implementing GaLore.
    """
    return optax.chain(
        scale_by_galore(
            rank, update_proj_gap, scale, base_optimizer, weight_dimension_numbers, **options
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
