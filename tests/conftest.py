"""Shared pytest configuration for the JAX tests."""

# Helper scripts run in their own processes (they need XLA_FLAGS or argv set first):
# not modules for the main run, its doctest collection included.
collect_ignore = ["distributed_worker.py", "sharding_cases.py"]
