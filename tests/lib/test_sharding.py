"""Runs ``tests/lib/sharding_cases.py`` on 8 simulated CPU devices, in a fresh process.

The device count is fixed when JAX starts (``XLA_FLAGS``), so these cases cannot run in
the main pytest process (the runner: ``run_on_8_devices`` in ``tests/conftest.py``).
"""

from __future__ import annotations

import pathlib


def test_sharding_cases_on_8_devices(run_on_8_devices):
    run_on_8_devices(pathlib.Path(__file__).with_name("sharding_cases.py"))
