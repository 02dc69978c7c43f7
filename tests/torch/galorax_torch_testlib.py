"""Helpers of the galorax.torch tests and benchmark: the galore-torch 1.0 reference loader and
synthetic gradients. (A uniquely named module, not conftest: `from conftest import` breaks as
soon as another conftest.py exists higher up.)"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import torch


def load_galore_torch() -> types.ModuleType | None:
    """galore_torch's AdamW and Adafactor, without its package __init__.

    galore-torch 1.0 imports bitsandbytes (for its 8-bit optimizer) in its __init__ and
    transformers' version checker in its modules; neither is needed for the reference math.
    Install it with ``pip install galore-torch --no-deps``.
    """
    try:
        import galore_torch  # noqa: F401

        return sys.modules["galore_torch"]
    except Exception:
        pass
    spec = importlib.util.find_spec("galore_torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = list(spec.submodule_search_locations)[0]
    name = "_galore_torch_ref"
    pkg = types.ModuleType(name)
    pkg.__path__ = [root]
    sys.modules[name] = pkg
    stubs = {}
    if importlib.util.find_spec("transformers") is None:
        versions = types.ModuleType("transformers.utils.versions")
        versions.require_version = lambda *a, **k: None
        stubs = {
            "transformers": types.ModuleType("transformers"),
            "transformers.utils": types.ModuleType("transformers.utils"),
            "transformers.utils.versions": versions,
        }
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        for sub in ("galore_projector", "adamw", "adafactor"):
            s = importlib.util.spec_from_file_location(
                f"{name}.{sub}", os.path.join(root, f"{sub}.py")
            )
            assert s is not None and s.loader is not None
            mod = importlib.util.module_from_spec(s)
            sys.modules[s.name] = mod
            s.loader.exec_module(mod)
            setattr(pkg, sub, mod)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    pkg.GaLoreAdamW = pkg.adamw.AdamW
    pkg.GaLoreAdafactor = pkg.adafactor.Adafactor
    return pkg


def gradient_sequence(shape, steps, seed=0, signal_rank=6):
    """Gradients with a decaying spectrum whose subspace drifts: refreshes see new subspaces."""
    m, n = shape
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(m, signal_rank, generator=gen)
    v = torch.randn(n, signal_rank, generator=gen)
    s = torch.tensor([2.0**-i for i in range(signal_rank)]) * 4
    out = []
    for _ in range(steps):
        u = u + 0.3 * torch.randn(m, signal_rank, generator=gen)
        v = v + 0.3 * torch.randn(n, signal_rank, generator=gen)
        g = (u * s) @ v.T / (m * n) ** 0.5 + 0.01 * torch.randn(m, n, generator=gen)
        out.append(g)
    return out
