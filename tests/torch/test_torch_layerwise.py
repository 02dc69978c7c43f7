"""Layer-wise mode: equals the plain optimizer under gradient accumulation and clipping."""

from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")

from galorax.torch import GaLoreAdamW, LayerwiseGaLore  # noqa: E402


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 24),
        torch.nn.Tanh(),
        torch.nn.Linear(24, 8),
    )


def _optimizer(model):
    mats = [p for p in model.parameters() if p.dim() == 2]
    vecs = [p for p in model.parameters() if p.dim() != 2]
    return GaLoreAdamW(
        [{"params": mats, "rank": 4, "update_proj_gap": 3}, {"params": vecs}],
        lr=3e-2,
        weight_decay=0.01,
    )


def _batches(steps, accum):
    gen = torch.Generator().manual_seed(1)
    return [
        [
            (torch.randn(10, 16, generator=gen), torch.randn(10, 8, generator=gen))
            for _ in range(accum)
        ]
        for _ in range(steps)
    ]


def _schedule(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.3 * s))


def _plain(batches, max_norm):
    model = _model()
    opt = _optimizer(model)
    sched = _schedule(opt)
    for micro in batches:
        for x, y in micro:
            (torch.nn.functional.mse_loss(model(x), y) / len(micro)).backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt


def _layerwise(batches, max_norm):
    model = _model()
    opt = _optimizer(model)
    lw = LayerwiseGaLore(opt, accumulation_steps=len(batches[0]), max_grad_norm=max_norm)
    sched = _schedule(opt)
    for micro in batches:
        for i, (x, y) in enumerate(micro):
            (torch.nn.functional.mse_loss(model(x), y) / len(micro)).backward()
            if i < len(micro) - 1:  # still accumulating: nothing updated yet
                assert all(p.grad is not None for p in model.parameters())
        lw.step()
        sched.step()
    return model, opt, lw


@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_layerwise_accumulation_and_clipping_equal_plain(max_norm):
    batches = _batches(steps=8, accum=3)  # refreshes at steps 0, 3, 6 (staggered)
    plain, popt = _plain(batches, max_norm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        lw_model, lopt, lw = _layerwise(batches, max_norm)
    for a, b in zip(plain.parameters(), lw_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert b.grad is None  # layer-wise mode drops gradients once used
    if max_norm is not None:
        assert lw.last_grad_norm is not None and lw.last_grad_norm > max_norm  # clipping active
    # One scheduler step per optimizer step.
    assert lopt.param_groups[0]["lr"] == pytest.approx(3e-2 / (1 + 0.3 * 8))
    assert lopt.state[next(lw_model.parameters())]["step"] == 8
    # The checkpoint format is the plain optimizer's.
    sd = lopt.state_dict()
    popt.load_state_dict(copy.deepcopy(sd))
    assert sorted(sd["state"][0]) == sorted(popt.state_dict()["state"][0])


def test_param_missing_from_some_micro_batches_is_flushed_by_step():
    torch.manual_seed(0)
    a = torch.nn.Linear(8, 8)
    b = torch.nn.Linear(8, 8)
    opt = GaLoreAdamW([{"params": [a.weight, b.weight], "rank": 2}, {"params": [a.bias, b.bias]}])
    lw = LayerwiseGaLore(opt, accumulation_steps=2)
    x = torch.randn(4, 8)
    a(x).sum().backward()
    (a(x).sum() + b(x).sum()).backward()  # b only in the last micro-batch
    assert a.weight.grad is None and b.weight.grad is not None
    lw.step()
    assert b.weight.grad is None
    assert opt.state[a.weight]["step"] == opt.state[b.weight]["step"] == 1


def test_remove_restores_plain_training():
    model = torch.nn.Linear(8, 4)
    opt = GaLoreAdamW([{"params": [model.weight], "rank": 2}, {"params": [model.bias]}])
    lw = LayerwiseGaLore(opt)
    lw.remove()
    model(torch.randn(3, 8)).sum().backward()
    assert model.weight.grad is not None  # no hook consumed it
    opt.step()
