"""Where GaLore's state and intermediates live on a mesh: the transform's placement rules.

Internal to the transforms (``galorax.galore_state``, ``galorax.projector`` and its
``projector_refresh`` / ``projector_storage``, ``galorax.subspace``, ``galorax.adam8bit``);
the public state-sharding API is :mod:`galorax.sharding`. Under explicit sharding a projector is
placed like its weight's projected (long) axis, low-rank moments like the remaining axis
(where the weight leaves that axis whole, the state takes the weight's mesh axes there or
on the rank axis), per-slice state like the weight's batch axes. On a mesh with explicit
axes the update body runs with automatic axes (:func:`auto_axes_update`); refreshes of
replicated stacked weights are split over data-parallel axes (:func:`spread_map`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from galorax.step_gate import gate_of
from galorax.subspace import on_several_devices


def typed_mesh(x: Any) -> Any:
    """The (abstract) mesh in ``x``'s type, or None off a mesh."""
    try:
        mesh = jax.typeof(x).sharding.mesh
    except (AttributeError, TypeError):
        return None
    return None if mesh.empty else mesh


def explicit_mesh(x: Any) -> Any:
    """The mesh of ``x``'s type when it has explicit axes (sharding in the type), else None."""
    mesh = typed_mesh(x)
    return mesh if mesh is not None and AxisType.Explicit in mesh.axis_types else None


def merged_spec(spec: tuple[Any, ...], axes: Sequence[int]) -> Any:
    """Spec of the axes ``axes`` of a weight flattened into one (major axes first)."""
    names: list[str] = []
    for ax in axes:
        entry = spec[ax] if ax < len(spec) else None
        if entry is None:
            break  # a sharded axis after an unsharded one is not a block of the merge
        names.extend(entry if isinstance(entry, tuple) else (entry,))
    if not names:
        return None
    return names[0] if len(names) == 1 else tuple(names)


def ways(entry: Any, mesh: Any) -> int:
    """Into how many shards a ``PartitionSpec`` entry (None, a mesh axis name or a tuple of
    them) splits an axis on ``mesh``.

    Example:
        >>> mesh = jax.sharding.AbstractMesh((2, 4), ("data", "fsdp"))
        >>> ways(None, mesh), ways("fsdp", mesh), ways(("data", "fsdp"), mesh)
        (1, 4, 8)
    """
    names = entry if isinstance(entry, tuple) else () if entry is None else (entry,)
    return math.prod(mesh.shape[a] for a in names)


def galore_leaf_specs(
    param: Any, view: Any, left: bool, rank: int
) -> dict[str, PartitionSpec] | None:
    """Specs of one projected leaf's state under explicit sharding, or None if unsharded.

    Keys: ``projector`` (the projected axis, like the param's), ``low`` (low-rank moments:
    the remaining axis), ``batch`` (per-slice schedules); see :func:`_matrix_spec` for an
    axis the param leaves whole.
    """
    mesh = explicit_mesh(param)
    if mesh is None:
        return None
    spec = tuple(jax.typeof(param).sharding.spec)
    batch = [spec[ax] if ax < len(spec) else None for ax in view.batch_axes]
    m_spec = merged_spec(spec, view.reduction_axes)
    n_spec = merged_spec(spec, view.output_axes)
    if left:
        proj = _matrix_spec(m_spec, n_spec, view.m, rank, mesh)
        low = _matrix_spec(n_spec, m_spec, view.n, rank, mesh)[::-1]
    else:
        proj = _matrix_spec(n_spec, m_spec, view.n, rank, mesh)
        low = _matrix_spec(m_spec, n_spec, view.m, rank, mesh)
    return {
        "projector": PartitionSpec(*batch, *proj),
        "low": PartitionSpec(*batch, *low),
        "batch": PartitionSpec(*batch),
    }


