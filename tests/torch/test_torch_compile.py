"""``torch.compile(opt.step)``: steps between refreshes trace with no graph break.

A refresh step still breaks (the host sync in ``gradient_is_usable`` and, for the randomized
range finder, its CPU ``torch.Generator``); docs/torch.md ("torch.compile") says why.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
dynamo = pytest.importorskip("torch._dynamo")

from galorax.torch import GaLoreAdamW  # noqa: E402


@pytest.mark.parametrize(
    "galore", [{}, {"subspace": "svd", "moments": "keep", "stagger": False, "proj_type": "std"}]
)
def test_steps_between_refreshes_have_no_graph_break(galore):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 32))
    b = torch.nn.Parameter(torch.zeros(32))
    opt = GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 4}, {"params": [b]}], **galore)
    breaks = []
    for _ in range(3):  # step 0 refreshes, steps 1 and 2 do not
        w.grad, b.grad = torch.randn(64, 32), torch.randn(32)
        breaks.append(dynamo.explain(opt.step)().graph_break_count)
    dynamo.reset()
    assert breaks[0] > 0 and breaks[1:] == [0, 0]
    assert opt.state[w]["step"] == 3
