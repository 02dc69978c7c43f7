"""Helpers of the galorax.torch tests and benchmark: the galore-torch 1.0 and apollo-torch
1.0.3 reference loaders, synthetic gradients and the small problem (two matrices and a bias)
the optimizer tests share. (A uniquely named module, not conftest: `from conftest import`
breaks as soon as another conftest.py exists higher up.)"""

from __future__ import annotations

import ast
import importlib.util
import inspect
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


def load_apollo_torch() -> types.ModuleType | None:
    """apollo-torch 1.0.3's ``apollo`` module (its ``AdamW`` is ``APOLLOAdamW``), without the
    package __init__.

    apollo-torch's __init__ imports bitsandbytes (its 8-bit GaLore and quantized APOLLO); its
    ``apollo`` module needs only torch, its two projector modules and transformers' version
    checker (stubbed when transformers is missing: ``require_version`` only checks torch>=1.5).
    Install it with ``pip install apollo-torch==1.0.3 --no-deps``.
    """
    spec = importlib.util.find_spec("apollo_torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = list(spec.submodule_search_locations)[0]
    name = "_apollo_torch_ref"
    if name in sys.modules:
        return sys.modules[name].apollo
    pkg = types.ModuleType(name)
    pkg.__path__ = [root]
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
    sys.modules[name] = pkg
    try:
        for sub in ("svd_projector", "random_projector", "apollo"):
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
    return pkg.apollo


def galore_torch_defaults(galore_torch, module: str, cls: str) -> dict[str, object]:
    """Keyword defaults of galore-torch's class, read from its source (its adamw8bit module
    imports bitsandbytes, which the tests do not install)."""
    root = os.path.dirname(inspect.getfile(galore_torch.galore_projector))
    with open(os.path.join(root, f"{module}.py")) as f:
        tree = ast.parse(f.read())
    init = next(
        node
        for c in tree.body
        if isinstance(c, ast.ClassDef) and c.name == cls
        for node in c.body
        if isinstance(node, ast.FunctionDef) and node.name == "__init__"
    )
    names = [a.arg for a in init.args.args][-len(init.args.defaults) :]
    return {n: ast.literal_eval(d) for n, d in zip(names, init.args.defaults, strict=True)}


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


#: The optimizer tests' matrices: m >= n and m < n, both sides of every proj_type.
SHAPES = [(24, 16), (12, 20)]


def make_params(seed=0):
    """Two matrices of SHAPES and a bias of 7, seeded."""
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in SHAPES]
    b = torch.nn.Parameter(torch.randn(7, generator=gen))
    return ws, b


def run_trajectory(opt_factory, steps, grads_fn, seed=0):
    """Trajectory of the params under a fixed gradient sequence (not param-dependent, so both
    implementations see bitwise-identical gradients and refresh on the same matrices)."""
    ws, b = make_params(seed)
    opt = opt_factory(ws, b)
    traj = []
    for t in range(steps):
        gs = grads_fn(t)
        for p, g in zip([*ws, b], gs, strict=True):
            p.grad = g.clone()
        opt.step()
        traj.append([p.detach().clone() for p in [*ws, b]])
    return traj, opt, (ws, b)


def fixed_grads(steps, seed=1):
    """``t -> [g_w0, g_w1, g_b]``: a fixed gradient sequence for make_params' parameters."""
    seqs = [gradient_sequence(s, steps, seed=seed + i) for i, s in enumerate(SHAPES)]
    gen = torch.Generator().manual_seed(seed + 100)
    bias = [torch.randn(7, generator=gen) * 0.1 for _ in range(steps)]
    return lambda t: [seqs[0][t], seqs[1][t], bias[t]]


def train_steps(opt, ws, b, grads, start, stop):
    """Steps ``start .. stop - 1`` of ``opt`` on ``grads(t)``."""
    for t in range(start, stop):
        for p, g in zip([*ws, b], grads(t), strict=True):
            p.grad = g.clone()
        opt.step()