def _matrix_spec(own: Any, other: Any, size: int, rank: int, mesh: Any) -> tuple[Any, Any]:
    """Specs of a ``(size, rank)`` state matrix (a projector, or low-rank moments
    transposed) whose first axis is the weight's axis of spec ``own``: ``own`` there. Where
    the weight leaves that axis whole (FSDP shards one axis), the mesh axes of its other
    axis (``other``) go on that axis if they divide it, else on the rank axis if they divide
    that: otherwise every device would hold the whole matrix.

    Example:
        >>> mesh = jax.sharding.AbstractMesh((4,), ("fsdp",))
        >>> _matrix_spec(None, "fsdp", 64, 8, mesh), _matrix_spec(None, "fsdp", 6, 8, mesh)
        (('fsdp', None), (None, 'fsdp'))
    """
    if own is not None or other is None:
        return own, None
    n = ways(other, mesh)
    if size % n == 0:
        return other, None
    return None, other if rank % n == 0 else None


def place(x: Any, param: Any, spec: PartitionSpec | None) -> Any:
    """``x`` resharded to ``spec`` on ``param``'s explicit mesh (unchanged otherwise)."""
    mesh = explicit_mesh(param)
    if mesh is None or spec is None:
        return x
    return jax.sharding.reshard(x, NamedSharding(mesh, spec))


def like(x: Any, param: Any) -> Any:
    """``x`` (shaped like ``param``) sharded like ``param`` under explicit sharding."""
    mesh = explicit_mesh(param)
    if mesh is None:
        return x
    return jax.sharding.reshard(x, NamedSharding(mesh, jax.typeof(param).sharding.spec))


def explicit_mesh_of(tree: Any) -> Any:
    """The explicit-axes mesh of the first leaf of ``tree`` that has one, else None."""
    for leaf in jax.tree.leaves(tree):
        mesh = explicit_mesh(leaf)
        if mesh is not None:
            return mesh
    return None


def specs_of(tree: Any) -> Any:
    """Each leaf's ``PartitionSpec`` from its type (explicit sharding)."""
    return jax.tree.map(lambda x: jax.typeof(x).sharding.spec, tree)


def auto_axes_update(update_fn: Any) -> Any:
    """Wraps an optax ``update`` so it runs on meshes with explicit axes.

    Under explicit sharding every op must say how its output is sharded (a matmul that
    contracts a sharded axis, a QR or SVD of a sharded matrix are errors). GaLore's
    update is a data-dependent mix of those, so its body runs with the mesh's axes
    automatic (``jax.sharding.auto_axes``): the compiler places the intermediates. The
    outputs are pinned to the inputs' shardings (updates like the gradients, new state
    like the old), so the next call compiles to the same program. A state the body
    skipped in place under a :class:`galorax.StepGate` is covered outside it too.
    """

    def wrapped(updates: Any, state: Any, params: Any = None, **extra_args: Any):
        mesh = explicit_mesh_of(updates)
        if mesh is None:
            return update_fn(updates, state, params, **extra_args)
        # The gate is no JAX value: closed over, not passed through auto_axes.
        gate, covered = gate_of(extra_args), []
        extra_args = {k: v for k, v in extra_args.items() if k != "gate"}

        def run(u: Any, s: Any, p: Any, e: Any) -> Any:
            new_u, new_s = update_fn(u, s, p, **e, **({} if gate is None else {"gate": gate}))
            covered.append(gate is not None and gate.covers(new_s))
            return new_u, new_s

        out = (specs_of(updates), specs_of(state))
        body = jax.sharding.auto_axes(run, out_sharding=out)
        with contextlib.ExitStack() as stack:
            if jax.sharding.get_abstract_mesh().empty:
                stack.enter_context(jax.sharding.use_abstract_mesh(mesh))
            new_updates, new_state = body(updates, state, params, extra_args)
        if gate is not None and covered and all(covered):  # the same values, resharded
            gate.cover(new_state)
        return new_updates, new_state

    return wrapped


