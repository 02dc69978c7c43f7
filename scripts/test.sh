#!/usr/bin/env bash
# The one test entry point: the README's test command and CI's (.ci/run) both call it.
#
# Makes (or reuses) a virtual environment, installs what the suite needs, then runs ruff,
# mypy and pytest. Arguments go to pytest (e.g. `scripts/test.sh tests/lib/test_transform.py`).
#   GALORAX_VENV  the environment's folder (default: .venv in the checkout)
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
venv="${GALORAX_VENV:-.venv}"
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
# torch 2.13.0: the CPU build this workplace ships on disk (a bare `torch` would pull
# CUDA wheels, gigabytes). galore-torch and apollo-torch without their dependencies
# (transformers, bitsandbytes): the differential references of galorax.torch's tests.
"$py" -m pip install -q torch==2.13.0
"$py" -m pip install -q --no-deps galore-torch==1.0
"$py" -m pip install -q --no-deps apollo-torch==1.0.3
"$py" -m pip install -q -e ".[dev]"
"$py" -m ruff check galorax tests benchmarks
"$py" -m mypy galorax
# pytest exits 5 when it collects nothing: a failure here too.
"$py" -m pytest "$@"
