"""Shared pytest configuration of the test houses (``tests/lib``: the library, ``tests/app``:
the application, ``tests/torch``: the PyTorch port): the environment every JAX test runs in,
and the runner of the 8-device cases."""

import os
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

# jaxlib's QR/eigh run on scipy's OpenBLAS: its threads only contend on small matrices
# (as `galorax train` does, see galorax/app/cli.py).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# The suite is compile-bound (tiny shapes, many programs): LLVM's optimizations off cut
# its CPU time by about a third (measured on tests/lib/test_transform.py: 55 -> 34 CPU-s) and
# change no HLO pass (LLVM may still contract multiply-adds otherwise, so two different
# programs can differ in the last bit: tests that compare two programs of 8-bit or fused
# updates use tolerances). Set before JAX starts (subprocesses
# inherit it); an XLA_FLAGS that already names the level wins.
_LEVEL = "--xla_backend_optimization_level"
if _LEVEL not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_LEVEL}=0".strip()

ROOT = pathlib.Path(__file__).resolve().parent.parent


def pytest_ignore_collect(collection_path: pathlib.Path) -> bool | None:
    """conftest.py files are pytest's plugins, not modules to collect: ``--doctest-modules``
    would import each one again as the module ``conftest`` (it has no doctests), and the
    houses' conftest.py files share that name ("import file mismatch")."""
    return True if collection_path.name == "conftest.py" else None


def _run_on_8_devices(cases: pathlib.Path, report: pathlib.Path) -> None:
    """Runs the pytest file ``cases`` in a fresh process on 8 simulated CPU devices (the
    device count is fixed when JAX starts, so such cases cannot run in the main pytest
    process); fails unless it ran at least one case and every case passed (none skipped:
    the cases skip themselves without 8 devices)."""
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
    cmd += ["--rootdir", str(ROOT), f"--junitxml={report}", str(cases)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    out = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, out
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert suite is not None, out
    ran = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    assert ran["tests"] > 0 and ran["failures"] == ran["errors"] == ran["skipped"] == 0, (ran, out)


@pytest.fixture
def run_on_8_devices(tmp_path):
    """``run_on_8_devices(cases)``: runs the pytest file ``cases`` on 8 simulated CPU devices
    in a fresh process; fails unless at least one case ran and all passed."""
    return lambda cases: _run_on_8_devices(pathlib.Path(cases), tmp_path / "cases.xml")