def whole_for_svd(g: jax.Array) -> jax.Array:
    """``g`` (``(*batch, m, n)``) with its matrix axes replicated, for an exact SVD.

    An SVD cannot run on a sharded matrix: on a mesh, each refresh gathers the whole
    gradient matrix on every device (``m * n`` elements per device) and every device
    runs the same SVD. This warns once per traced leaf and says so; the randomized
    refresh (``subspace="randomized"``) keeps the gradient sharded.
    """
    if not on_several_devices(g):
        return g
    mesh = jax.typeof(g).sharding.mesh
    mib = math.prod(g.shape) * g.dtype.itemsize / 2**20
    warnings.warn(
        f"galorax: subspace='svd' on a mesh of {mesh.size} devices gathers each "
        f"{tuple(g.shape)} gradient ({mib:.1f} MiB) onto every device at a refresh and runs "
        "the same SVD on each; subspace='randomized' keeps it sharded.",
        stacklevel=2,
    )
    spec = PartitionSpec(*([PartitionSpec.UNCONSTRAINED] * (g.ndim - 2)), None, None)
    return jax.lax.with_sharding_constraint(g, NamedSharding(mesh, spec))


def spread_map(fn: Any, axes: tuple[str, ...], n_batch: int, *xs: jax.Array) -> tuple[Any, bool]:
    """``fn(*xs)``, each device computing it on its share of one batch axis; and whether split.

    Used by a refresh (``refresh_axes`` of :func:`galorax.scale_by_galore`): the weights,
    hence the gradients, are replicated over ``axes`` (data parallelism), so every device
    would factorize every slice of a stacked weight. Here ``fn`` runs under
    ``jax.shard_map``, manual over ``axes`` only (the other mesh axes stay automatic, so
    an FSDP-sharded matrix stays sharded): each device factorizes its share of the slices.
    Splitting a replicated array moves no data; the result (``m * r`` per slice) is
    gathered afterwards by whoever reads it.

    The first batch axis that the axes' product divides is split; if none is, the last
    axis is dropped and the rest tried again; with none left, or without a mesh (one
    device), ``fn(*xs)`` runs as it is. Every ``xs`` starts with the same batch axes.
    After a split, give what derives from the result :func:`whole_slices`: otherwise the
    compiler may keep it (and the state built from it) split, and the next call recompiles.

    Raises:
        ValueError: ``axes`` names an axis the mesh does not have.
    """
    mesh = typed_mesh(xs[0])
    if not axes or not n_batch or mesh is None:
        return fn(*xs), False
    missing = [a for a in axes if a not in mesh.shape]
    if missing:
        raise ValueError(
            f"refresh_axes names {missing}, but the mesh's axes are {tuple(mesh.shape)}: "
            "name the data-parallel axes (those the weights are replicated over)."
        )
    spec = jax.typeof(xs[0]).sharding.spec
    used = {n for e in spec if e is not None for n in (e if isinstance(e, tuple) else (e,))}
    names = [a for a in axes if mesh.shape[a] > 1 and a not in used]
    while names:
        ways = math.prod(mesh.shape[a] for a in names)
        dim = next((i for i in range(n_batch) if xs[0].shape[i] % ways == 0), None)
        if dim is not None:
            entry = names[0] if len(names) == 1 else tuple(names)
            split = PartitionSpec(*([None] * dim), entry)
            mapped = jax.shard_map(
                fn,
                mesh=mesh,
                in_specs=(split,) * len(xs),
                out_specs=split,
                axis_names=frozenset(names),
                check_vma=False,
            )
            return mapped(*xs), True
        names.pop()
    return fn(*xs), False


def whole_slices(x: jax.Array, n_batch: int) -> jax.Array:
    """``x`` with its batch axes whole on every device (matrix axes left to the compiler).

    After :func:`spread_map`, the new projectors and schedules are constrained to this
    placement, their own (the weights are replicated over the split axes), so an update's
    output shardings equal its input's.
    """
    mesh = typed_mesh(x)
    if mesh is None or not n_batch:
        return x
    free = PartitionSpec.UNCONSTRAINED
    spec = PartitionSpec(*([None] * n_batch), *([free] * (x.ndim - n_batch)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
