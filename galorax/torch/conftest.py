"""Doctest collection of galorax.torch needs torch: skip these modules without it."""

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("torch") else ["*.py"]
