"""The GaLore transform: ``scale_by_galore`` and its ``galore`` alias.

A drop-in for ``optax.contrib.galore`` (same signatures, defaults, state fields and
semantics) with keyword-only extensions that fix what the seed implementation gets
wrong: per-slice projectors for stacked weights (batch axes), a matmul-only randomized
refresh, moments carried across refreshes, staggered refreshes, a f32 projector for
low-precision weights and refreshes that survive zero or non-finite gradients.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec
from optax._src import base, numerics

from galorax import placement as _sharding
from galorax import subspace as _subspace
from galorax.dimension_numbers import (
    GaLoreDimNumsOrFn,
    MatrixView,
    _is_masked,
    resolve_dimension_numbers,
)
from galorax.projector import quantize_projector
from galorax.quantization.blockwise import (
    QuantizedArray,
    dequantize_blockwise,
    is_quantized,
    quantize_like,
)
from galorax.residual import Residual, compensation
from galorax.schedule import AdaptiveRefresh, RefreshSchedule, advance, subspace_overlap

Subspace = Literal["svd", "randomized"] | _subspace.Randomized
Moments = Literal["keep", "align", "rotate"]
Side = Literal["auto", "std", "reverse_std", "left", "right"]

_SUBSPACES = ("svd", "randomized")
_MOMENTS = ("keep", "align", "rotate")
_SIDES = ("auto", "std", "reverse_std", "left", "right")
_PROJECTOR_BITS = (8, 4)
# Values per float32 scale of a quantized projector (``projector_bits``).
_PROJECTOR_GROUP = 256
# Base-optimizer state fields that hold moments of the (projected) gradient: first
# moments rotate with C = P_new^T P_old, second moments with C * C (see `moments`).
_FIRST_MOMENTS = ("mu", "trace", "momentum")
_SECOND_MOMENTS = ("nu",)


class GaLoreState(NamedTuple):
    """State for the GaLore optimizer.

    The first three fields are ``optax.contrib.GaLoreState``'s. Leaves that are not
    projected hold ``optax.MaskedNode()`` in ``projector`` and ``schedule`` (a leafless
    placeholder, so orbax saves the state as it is).

    Attributes:
        count: Number of update steps taken.
        base_optimizer_state: State for the base optimizer, operating on low-rank
            gradients for projected params and full gradients for the others.
        projector: Projection matrices, ``(*batch, m, r)`` for left and ``(*batch, n, r)``
            for right projection, where ``(m, n)`` is the leaf's matrix view; with
            ``projector_bits``, a :class:`galorax.QuantizedArray` of that shape.
        schedule: A :class:`RefreshSchedule` per projected leaf.
        residual_norm: With residual compensation, last step's compensation norm per
            matrix (batch-shaped) of each projected leaf; else None.
    """

    count: jax.typing.ArrayLike  # type: ignore[assignment]  # shape=(), dtype=jnp.int32
    base_optimizer_state: base.OptState
    projector: base.Updates
    schedule: base.Updates = None
    residual_norm: base.Updates = None


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static facts of one projected leaf."""

    view: MatrixView
    left: bool  # P spans the rows side: low-rank gradient = P^T G, shape (r, n)
    rank: int
    offset: int  # first step of its stagger slot
    index: int  # position among projected leaves (seeds its sketches)

    @property
    def proj_shape(self) -> tuple[int, ...]:
        rows = self.view.m if self.left else self.view.n
        return (*self.view.batch_shape, rows, self.rank)

    @property
    def low_shape(self) -> tuple[int, ...]:
        v = self.view
        return (*v.batch_shape, self.rank, v.n) if self.left else (*v.batch_shape, v.m, self.rank)


def _uses_left(side: str, m: int, n: int) -> bool:
    if side in ("auto", "reverse_std"):  # least state: project the long side
        return m >= n
    if side == "std":  # galore-torch's default: project the short side
        return m < n
    return side == "left"


def _check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        hint = ""
        if isinstance(value, jax.Array | float):
            hint = " Under optax.inject_hyperparams, pass static_args=('rank', 'update_proj_gap')."
        raise TypeError(f"`{name}` must be a positive int, got {value!r}.{hint}")


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


