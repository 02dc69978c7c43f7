"""``torch.compile(opt.step, fullgraph=True)``: every step, refreshes included, in one graph.

No host read in the step: the refresh's usability check is a 0-d tensor used by torch.where
(no retry under compile), the randomized sketch is a counter-based hash (no torch.Generator),
and ``skip_nonfinite`` selects with torch.where. The ``aot_eager`` backend keeps the tests
fast (Dynamo's tracing and AOT functionalization, which is where a graph break or a
data-dependent guard fails); inductor runs the same graphs.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
dynamo = pytest.importorskip("torch._dynamo")

from galorax.torch import GaLoreAdamW  # noqa: E402

NAN = float("nan")


def _model_and_optimizer(**galore):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
    mats = [p for p in model.parameters() if p.dim() == 2]
    vecs = [p for p in model.parameters() if p.dim() != 2]
    groups = [{"params": mats, "rank": 4, "update_proj_gap": 3}, {"params": vecs}]
    return model, GaLoreAdamW(groups, lr=1e-2, weight_decay=0.01, **galore)


def _train(model, step, steps, poison=()):
    gen = torch.Generator().manual_seed(1)
    for t in range(steps):
        model.zero_grad()
        model(torch.randn(10, 16, generator=gen)).square().mean().backward()
        if t in poison:
            model[0].weight.grad[1, 2] = NAN
        step()


@pytest.mark.parametrize(
    "galore",
    [
        {"stagger": False},  # galorax's defaults (randomized, rotated moments), one schedule
        {"subspace": "svd", "moments": "keep", "stagger": False, "proj_type": "std"},
    ],
    ids=["defaults", "galore-torch"],
)
def test_fullgraph_step_with_refreshes_matches_eager(galore):
    dynamo.reset()
    model, opt = _model_and_optimizer(**galore)
    twin, twin_opt = _model_and_optimizer(**galore)
    step = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
    _train(model, step, 7)  # refreshes at steps 0, 3 and 6
    _train(twin, twin_opt.step, 7)
    dynamo.reset()
    w = model[0].weight
    assert opt.state[w]["step"] == 7 and opt.state[w]["refreshes"] == 3
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        opt.state[w]["projector"], twin_opt.state[twin[0].weight]["projector"]
    )


def test_fullgraph_skip_nonfinite_on_a_refresh_and_a_plain_step():
    dynamo.reset()
    model, opt = _model_and_optimizer(stagger=False, skip_nonfinite=True)
    step = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
    w = model[0].weight
    _train(model, step, 3)
    kept = w.detach().clone(), opt.state[w]["projector"].clone(), opt.state[w]["exp_avg"].clone()
    _train(model, step, 2, poison=(0, 1))  # step 3 refreshes, step 4 does not: both NaN
    dynamo.reset()
    assert torch.equal(w.detach(), kept[0])
    assert torch.equal(opt.state[w]["projector"], kept[1])  # the refresh kept the old basis
    assert torch.equal(opt.state[w]["exp_avg"], kept[2])
    assert torch.isfinite(model[2].weight).all()
