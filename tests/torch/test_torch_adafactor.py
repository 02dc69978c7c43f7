"""GaLoreAdafactor (galorax.torch.adafactor): differential test against galore-torch 1.0."""

from __future__ import annotations

import inspect

import pytest

torch = pytest.importorskip("torch")

from galorax_torch_testlib import fixed_grads, galore_torch_defaults, run_trajectory  # noqa: E402

from galorax.torch import GaLoreAdafactor  # noqa: E402


def test_adafactor_matches_galore_torch(galore_torch):
    steps, gap = 16, 5
    grads = fixed_grads(steps, seed=3)
    galore = dict(rank=4, update_proj_gap=gap, scale=0.5, proj_type="std")
    hp = dict(lr=1e-2, beta1=0.9, weight_decay=0.01, relative_step=False, scale_parameter=True)

    def ours(ws, b):
        groups = [{"params": ws, **galore}, {"params": [b]}]
        return GaLoreAdafactor(groups, subspace="svd", moments="keep", stagger=False, **hp)

    def ref(ws, b):
        return galore_torch.GaLoreAdafactor([{"params": ws, **galore}, {"params": [b]}], **hp)

    ours_traj, _, _ = run_trajectory(ours, steps, grads)
    ref_traj, _, _ = run_trajectory(ref, steps, grads)
    for t, (a, r) in enumerate(zip(ours_traj, ref_traj, strict=True)):
        for x, y in zip(a, r, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=f"step {t}")


def test_adafactor_signature_is_galore_torch(galore_torch):
    ref = galore_torch_defaults(galore_torch, "adafactor", "Adafactor")
    ours = inspect.signature(GaLoreAdafactor).parameters
    assert list(ours)[1 : 1 + len(ref)] == list(ref)
    assert {n: ours[n].default for n in ref} == ref