def _check_projector_bits(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        if int(value) in _PROJECTOR_BITS:
            return int(value)
    hint = ""
    if isinstance(value, jax.Array):
        hint = " Under optax.inject_hyperparams, add 'projector_bits' to static_args."
    raise ValueError(f"`projector_bits` must be None, 8 or 4, got {value!r}.{hint}")


def _check_axes(value: Any) -> tuple[str, ...]:
    """``refresh_axes`` as a tuple of mesh axis names."""
    if value is None:
        return ()
    axes = (value,) if isinstance(value, str) else value
    if (
        not isinstance(axes, tuple | list)
        or not all(isinstance(a, str) and a for a in axes)
        or len(set(axes)) != len(axes)
    ):
        raise TypeError(
            f"`refresh_axes` must be a mesh axis name or a tuple of distinct names, e.g. "
            f"'data' or ('data', 'replica'), got {value!r}."
        )
    return tuple(axes)


def _quantize_projector(p: jax.Array, bits: int) -> QuantizedArray:
    """``p`` (``(*batch, rows, r)``) in ``bits`` with one scale per group of at most
    ``_PROJECTOR_GROUP`` values; a group never spans two slices, so the slices of a
    stacked leaf can be replaced one by one (see :func:`_select_slices`)."""
    rows, r = p.shape[-2:]
    return quantize_projector(p, bits=bits, group_size=max(1, min(_PROJECTOR_GROUP, rows * r)))


def _select_slices(accept: jax.Array, new: QuantizedArray, old: QuantizedArray) -> Any:
    """``new``'s slices where ``accept`` (batch-shaped), else ``old``'s, codes and scales."""

    def pick(a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.where(accept.reshape(accept.shape + (1,) * (a.ndim - accept.ndim)), a, b)

    return jax.tree.map(pick, new, old)


def _quantized_spec(x: jax.Array, proj_spec: Any, n_batch: int, param: Any) -> Any:
    """Spec of a quantized projector's codes or scales under explicit sharding.

    Arrays shaped ``(*batch, rows, k)`` (8-bit codes) take the projector's spec; arrays
    shaped ``(*batch, k)``, whose last axis runs over ``(rows, r)`` row-major (4-bit codes,
    group scales), are split over it like the rows when it divides evenly: what sharding
    propagation gives the refresh's output, so the update's outputs match its inputs.
    """
    if proj_spec is None:
        return None
    entries = tuple(proj_spec) + (None,) * (n_batch + 2 - len(proj_spec))
    if x.ndim == n_batch + 2:
        return proj_spec
    rows = entries[n_batch]
    names = rows if isinstance(rows, tuple) else () if rows is None else (rows,)
    mesh = _sharding.explicit_mesh(param)
    if (
        mesh is None
        or x.ndim != n_batch + 1
        or x.shape[-1] % math.prod(mesh.shape[a] for a in names)
    ):
        rows = None
    return PartitionSpec(*entries[:n_batch], rows)


def _dense(p: Any, dtype: Any) -> jax.Array:
    """A stored projector as a ``dtype`` array (dequantized with ``projector_bits``)."""
    return dequantize_blockwise(p, dtype) if is_quantized(p) else p.astype(dtype)


def _is_leaf(x: Any) -> bool:
    """Masked placeholders and quantized projectors are leaves of a projector tree."""
    return _is_masked(x) or is_quantized(x)


def _apply_moment_maps(state: Any, maps: Callable[[Any, bool], Any]) -> Any:
    """Rebuilds ``state`` with ``maps(tree, second)`` applied to every moment field."""
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        fields = {}
        for name, value in zip(state._fields, state, strict=True):
            if name in _FIRST_MOMENTS or name in _SECOND_MOMENTS:
                fields[name] = maps(value, name in _SECOND_MOMENTS)
            else:
                fields[name] = _apply_moment_maps(value, maps)
        return type(state)(**fields)
    if isinstance(state, tuple | list):
        return type(state)(_apply_moment_maps(s, maps) for s in state)
    if isinstance(state, dict):
        return {k: _apply_moment_maps(v, maps) for k, v in state.items()}
    return state


def scale_by_galore(
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    base_optimizer: base.GradientTransformation | None = None,
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
) -> base.GradientTransformationExtraArgs:
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
            into the new basis with ``C = P_new^T P_old``: the first moment becomes
            ``C m`` (exact for the part of the old subspace that the new one keeps); the
            second moment, a per-coordinate variance that no rotation maps exactly,
            becomes ``(C * C) v``, the diagonal of ``C diag(v) C^T``, which keeps it
            non-negative and keeps its total where the subspaces agree.
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
            ``state.projector``. A refresh quantizes the new basis; every use (projection,
            back-projection, warm start, sign alignment, moment rotation, residual,
            subspace overlap) dequantizes it to the compute dtype first. Projector bytes:
            1.016 (8) or 0.516 (4) per value instead of 4 (3.9x / 7.8x smaller). Measured
            on the ``tiny`` model (``BENCHMARKS.md``): ``||Q - P|| / ||P||`` 0.85% (8) /
            15% (4), error of the back-projected gradient 1.0% / 18%; validation loss after
            400 steps (2 refreshes) within 0.003 of float32 (8) and 0.01 below it (4).
        refresh_axes: Mesh axes (a name or a tuple) over which the weights are
            replicated, typically the data-parallel ones, e.g. ``"data"``. A refresh of
            a stacked weight then splits its slices (layers) over these axes: each device
            factorizes its share and the new projectors are gathered, instead of every
            device factorizing every slice (``BENCHMARKS.md``, "Spread refreshes").
            Leaves without batch axes, and batch sizes no sub-product of the axes
            divides, are refreshed whole on each device; without a mesh it does nothing.
            Naming an axis the gradients are sharded over moves them (an error when the
            mesh has no such axis).

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
    _check_positive_int(rank, "rank")
    _check_positive_int(update_proj_gap, "update_proj_gap")
    if not isinstance(subspace, _subspace.Randomized):
        _check_choice(subspace, "subspace", _SUBSPACES)
    randomized = _subspace.Randomized() if subspace == "randomized" else subspace
    _check_choice(moments, "moments", _MOMENTS)
    _check_choice(side, "side", _SIDES)
    projector_bits = _check_projector_bits(projector_bits)
    refresh_axes = _check_axes(refresh_axes)
    try:
        projector_dtype = jnp.dtype(projector_dtype)
    except TypeError:
        projector_dtype = None
    if projector_dtype is None or not jnp.issubdtype(projector_dtype, jnp.floating):
        raise TypeError("`projector_dtype` must name a floating dtype such as 'float32'.")
    residual = Residual() if residual is True else (residual or None)
    adaptive = AdaptiveRefresh() if adaptive is True else (adaptive or None)
    if residual is not None and not isinstance(residual, Residual):
        raise TypeError(f"`residual` must be a galorax.Residual or a bool, got {residual!r}.")
    if adaptive is not None and not isinstance(adaptive, AdaptiveRefresh):
        raise TypeError(
            f"`adaptive` must be a galorax.AdaptiveRefresh or a bool, got {adaptive!r}."
        )
    if base_optimizer is None:
        base_optimizer = optax.scale_by_adam()
    base_tx = optax.with_extra_args_support(base_optimizer)

    def make_plans(tree: Any) -> tuple[list[Any], Any, list[_Plan | None]]:
        leaves, treedef = _flatten(tree)
        dims = resolve_dimension_numbers(tree, weight_dimension_numbers)
        paths = [
            jax.tree_util.keystr(p)
            for p, _ in jax.tree.flatten_with_path(tree, is_leaf=_is_masked)[0]
        ]
        plans: list[_Plan | None] = []
        for path, leaf, dim in zip(paths, leaves, dims, strict=True):
            if _is_masked(leaf):
                plans.append(None)
                continue
            if not jnp.issubdtype(leaf.dtype, jnp.floating):
                raise TypeError(
                    f"GaLore trains floating-point weights, but params{path} has dtype "
                    f"{leaf.dtype}; leave it out with optax.masked or optax.partition."
                )
            if dim is None:
                plans.append(None)
                continue
            try:
                view = MatrixView.of(leaf.shape, dim)
            except (TypeError, ValueError) as err:
                raise type(err)(f"weight_dimension_numbers for params{path}: {err}") from None
            plans.append(
                _Plan(view, _uses_left(side, view.m, view.n), min(rank, view.m, view.n), 0, 0)
            )
        projected = [i for i, p in enumerate(plans) if p is not None]
        for j, i in enumerate(projected):
            offset = (j * update_proj_gap) // len(projected) if stagger else 0
            plans[i] = dataclasses.replace(plans[i], offset=offset, index=j)  # type: ignore[type-var]
        return leaves, treedef, plans

    def init_fn(params: base.Params) -> GaLoreState:
        leaves, treedef, plans = make_plans(params)
        masked = optax.MaskedNode()
        projectors, proxies, schedules, norms = [], [], [], []
        for leaf, plan in zip(leaves, plans, strict=True):
            if plan is None:
                projectors.append(masked)
                schedules.append(masked)
                norms.append(masked)
                proxies.append(
                    leaf
                    if _is_masked(leaf)
                    else _sharding.like(jnp.zeros(leaf.shape, leaf.dtype), leaf)
                )
                continue
            rows, r = plan.proj_shape[-2:]
            # Under explicit sharding, state is born sharded like its param (so the
            # update's output shardings equal its input's: no recompilation).
            specs = _sharding.galore_leaf_specs(leaf, plan.view, plan.left) or {}
            put = lambda x, kind, leaf=leaf, specs=specs: _sharding.place(x, leaf, specs.get(kind))
            # An orthonormal placeholder, kept if the first gradient is unusable.
            eye = jnp.eye(rows, r, dtype=projector_dtype)
            if projector_bits is None:
                projectors.append(put(jnp.broadcast_to(eye, plan.proj_shape), "projector"))
            else:  # quantized eye: exact (levels 0 and 1), so still orthonormal
                q = _quantize_projector(jnp.broadcast_to(eye, plan.proj_shape), projector_bits)
                nb, spec = len(plan.view.batch_shape), specs.get("projector")
                place = lambda x, leaf=leaf, nb=nb, spec=spec: _sharding.place(
                    x, leaf, _quantized_spec(x, spec, nb, leaf)
                )
                projectors.append(jax.tree.map(place, q))
            proxies.append(put(jnp.zeros(plan.low_shape, _compute_dtype(leaf.dtype)), "low"))
            batch = plan.view.batch_shape
            norms.append(put(jnp.zeros(batch, jnp.float32), "batch"))
            schedules.append(
                RefreshSchedule(
                    next_step=put(jnp.zeros(batch, jnp.int32), "batch"),
                    gap=put(jnp.full(batch, update_proj_gap, jnp.int32), "batch"),
                    refreshes=put(jnp.zeros(batch, jnp.int32), "batch"),
                )
            )
        return GaLoreState(
            count=jnp.zeros([], jnp.int32),
            base_optimizer_state=base_tx.init(treedef.unflatten(proxies)),
            projector=treedef.unflatten(projectors),
            schedule=treedef.unflatten(schedules),
            residual_norm=treedef.unflatten(norms) if residual is not None else None,
        )

    def refresh(plan: _Plan, g2: jax.Array, old: Any, sched: RefreshSchedule, count: Any):
        """New projectors for the due slices of one leaf; ``g2`` is ``(*batch, m, n)``."""
        due = count >= sched.next_step
        valid = jnp.all(jnp.isfinite(g2), axis=(-2, -1)) & jnp.any(g2 != 0, axis=(-2, -1))
        # A bad slice must not poison the batched factorization of the good ones.
        g2 = jnp.where(valid[..., None, None], g2, 0)
        old_c = _dense(old, g2.dtype)
        nb = len(plan.view.batch_shape)
        factorize: Callable[..., jax.Array]
        if not isinstance(randomized, _subspace.Randomized):
            # On a mesh the SVD needs each matrix whole: gathered (with a warning).
            factorize = lambda a: _subspace.exact_basis(a, plan.rank, left=plan.left)  # noqa: E731
            inputs: tuple[Any, ...] = (_sharding.whole_for_svd(g2),)
        else:
            a = g2 if plan.left else jnp.swapaxes(g2, -1, -2)
            key = jax.random.key(randomized.seed)
            key = jax.random.fold_in(jax.random.fold_in(key, plan.index), count)
            rf = randomized

            def factorize(a, omega, old_c, fresh):
                warm = old_c if rf.warm_start else None
                return _subspace.range_finder(
                    a, omega, plan.rank, warm, fresh, precision, rf.qr, rf.power_iters
                )

            omega = _subspace.sketch(key, a, plan.rank, rf.oversample)
            inputs = (a, omega, old_c, sched.refreshes > 0)
        # Replicated stacked weights: each device factorizes its share of the slices.
        cand, split = _sharding.spread_map(factorize, refresh_axes, nb, *inputs)
        if moments != "keep":
            signs = jnp.sign(jnp.sum(cand * old_c, axis=-2, keepdims=True))
            cand = cand * jnp.where(signs == 0, 1, signs)
        overlap = subspace_overlap(cand, old_c) if adaptive is not None else None
        accept = due & valid
        if is_quantized(old):
            new = _select_slices(
                accept, _quantize_projector(cand.astype(projector_dtype), old.bits), old
            )
        else:
            new = jnp.where(accept[..., None, None], cand.astype(old.dtype), old)
        sched = advance(sched, accept, count, plan.offset, update_proj_gap, overlap, adaptive)
        if split:  # the new state whole again, placed like the old (no recompilation)
            new, sched = jax.tree.map(lambda x: _sharding.whole_slices(x, nb), (new, sched))
        return new, sched, jnp.any(accept)

    def update_fn(
        updates: base.Updates,
        state: GaLoreState,
        params: base.Params | None = None,
        **extra_args: Any,
    ) -> tuple[base.Updates, GaLoreState]:
        del params
        count = state.count
        leaves, treedef, plans = make_plans(updates)
        old_projectors = _flatten(state.projector, _is_leaf)[0]
        schedules = jax.tree.flatten(
            state.schedule, is_leaf=lambda x: _is_masked(x) or isinstance(x, RefreshSchedule)
        )[0]

        lows: list[Any] = []
        projectors: list[Any] = []
        new_schedules: list[Any] = []
        transitions: list[Any] = []
        matrices: list[Any] = []  # the gradients' matrix views, reused by the residual
        dense: list[Any] = []  # dequantized projectors (projector_bits), reused below
        for g, plan, old, sched in zip(leaves, plans, old_projectors, schedules, strict=True):
            if plan is None:
                lows.append(g)
                matrices.append(None)
                dense.append(None)
                projectors.append(old)
                new_schedules.append(sched)
                transitions.append(None)
                continue
            g2 = plan.view.to_matrix(g).astype(_compute_dtype(g.dtype))
            matrices.append(g2)
            new, sched, changed = jax.lax.cond(
                jnp.any(count >= sched.next_step),
                lambda g2=g2, old=old, sched=sched, plan=plan: refresh(plan, g2, old, sched, count),
                lambda old=old, sched=sched: (old, sched, jnp.zeros((), bool)),
            )
            p = _dense(new, g2.dtype)
            dense.append(p)
            lows.append(
                jnp.matmul(jnp.swapaxes(p, -1, -2), g2, precision=precision)
                if plan.left
                else jnp.matmul(g2, p, precision=precision)
            )
            projectors.append(new)
            new_schedules.append(sched)
            transitions.append((changed, new, old) if moments == "rotate" else None)

        base_state = state.base_optimizer_state
        if any(t is not None for t in transitions):
            base_state = _apply_moment_maps(
                base_state, lambda tree, second: _rotate(tree, transitions, plans, second)
            )
        try:
            low_updates, base_state = base_tx.update(
                treedef.unflatten(lows), base_state, None, **extra_args
            )
        except ValueError as err:
            if base.NO_PARAMS_MSG not in str(err):
                raise
            raise ValueError(
                "GaLore's base_optimizer runs on low-rank gradients without params, but this "
                "one needs params (adamw, lamb, lars, add_decayed_weights...). Use a gradient-"
                "only transform such as optax.scale_by_adam() and pass weight decay through "
                "galorax.galore(..., weight_decay=...)."
            ) from err

        out = []
        norms = _flatten(state.residual_norm)[0] if residual is not None else [None] * len(plans)
        new_norms: list[Any] = []
        for g, g2, low, u, plan, p, pd, norm in zip(
            leaves,
            matrices,
            lows,
            _flatten(low_updates)[0],
            plans,
            projectors,
            dense,
            norms,
            strict=True,
        ):
            if plan is None:
                out.append(u)
                new_norms.append(norm)
                continue
            p = (pd if is_quantized(p) else p).astype(u.dtype)
            full = (
                jnp.matmul(p, u, precision=precision)
                if plan.left
                else jnp.matmul(u, jnp.swapaxes(p, -1, -2), precision=precision)
            )
            if residual is not None:
                term, norm = compensation(g2, low, u, p, plan.left, norm, residual, precision)
                full = full + term
            new_norms.append(norm)
            out.append((scale * plan.view.from_matrix(full)).astype(g.dtype))

        return treedef.unflatten(out), GaLoreState(
            count=numerics.safe_int32_increment(count),
            base_optimizer_state=base_state,
            projector=treedef.unflatten(projectors),
            schedule=treedef.unflatten(new_schedules),
            residual_norm=treedef.unflatten(new_norms) if residual is not None else None,
        )

    # Explicit-axes meshes: the update body runs with automatic axes (see sharding.py).
    return base.GradientTransformationExtraArgs(init_fn, _sharding.auto_axes_update(update_fn))


def _flatten(tree: Any, is_leaf: Callable[[Any], bool] = _is_masked) -> tuple[list[Any], Any]:
    """Leaves and treedef, ``optax.MaskedNode`` counted as a leaf (keeps lists aligned)."""
    return jax.tree.flatten(tree, is_leaf=is_leaf)


def _compute_dtype(dtype: Any) -> Any:
    """Projections and low-rank moments run in at least f32 (bf16 moments stall)."""
    return jnp.promote_types(dtype, jnp.float32)


def _rotate(tree: Any, transitions: list[Any], plans: list[_Plan | None], second: bool) -> Any:
    """Carries one moment tree into the new bases (under a cond: only when one changed)."""
    # 8-bit moments (galorax.adam8bit) are leaves here: dequantized, rotated, requantized.
    leaves, treedef = _flatten(tree, lambda x: _is_masked(x) or is_quantized(x))
    if len(leaves) != len(plans):
        return tree  # not a per-parameter moment tree (e.g. a scalar count)

    def one(m: Any, plan: _Plan | None, transition: Any) -> Any:
        if plan is None or transition is None or getattr(m, "shape", None) != plan.low_shape:
            return m  # unprojected, or a container this rule does not know (left as is)
        changed, new, old = transition

        def rotated() -> Any:
            x = dequantize_blockwise(m, jnp.float32) if is_quantized(m) else m
            c = jnp.matmul(
                jnp.swapaxes(_dense(new, x.dtype), -1, -2),
                _dense(old, x.dtype),
                precision=jax.lax.Precision.HIGHEST,
            )
            if second:
                c = c * c
            if plan.left:  # moments r x n: rows follow the basis
                out = jnp.matmul(c, x, precision=jax.lax.Precision.HIGHEST)
            else:
                out = jnp.matmul(x, jnp.swapaxes(c, -1, -2), precision=jax.lax.Precision.HIGHEST)
            return quantize_like(out, m) if is_quantized(m) else out

        return jax.lax.cond(changed, rotated, lambda: m)

    return treedef.unflatten(
        [one(m, p, t) for m, p, t in zip(leaves, plans, transitions, strict=True)]
    )


def galore(
    learning_rate: base.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    base_optimizer: base.GradientTransformation | None = None,
    weight_decay: jax.typing.ArrayLike = 0.0,
    mask: Any | Callable[[base.Params], Any] | None = None,
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
) -> base.GradientTransformationExtraArgs:
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
        subspace: See :func:`scale_by_galore`, as all the keyword-only arguments below.
        moments: ``"keep"``, ``"align"`` or ``"rotate"`` the moments at a refresh.
        stagger: Spread the leaves' refreshes over the gap.
        side: Which side to project (``"auto"``: least state).
        projector_dtype: Storage dtype of the projectors.
        precision: Matmul precision.
        residual: Residual compensation (:class:`galorax.Residual`).
        adaptive: Adaptive refresh gaps (:class:`galorax.AdaptiveRefresh`).
        projector_bits: ``None``, ``8`` or ``4``: projectors stored quantized
            (int8 / int4 with per-group scales; 3.9x / 7.8x fewer projector bytes).
        refresh_axes: Data-parallel mesh axes to split stacked weights' refreshes over.

    Returns:
        A ``GradientTransformationExtraArgs`` implementing GaLore.
    """
    return optax.chain(
        scale_by_galore(
            rank,
            update_proj_gap,
            scale,
            base_optimizer,
            weight_dimension_numbers,
            subspace=subspace,
            moments=moments,
            stagger=stagger,
            side=side,
            projector_dtype=projector_dtype,
            precision=precision,
            residual=residual,
            adaptive=adaptive,
            projector_bits=projector_bits,
            refresh_axes=refresh_axes,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
