"""Runs ``tests/sharding_cases.py`` on 8 simulated CPU devices, in a fresh process.

The device count is fixed when JAX starts (``XLA_FLAGS``), so these cases cannot run in
the main pytest process.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_sharding_cases_on_8_devices():
    env = dict(os.environ)
    # LLVM's optimizations off: these cases are compile-bound (50 CPU-s -> 17 with it).
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "")
        + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    # jaxlib's LAPACK kernels (eigh, QR, SVD) run on OpenBLAS, whose own threads, called
    # from 8 simulated devices at once on a small machine, spin against each other.
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-x", "-p", "no:cacheprovider"]
    cmd += ["--rootdir", str(ROOT), str(ROOT / "tests" / "sharding_cases.py")]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "24 passed" in proc.stdout, proc.stdout[-2000:]
