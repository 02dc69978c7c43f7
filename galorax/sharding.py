"""GaLore on sharded parameters: meshes, parameter specs and the optimizer state's shardings.

Everything runs on JAX's own machinery (``jax.sharding``, ``jit``, ``jax.distributed``).
The optimizer state follows the parameters: a projector is sharded like its weight's
projected (long) axis, low-rank moments like the remaining axis (where FSDP leaves such an
axis whole, the state takes the weight's mesh axes on it or on the rank axis, so no device
holds a whole projector or moment), per-slice state like the weight's batch axes, 8-bit
moments' codes like their weight (scales along the leading axes), scalars replicated.
:func:`state_shardings` returns these shardings without materializing the state, for
``jit(tx.init, out_shardings=...)``.

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

import math
from collections.abc import Sequence
from typing import Any

import jax
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from galorax.placement import specs_of

__all__ = [
    "parse_mesh",
    "make_mesh",
    "fsdp_partition_specs",
    "batch_partition_spec",
    "state_partition_specs",
    "state_shardings",
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
