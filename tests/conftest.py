"""Shared pytest configuration for the JAX tests."""

import os

# jaxlib's QR/eigh run on scipy's OpenBLAS: its threads only contend on small matrices
# (as `galorax train` does, see galorax/cli.py).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# The suite is compile-bound (tiny shapes, many programs): LLVM's optimizations off cut
# its CPU time by about a third (measured on tests/test_transform.py: 55 -> 34 CPU-s) and
# change no HLO pass (LLVM may still contract multiply-adds otherwise, so two different
# programs can differ in the last bit: tests that compare two programs of 8-bit or fused
# updates use tolerances). Set before JAX starts (subprocesses
# inherit it); an XLA_FLAGS that already names the level wins.
_LEVEL = "--xla_backend_optimization_level"
if _LEVEL not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_LEVEL}=0".strip()

# Helper scripts run in their own processes (they need XLA_FLAGS or argv set first):
# not modules for the main run, its doctest collection included.
collect_ignore = ["distributed_worker.py", "interrupt_worker.py", "sharding_cases.py"]
