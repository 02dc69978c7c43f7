"""GaLore on sharded parameters: meshes, state shardings and multi-process setup.

Everything runs on JAX's own machinery (``jax.sharding``, ``jit``, ``jax.distributed``).
The optimizer state follows the parameters: a projector is sharded like its weight's
projected (long) axis, low-rank moments like the remaining axis, per-slice state like
the weight's batch axes, scalars replicated. :func:`state_shardings` returns these
shardings without materializing the state, for ``jit(tx.init, out_shardings=...)``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import galorax
    >>> mesh = make_mesh("data=1,fsdp=1")
    >>> params = {"w": jnp.zeros((8, 4)), "b": jnp.zeros(4)}
    >>> specs = fsdp_partition_specs(params, mesh, min_size=1)
    >>> specs["w"]
    P('fsdp',)
    >>> tx = galorax.galore(learning_rate=0.1, rank=2)
    >>> state_partition_specs(tx, params, specs, mesh)[0].projector["w"]
    P('fsdp',)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = [
    "parse_mesh",
    "make_mesh",
    "fsdp_partition_specs",
    "batch_partition_spec",
    "state_partition_specs",
    "state_shardings",
    "initialize_distributed",
    "process_local_batch",
    "TrainPlacement",
    "is_primary",
    "sync_processes",
]


def parse_mesh(text: str) -> dict[str, int]:
    """Parses ``"data=2,fsdp=4"`` into ``{"data": 2, "fsdp": 4}``.

    One size may be ``-1``: it takes the devices the others leave.

    Example:
        >>> parse_mesh("data=2, fsdp=-1")
        {'data': 2, 'fsdp': -1}
    """
    axes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, size = part.partition("=")
        name = name.strip()
        try:
            value = int(size)
        except ValueError:
            value = 0
        if not sep or not name.isidentifier() or value == 0 or value < -1 or name in axes:
            raise ValueError(
                f"Bad mesh {text!r}: write NAME=SIZE pairs separated by commas, e.g. "
                "'data=2,fsdp=4' (one size may be -1 for the remaining devices)."
            )
        axes[name] = value
    if not axes:
        raise ValueError(f"Bad mesh {text!r}: it names no axis.")
    if list(axes.values()).count(-1) > 1:
        raise ValueError(f"Bad mesh {text!r}: at most one size may be -1.")
    return axes


def make_mesh(
    spec: str | dict[str, int], *, explicit: bool = True, devices: Sequence[Any] | None = None
) -> Mesh:
    """A device mesh from ``"data=2,fsdp=4"`` (see :func:`parse_mesh`).

    Args:
        spec: Axis names and sizes; their product must be the number of devices.
        explicit: Explicit axes (``jax.make_mesh``'s default: shardings are part of the
            types) or automatic ones (the compiler propagates them).
        devices: Devices to use; all of ``jax.devices()`` (every process's) by default.

    Example:
        >>> dict(make_mesh("data=-1").shape)
        {'data': 1}
    """
    axes = parse_mesh(spec) if isinstance(spec, str) else dict(spec)
    devices = list(jax.devices() if devices is None else devices)
    known = math.prod(v for v in axes.values() if v != -1)
    if -1 in axes.values():
        if len(devices) % known:
            raise ValueError(f"Mesh {axes}: {len(devices)} devices are not divisible by {known}.")
        axes = {k: (len(devices) // known if v == -1 else v) for k, v in axes.items()}
    if math.prod(axes.values()) != len(devices):
        raise ValueError(
            f"Mesh {axes} needs {math.prod(axes.values())} devices, but {len(devices)} are "
            "available (on CPU, simulate more with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N)."
        )
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh(
        tuple(axes.values()), tuple(axes), axis_types=(kind,) * len(axes), devices=devices
    )


def fsdp_partition_specs(
    params: Any, mesh: Mesh, axis: str | None = "fsdp", *, min_size: int = 1024
) -> Any:
    """FSDP partition specs: each weight sharded over ``axis`` along its largest divisible axis.

    The leading axis of a weight with 3+ axes (stacked layers under ``lax.scan``) is left
    whole; leaves smaller than ``min_size`` elements, or with no divisible axis, are
    replicated. With ``axis`` None or absent from the mesh, everything is replicated.

    Example:
        >>> import jax.numpy as jnp
        >>> mesh = make_mesh("fsdp=1")
        >>> fsdp_partition_specs({"w": jnp.zeros((2, 64, 32)), "b": jnp.zeros(8)}, mesh)
        {'b': P(), 'w': P(None, 'fsdp')}
    """
    size = mesh.shape.get(axis, 0) if axis else 0

    def spec(leaf: Any) -> PartitionSpec:
        shape = tuple(leaf.shape)
        if not size or math.prod(shape) < min_size:
            return PartitionSpec()
        first = 1 if len(shape) >= 3 else 0
        candidates = [i for i in range(first, len(shape)) if shape[i] % size == 0]
        if not candidates:
            return PartitionSpec()
        best = max(candidates, key=lambda i: (shape[i], i))
        return canonical(PartitionSpec(*(axis if i == best else None for i in range(len(shape)))))

    return jax.tree.map(spec, params)


def batch_partition_spec(mesh: Mesh, axes: Sequence[str] = ("data", "fsdp")) -> PartitionSpec:
    """Leading (batch) axis sharded over every one of ``axes`` that the mesh has.

    Example:
        >>> batch_partition_spec(make_mesh("data=1,fsdp=1"))
        P(('data', 'fsdp'),)
    """
    present = tuple(a for a in axes if a in mesh.shape)
    if not present:
        return PartitionSpec()
    return PartitionSpec(present if len(present) > 1 else present[0])


# --- optimizer state ----------------------------------------------------------------


def canonical(spec: PartitionSpec) -> PartitionSpec:
    """``spec`` without trailing ``None`` entries, as compiled outputs report it.

    ``P('fsdp', None)`` and ``P('fsdp')`` shard alike, but ``jit`` caches on the spelling:
    a state created with one and returned with the other compiles twice.

    Example:
        >>> canonical(PartitionSpec("fsdp", None))
        P('fsdp',)
    """
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def _as_spec(s: Any) -> PartitionSpec:
    if isinstance(s, NamedSharding):
        return s.spec
    if isinstance(s, PartitionSpec):
        return s
    if s is None:
        return PartitionSpec()
    raise TypeError(f"Expected a PartitionSpec or NamedSharding, got {s!r}.")


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec | NamedSharding) or x is None


def _mesh_of(params: Any, specs: Any) -> Any:
    for s in jax.tree.leaves((specs, params), is_leaf=lambda x: isinstance(x, NamedSharding)):
        sharding = s if isinstance(s, NamedSharding) else getattr(s, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def state_partition_specs(
    tx: optax.GradientTransformation, params: Any, param_specs: Any = None, mesh: Any = None
):
    """The partition specs of ``tx.init(params)``'s leaves, without materializing it.

    ``tx.init`` is traced (``jax.eval_shape``) on a mesh with explicit axes, where every
    array's type carries its sharding: optax's ``zeros_like`` moments inherit their
    parameter's, and GaLore places its projectors, low-rank moments and schedules by the
    rules of the module docstring.

    Args:
        tx: Any optax transformation (GaLore or not, chained or not).
        params: Arrays or ``jax.ShapeDtypeStruct`` (only shapes and dtypes are read).
        param_specs: A tree like ``params`` of ``PartitionSpec`` or ``NamedSharding``;
            by default the ``NamedSharding`` of each param.
        mesh: The mesh the specs refer to; by default the params' or shardings'.

    Returns:
        A tree like the state with a ``PartitionSpec`` at each leaf.
    """
    if param_specs is None:
        param_specs = jax.tree.map(lambda p: getattr(p, "sharding", None), params)
    mesh = mesh if mesh is not None else _mesh_of(params, param_specs)
    specs = jax.tree.map(_as_spec, param_specs, is_leaf=_is_spec)
    if mesh is None:
        shapes = jax.eval_shape(tx.init, params)
        return jax.tree.map(lambda _: PartitionSpec(), shapes)  # nothing sharded
    explicit = jax.sharding.AbstractMesh(
        tuple(mesh.axis_sizes),
        tuple(mesh.axis_names),
        axis_types=(AxisType.Explicit,) * len(mesh.axis_names),
    )
    abstract = jax.tree.map(
        lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=NamedSharding(explicit, s)),
        params,
        specs,
    )
    found: list[Any] = []

    def init(p: Any) -> Any:
        state = tx.init(p)
        found.append(jax.tree.map(canonical, specs_of(state)))  # from the traced types
        return state

    with jax.sharding.use_abstract_mesh(explicit):
        jax.eval_shape(init, abstract)
    return found[0]


def state_shardings(
    tx: optax.GradientTransformation, params: Any, mesh: Mesh | None = None, param_specs=None
):
    """``NamedSharding``s of ``tx.init(params)`` on ``mesh`` (see :func:`state_partition_specs`).

    Use them to create the state sharded from the start, so the first update's output
    matches its input and the second call does not recompile::

        opt_state = jax.jit(tx.init, out_shardings=state_shardings(tx, params))(params)

    Args:
        tx: The optimizer.
        params: Arrays or ``jax.ShapeDtypeStruct`` with ``NamedSharding`` (or give
            ``param_specs``).
        mesh: The mesh; by default the params'.
        param_specs: Optional tree of ``PartitionSpec``/``NamedSharding`` like ``params``.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> mesh = make_mesh("fsdp=1", explicit=False)
        >>> params = {"w": jnp.zeros((8, 4))}
        >>> shardings = state_shardings(optax.adam(0.1), params, mesh, {"w": PartitionSpec("fsdp")})
        >>> shardings[0].mu["w"].spec
        P('fsdp',)
    """
    if mesh is None:
        mesh = _mesh_of(params, param_specs)
        if mesh is None:
            raise ValueError("state_shardings needs a mesh: pass one or sharded params.")
    if param_specs is not None:
        param_specs = jax.tree.map(
            lambda s: NamedSharding(mesh, _as_spec(s)), param_specs, is_leaf=_is_spec
        )
    specs = state_partition_specs(tx, params, param_specs)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


# --- placement rules (used by galorax.galore's init) -------------------------------


def _typed_mesh(x: Any) -> Any:
    """The (abstract) mesh in ``x``'s type, or None off a mesh."""
    try:
        mesh = jax.typeof(x).sharding.mesh
    except (AttributeError, TypeError):
        return None
    return None if mesh.empty else mesh


def _explicit_mesh(x: Any) -> Any:
    """The mesh of ``x``'s type when it has explicit axes (sharding in the type), else None."""
    mesh = _typed_mesh(x)
    return mesh if mesh is not None and AxisType.Explicit in mesh.axis_types else None


def _merged_spec(spec: tuple[Any, ...], axes: Sequence[int]) -> Any:
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


def galore_leaf_specs(param: Any, view: Any, left: bool) -> dict[str, PartitionSpec] | None:
    """Specs of one projected leaf's state under explicit sharding, or None if unsharded.

    Keys: ``projector`` (the projected axis, like the param's), ``low`` (low-rank moments:
    the remaining axis), ``batch`` (per-slice schedules).
    """
    mesh = _explicit_mesh(param)
    if mesh is None:
        return None
    spec = tuple(jax.typeof(param).sharding.spec)
    batch = [spec[ax] if ax < len(spec) else None for ax in view.batch_axes]
    m_spec = _merged_spec(spec, view.reduction_axes)
    n_spec = _merged_spec(spec, view.output_axes)
    if left:
        proj, low = PartitionSpec(*batch, m_spec, None), PartitionSpec(*batch, None, n_spec)
    else:
        proj, low = PartitionSpec(*batch, n_spec, None), PartitionSpec(*batch, m_spec, None)
    return {"projector": proj, "low": low, "batch": PartitionSpec(*batch)}


def place(x: Any, param: Any, spec: PartitionSpec | None) -> Any:
    """``x`` resharded to ``spec`` on ``param``'s explicit mesh (unchanged otherwise)."""
    mesh = _explicit_mesh(param)
    if mesh is None or spec is None:
        return x
    return jax.sharding.reshard(x, NamedSharding(mesh, spec))


def like(x: Any, param: Any) -> Any:
    """``x`` (shaped like ``param``) sharded like ``param`` under explicit sharding."""
    mesh = _explicit_mesh(param)
    if mesh is None:
        return x
    return jax.sharding.reshard(x, NamedSharding(mesh, jax.typeof(param).sharding.spec))


def explicit_mesh_of(tree: Any) -> Any:
    """The explicit-axes mesh of the first leaf of ``tree`` that has one, else None."""
    for leaf in jax.tree.leaves(tree):
        mesh = _explicit_mesh(leaf)
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
    like the old), so the next call compiles to the same program.
    """

    def wrapped(updates: Any, state: Any, params: Any = None, **extra_args: Any):
        mesh = explicit_mesh_of(updates)
        if mesh is None:
            return update_fn(updates, state, params, **extra_args)
        out = (specs_of(updates), specs_of(state))
        body = jax.sharding.auto_axes(lambda u, s, p, e: update_fn(u, s, p, **e), out_sharding=out)
        with contextlib.ExitStack() as stack:
            if jax.sharding.get_abstract_mesh().empty:
                stack.enter_context(jax.sharding.use_abstract_mesh(mesh))
            return body(updates, state, params, extra_args)

    return wrapped


def whole_for_svd(g: jax.Array) -> jax.Array:
    """``g`` (``(*batch, m, n)``) with its matrix axes replicated, for an exact SVD.

    An SVD cannot run on a sharded matrix: on a mesh, each refresh gathers the whole
    gradient matrix on every device (``m * n`` elements per device) and every device
    runs the same SVD. This warns once per traced leaf and says so; the randomized
    refresh (``subspace="randomized"``) keeps the gradient sharded.
    """
    from galorax.subspace import _on_several_devices

    if not _on_several_devices(g):
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
    mesh = _typed_mesh(xs[0])
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
    mesh = _typed_mesh(x)
    if mesh is None or not n_batch:
        return x
    free = PartitionSpec.UNCONSTRAINED
    spec = PartitionSpec(*([None] * n_batch), *([free] * (x.ndim - n_batch)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# --- multiple processes ---------------------------------------------------------------


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
) -> bool:
    """Starts ``jax.distributed`` from arguments or the environment; a no-op for one process.

    Arguments win; missing ones come from ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. With none of them set, JAX's own cluster
    detection (SLURM, Open MPI, Kubernetes, Cloud TPU) decides when
    ``GALORAX_DISTRIBUTED=auto``; otherwise the run stays single-process. Call it before
    any other JAX call. On CPU, collectives across processes go through gloo.

    Returns:
        Whether ``jax.distributed.initialize`` was called.

    Example:
        >>> initialize_distributed()  # no flags, no environment: one process
        False
    """
    env = os.environ
    address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    auto = env.get("GALORAX_DISTRIBUTED", "").lower() == "auto"
    if address is None and num_processes is None and process_id is None and not auto:
        return False
    if num_processes == 1 and not auto:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
    return True


def process_local_batch(
    global_batch: Any, sharding: NamedSharding, *, already_local: bool = False
) -> jax.Array:
    """A global, sharded batch from each process's own rows.

    Every process passes either the full global batch (each device's rows are sliced out
    of it, whatever the mesh's device order) or, with ``already_local=True``, only the rows
    its devices hold: the process's contiguous block of ``sharding``'s leading axis (for
    meshes from :func:`make_mesh`, process ``i`` of ``n`` holds rows
    ``[i*B/n, (i+1)*B/n)``).

    Example:
        >>> import numpy as np
        >>> mesh = make_mesh("data=1")
        >>> rows = NamedSharding(mesh, PartitionSpec("data"))
        >>> x = process_local_batch(np.arange(8).reshape(4, 2), rows)
        >>> x.shape
        (4, 2)
    """
    data = np.asarray(global_batch)
    n = jax.process_count()
    if already_local:
        global_shape = (data.shape[0] * n, *data.shape[1:])
        return jax.make_array_from_process_local_data(sharding, data, global_shape)
    return jax.make_array_from_callback(data.shape, sharding, lambda index: data[index])


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0; always true alone)."""
    return jax.process_index() == 0


def sync_processes(name: str) -> None:
    """Waits until every process reaches ``name`` (a no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@dataclasses.dataclass(frozen=True)
class TrainPlacement:
    """Where a training run's arrays live on a mesh (used by ``galorax train --mesh``).

    The mesh's axes are automatic: the model's ops (embedding gathers, ``lax.scan``) need
    no sharding annotations, the compiler propagates the placements below.

    Attributes:
        mesh: The device mesh (all processes' devices).
        params: ``NamedSharding`` per parameter: FSDP over ``fsdp`` (see
            :func:`fsdp_partition_specs`), small leaves replicated.
        batch: The batch's: rows over every data-parallel axis (:func:`batch_partition_spec`).
        replicated: Scalars (the loss).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> plan = TrainPlacement.create("data=1,fsdp=1", {"w": jnp.zeros((64, 32))})
        >>> plan.params["w"].spec, plan.batch.spec
        (P('fsdp',), P(('data', 'fsdp'),))
    """

    mesh: Mesh
    params: Any
    batch: NamedSharding
    replicated: NamedSharding

    @classmethod
    def create(cls, spec: str | dict[str, int], params: Any, *, min_size: int = 1024):
        """A placement for ``params`` (arrays or ``ShapeDtypeStruct``) on mesh ``spec``."""
        mesh = make_mesh(spec, explicit=False)
        specs = fsdp_partition_specs(params, mesh, min_size=min_size)
        return cls(
            mesh=mesh,
            params=jax.tree.map(lambda s: NamedSharding(mesh, s), specs),
            batch=NamedSharding(mesh, batch_partition_spec(mesh)),
            replicated=NamedSharding(mesh, PartitionSpec()),
        )

    def batch_ways(self) -> int:
        """Into how many row blocks a batch is split."""
        entry = self.batch.spec[0] if len(self.batch.spec) else None
        names = entry if isinstance(entry, tuple) else (entry,) if entry else ()
        return math.prod(self.mesh.shape[a] for a in names)

    def state(self, tx: optax.GradientTransformation, params: Any) -> Any:
        """``NamedSharding``s of ``tx.init(params)`` (see :func:`state_shardings`)."""
        return state_shardings(tx, params, self.mesh, self.params)

    def put_batch(self, rows: Any) -> jax.Array:
        """The global batch (the same ``rows`` on every process) placed on the mesh."""
        return process_local_batch(rows, self.batch)

    def abstract_batch(self, shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        """A batch's shape, dtype and sharding, for ``jit(...).lower``."""
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch)
