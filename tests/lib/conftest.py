"""pytest configuration of the library's tests (the environment: ``tests/conftest.py``)."""

# Run in its own process on 8 simulated devices (XLA_FLAGS set first) by test_sharding.py:
# not a module for the main run, its doctest collection included.
collect_ignore = ["sharding_cases.py"]
