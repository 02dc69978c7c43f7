"""Compile-only GPUs: XLA's memory analysis of a step for a GPU this machine does not have.

XLA compiles for a GPU it is only described (deviceless ahead-of-time compilation: a
``stream_executor.GpuTargetConfigProto``, as XLA's own ``gpu_specs`` folder holds), so
``galorax memory --xla --target h100`` reports the peak of the train step XLA:GPU would run,
from a laptop. It needs JAX's CUDA plugin (``pip install "jax[cuda13]"``: the compiler and
its libraries) but no GPU and no driver; nothing is allocated or run.

Example:
    >>> print(target_config(TARGETS["rtx4090"]).splitlines()[-1])
    device_description_str: "NVIDIA GeForce RTX 4090"
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
from jax.experimental import topologies

from galorax.app.config import UsageError

#: How to install what ``--target`` needs.
INSTALL = 'pip install "jax[cuda13]"'


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """The device facts XLA:GPU's compiler reads (NVIDIA's published figures).

    Attributes:
        name: The device name ``nvidia-smi`` prints.
        capability: CUDA compute capability ``(major, minor)``.
        cores: Streaming multiprocessors.
        memory: Device memory in bytes (what the driver reports; bounds XLA's scheduler).
        bandwidth: Memory bandwidth in bytes/s.
        l2: L2 cache in bytes.
        clock_ghz: Boost clock.
        shared_per_core: Shared memory per multiprocessor in bytes.
        threads_per_core: Resident threads per multiprocessor.
    """

    name: str
    capability: tuple[int, int]
    cores: int
    memory: int
    bandwidth: int
    l2: int
    clock_ghz: float
    shared_per_core: int
    threads_per_core: int


#: NVIDIA H100 SXM (80 GB HBM3).
H100 = GpuSpec(
    name="NVIDIA H100 80GB HBM3",
    capability=(9, 0),
    cores=132,
    memory=84929347584,
    bandwidth=3352320000000,
    l2=52428800,
    clock_ghz=1.98,
    shared_per_core=233472,
    threads_per_core=2048,
)

#: ``--target`` names: Hopper data-centre GPUs (the H200 is the H100's chip with more and
#: faster memory) and the paper's 24 GB consumer GPU.
TARGETS: dict[str, GpuSpec] = {
    "h100": H100,
    "h200": dataclasses.replace(
        H100, name="NVIDIA H200", memory=150754820096, bandwidth=4800000000000
    ),
    "rtx4090": GpuSpec(
        name="NVIDIA GeForce RTX 4090",
        capability=(8, 9),
        cores=128,
        memory=25757220864,
        bandwidth=1008000000000,
        l2=75497472,
        clock_ghz=2.52,
        shared_per_core=102400,
        threads_per_core=1536,
    ),
}


def target_config(spec: GpuSpec) -> str:
    """``spec`` as the ``GpuTargetConfigProto`` text XLA:GPU compiles for."""
    major, minor = spec.capability
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {spec.shared_per_core}
  threads_per_core_limit: {spec.threads_per_core}
  core_count: {spec.cores}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {spec.bandwidth}
  l2_cache_size: {spec.l2}
  clock_rate_ghz: {spec.clock_ghz}
  device_memory_size: {spec.memory}
  shared_memory_per_block_optin: {spec.shared_per_core - 1024}
  cuda_compute_capability {{
    major: {major}
    minor: {minor}
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 8
}}
runtime_version {{
  major: 13
  minor: 0
}}
device_description_str: "{spec.name}\""""


def target_device(target: str) -> jax.Device:
    """A compile-only device for ``target``: a :data:`TARGETS` name or a
    ``GpuTargetConfigProto`` text file (e.g. one of XLA's ``xla/tools/hlo_opt/gpu_specs``).

    Raises:
        UsageError: an unknown name or unreadable file, or no CUDA plugin installed.
    """
    return target_devices(target, 1)[0]


def target_devices(target: str, n: int) -> list[jax.Device]:
    """``n`` compile-only devices of ``target`` on one host (see :func:`target_device`),
    for a mesh."""
    if target in TARGETS:
        text = target_config(TARGETS[target])
    else:
        path = Path(target)
        if not path.is_file():
            raise UsageError(
                f"--target {target!r} is neither a GPU ({', '.join(TARGETS)}) nor a "
                "GpuTargetConfigProto text file"
            )
        text = path.read_text()
    try:
        topology = topologies.get_topology_desc(
            platform="cuda", topology_name="cuda", target_config=text, topology=f"1x1x{n}"
        )
    except NotImplementedError:
        raise UsageError(
            f"--target {target}: compiling for a GPU needs JAX's CUDA plugin: {INSTALL}"
        ) from None
    except RuntimeError as e:  # XLA's parse error
        raise UsageError(f"--target {target}: {str(e).splitlines()[0]}") from None
    return list(topology.devices)
