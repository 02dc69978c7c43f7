"""pytest configuration of the application's tests (the environment: ``tests/conftest.py``)."""

# Helper scripts run in their own processes (they need XLA_FLAGS or argv set first):
# not modules for the main run, its doctest collection included.
collect_ignore = ["distributed_worker.py", "interrupt_worker.py", "mesh_cases.py"]
