"""What ``import galorax.torch`` costs: no JAX, CLI or transformers; a clear error without torch.

Each case runs a fresh interpreter: this process has imported JAX already (other tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")

_USE_OPTIMIZERS = """
import json, sys
import galorax.torch
loaded = {"torch_after_import": "torch" in sys.modules}
import torch
from galorax.torch import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, LayerwiseGaLore
from galorax.torch import ApolloAdamW, ApolloAdamW8bit, LayerwiseOptimizer, param_groups
w = torch.nn.Parameter(torch.zeros(64, 32))
for opt in (GaLoreAdamW([w], rank=4), GaLoreAdamW8bit([w], rank=4, min_8bit_size=16),
            GaLoreAdafactor([w], rank=4), ApolloAdamW([w], rank=4),
            ApolloAdamW8bit([w], rank=4, min_8bit_size=16)):
    w.grad = torch.randn(64, 32)
    opt.step()
lw = LayerwiseGaLore(GaLoreAdamW([w], rank=4))
(w * torch.randn(64, 32)).sum().backward()
lw.step()
lw.remove()
opt = LayerwiseOptimizer(GaLoreAdamW([w], rank=4))
(w * torch.randn(64, 32)).sum().backward()
opt.step()
loaded["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "transformers",
                           "accelerate") or m == "galorax.app" or m.startswith("galorax.app."))
print(json.dumps(loaded))
"""

_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # as if torch were not installed
import galorax.torch
try:
    galorax.torch.GaLoreAdamW
except ImportError as e:
    print(e)
"""


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_torch_optimizers_import_neither_jax_nor_the_cli_nor_transformers():
    loaded = json.loads(_run(_USE_OPTIMIZERS))
    assert loaded == {"torch_after_import": False, "modules": []}


def test_without_torch_the_package_imports_and_names_say_what_to_install():
    assert "pip install 'galorax[torch]'" in _run(_WITHOUT_TORCH)
