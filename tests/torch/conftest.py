"""Fixtures of the galorax.torch tests (skipped as a whole when torch is missing)."""

from __future__ import annotations

import pytest

try:
    import torch
except ImportError:
    # Without torch every test here skips (each file also calls pytest.importorskip).
    collect_ignore_glob = ["test_*.py", "galorax_torch_testlib.py"]
else:
    # The tests use small matrices, where one thread is fastest, and a busy 2-core machine
    # (CI, other test processes) makes torch's spinning OpenMP threads 100x slower.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def galore_torch():
    from galorax_torch_testlib import load_galore_torch

    mod = load_galore_torch()
    if mod is None:
        pytest.skip("galore-torch not installed (pip install galore-torch --no-deps)")
    return mod


@pytest.fixture(scope="session")
def apollo_torch():
    from galorax_torch_testlib import load_apollo_torch

    mod = load_apollo_torch()
    if mod is None:
        pytest.skip("apollo-torch not installed (pip install apollo-torch==1.0.3 --no-deps)")
    return mod
