"""The training application's process plumbing: ``jax.distributed``, per-process batches,
the primary process, barriers and where a run's arrays live on a mesh
(:class:`TrainPlacement`, with the abstract restore/compile targets :class:`Targets`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from galorax.app.checkpoint import with_shardings
from galorax.sharding import batch_partition_spec, fsdp_partition_specs, make_mesh, state_shardings


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
        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process, the same answer on all of them (an
    all-gather of one integer per process; alone, ``flag`` itself). Every process must
    call it at the same point, as any collective.

    Example:
        >>> any_process(True), any_process(False)
        (True, False)
    """
    if jax.process_count() == 1:
        return bool(flag)
    flags = multihost_utils.process_allgather(np.int32(bool(flag)))
    return bool(np.any(flags))


class Targets(NamedTuple):
    """A run's arrays as placed ``jax.ShapeDtypeStruct``s: what a checkpoint restores onto
    and what the step's outputs are pinned to.

    Attributes:
        params: The parameters, on their FSDP shardings.
        state: The optimizer state, on ``state_shardings``.
        state_shardings: ``NamedSharding`` per optimizer-state leaf.
    """

    params: Any
    state: Any
    state_shardings: Any


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
    def create(cls, spec: Mesh | str | dict[str, int], params: Any, *, min_size: int = 1024):
        """A placement for ``params`` (arrays or ``ShapeDtypeStruct``) on a mesh (or the
        automatic-axes mesh of a spec such as ``data=2,fsdp=4``)."""
        mesh = spec if isinstance(spec, Mesh) else make_mesh(spec, explicit=False)
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

    def targets(self, tx: optax.GradientTransformation, params: Any) -> Targets:
        """Abstract ``params`` and ``tx.init(params)`` on this placement (see :class:`Targets`)."""
        state_sh = self.state(tx, params)
        state = with_shardings(jax.eval_shape(tx.init, params), state_sh)
        return Targets(with_shardings(params, self.params), state, state_sh)

    def put_batch(self, rows: Any) -> jax.Array:
        """The global batch (the same ``rows`` on every process) placed on the mesh."""
        return process_local_batch(rows, self.batch)

    def abstract_batch(self, shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        """A batch's shape, dtype and sharding, for ``jit(...).lower``."""
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch)
