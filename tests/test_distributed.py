"""Two processes on localhost under ``jax.distributed`` (CPU collectives through gloo)
train the micro model with FSDP params and a data-sharded batch: same losses as one
process on one device; a sharded checkpoint written by both resumes bit-identically.

What looked like a stall at the first refresh step was compile time: the step was
compiled twice (its outputs' shardings were left to the compiler, so the second call
saw other input shardings and compiled again), each compile of the GaLore update costing
tens of CPU seconds under LLVM's default optimization (the PRNG's threefry kernels
dominate), two processes sharing 2 cores. The worker pins its output shardings; the test
compiles with LLVM's optimizations off and one XLA thread per process.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "distributed_worker.py"
#: Hard limit for all processes together (a real hang fails instead of blocking CI).
DEADLINE_S = 150
#: Compile time, not run time, dominates on CPU: XLA's backend optimizations off (2.5x
#: less CPU time here), one thread per process (two processes share 2 cores).
XLA_FLAGS = (
    "--xla_backend_optimization_level=0 "
    "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)


def _gloo_available() -> bool:
    try:
        import jax
        from jax._src.lib import _jax
    except ImportError:
        return False
    return hasattr(jax, "distributed") and hasattr(_jax, "make_gloo_tcp_collectives")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(
    pid: int, nproc: int, port: int, out: pathlib.Path
) -> tuple[subprocess.Popen, pathlib.Path]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS=XLA_FLAGS)
    # Logs go to files: an undrained pipe would block a chatty worker (and its peer).
    log = out.with_suffix(f".{pid}.log")
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(pid), str(nproc), str(port), str(out)],
        env=env,
        cwd=ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    return proc, log


@pytest.mark.skipif(not _gloo_available(), reason="jax.distributed with gloo is unavailable")
def test_two_processes_match_one(tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    port = _free_port()
    # The reference and the two-process run side by side: they share no state.
    runs = [_start(0, 1, 0, one)] + [_start(i, 2, port, two) for i in range(2)]
    start = time.monotonic()
    try:
        for proc, log in runs:
            left = DEADLINE_S - (time.monotonic() - start)
            try:
                proc.wait(timeout=max(left, 1))
            except subprocess.TimeoutExpired:
                pytest.fail(f"no result within {DEADLINE_S} s:\n{log.read_text()[-3000:]}")
    finally:
        for proc, _ in runs:  # never leave a worker waiting on a dead peer
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, log in runs:
        assert proc.returncode == 0, log.read_text()[-4000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["devices"] == 1 and b["devices"] == 2
    assert len(b["losses"]) == 4
    assert a["resumed"] == a["losses"][2:] and b["resumed"] == b["losses"][2:]
    for x, y in zip(a["losses"], b["losses"], strict=True):
        assert abs(x - y) <= 1e-4 * abs(x), (a["losses"], b["losses"])
