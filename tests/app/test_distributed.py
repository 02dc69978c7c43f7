"""Two processes on localhost under ``jax.distributed`` (CPU collectives through gloo) run
``galorax train``'s loop on the micro model, FSDP over their 2 devices, with sharded
checkpoints: the same losses as one process on one device, and the last checkpoint
restored onto the mesh gives the run's last validation loss exactly.

What looked like a stall at the first refresh step was compile time: the step was
compiled twice (its outputs' shardings were left to the compiler, so the second call
saw other input shardings and compiled again), each compile of the GaLore update costing
tens of CPU seconds under LLVM's default optimization (the PRNG's threefry kernels
dominate), two processes sharing 2 cores. The training loop pins its step's output
shardings; the test compiles with LLVM's optimizations off and one XLA thread per process.
"""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKER = pathlib.Path(__file__).resolve().with_name("distributed_worker.py")
#: Hard limit for all processes together (a real hang fails instead of blocking CI). Not a
#: timing: 150 s ran out on a 2-core machine under a load of 7 (the reference process had
#: only started), so the margin is generous.
DEADLINE_S = 300
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


def _start(pid: int, nproc: int, port: int, data: pathlib.Path, out: pathlib.Path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS=XLA_FLAGS)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")  # LAPACK's own threads, like XLA's: one
    # Logs go to files: an undrained pipe would block a chatty worker (and its peer).
    log = out.parent / f"{out.name}.{pid}.log"
    args = [str(WORKER), str(pid), str(nproc), str(port), str(data), str(out)]
    proc = subprocess.Popen(
        [sys.executable, *args], env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    return proc, log


def _metrics(out: pathlib.Path) -> list[dict]:
    import json

    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not _gloo_available(), reason="jax.distributed with gloo is unavailable")
def test_two_processes_match_one(tmp_path):
    from test_train import make_text_dir

    data = make_text_dir(tmp_path / "data")
    one, two = tmp_path / "one", tmp_path / "two"
    port = _free_port()
    # The reference and the two-process run side by side: they share no state.
    runs = [_start(0, 1, 0, data, one)] + [_start(i, 2, port, data, two) for i in range(2)]
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
    log0 = runs[1][1].read_text()
    assert "] devices 2 processes 2" in log0
    restored = re.search(r"restored val_loss (\S+) run (\S+)", log0)
    assert restored and restored[1] == restored[2], log0[-2000:]
    a, b = _metrics(one), _metrics(two)
    # One record per step: process 0 alone writes the run's files.
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        for k in ("loss", "val_loss"):
            assert (k in x) == (k in y)
            if k in x:
                assert abs(x[k] - y[k]) <= 1e-4 * abs(x[k]), (k, a, b)
    assert '"mesh": "data=1,fsdp=-1"' in (two / "config.json").read_text()
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["2", "4"]
