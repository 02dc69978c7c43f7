"""Shared pytest configuration for the JAX tests."""

import os

# jaxlib's QR/eigh run on scipy's OpenBLAS: its threads only contend on small matrices
# (as `galorax train` does, see galorax/cli.py).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Helper scripts run in their own processes (they need XLA_FLAGS or argv set first):
# not modules for the main run, its doctest collection included.
collect_ignore = ["distributed_worker.py", "sharding_cases.py"]
