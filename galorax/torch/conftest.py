"""Doctest collection of galorax.torch needs torch: skip these modules without it."""

try:
    import torch  # noqa: F401

    collect_ignore_glob: list[str] = []
except ImportError:
    collect_ignore_glob = ["*.py"]
