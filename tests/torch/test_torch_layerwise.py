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


def _optimizer(model, stagger=True):
    mats = [p for p in model.parameters() if p.dim() == 2]
    vecs = [p for p in model.parameters() if p.dim() != 2]
    return GaLoreAdamW(
        [{"params": mats, "rank": 4, "update_proj_gap": 3, "stagger": stagger}, {"params": vecs}],
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


def _plain(batches, max_norm, stagger=True):
    model = _model()
    opt = _optimizer(model, stagger)
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


def _layerwise(batches, max_norm, accumulate="auto", stagger=True):
    model = _model()
    opt = _optimizer(model, stagger)
    lw = LayerwiseGaLore(
        opt, accumulation_steps=len(batches[0]), max_grad_norm=max_norm, accumulate=accumulate
    )
    sched = _schedule(opt)
    for micro in batches:
        full = {id(p) for p in model.parameters() if lw.accumulate == "full" or p.dim() != 2}
        full |= {id(p) for g in opt.param_groups for p in g["params"] if opt.refresh_due(p, g)}
        for i, (x, y) in enumerate(micro):
            (torch.nn.functional.mse_loss(model(x), y) / len(micro)).backward()
            if i < len(micro) - 1:  # still accumulating: full only where needed
                assert all((p.grad is not None) == (id(p) in full) for p in model.parameters())
        lw.step()
        sched.step()
    return model, opt, lw


@pytest.mark.parametrize(
    "max_norm,accumulate,stagger",
    [
        (None, "auto", True),  # low-rank accumulation, staggered refreshes
        (None, "auto", False),  # low-rank accumulation, every matrix refreshing together
        (None, "full", True),
        (0.05, "auto", True),  # clipping: full accumulation, exact norm
    ],
)
def test_layerwise_accumulation_and_clipping_equal_plain(max_norm, accumulate, stagger):
    batches = _batches(steps=8, accum=3)  # refreshes at steps 0, 3, 6 (staggered or not)
    plain, popt = _plain(batches, max_norm, stagger)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        lw_model, lopt, lw = _layerwise(batches, max_norm, accumulate, stagger)
    for a, b in zip(plain.parameters(), lw_model.parameters(), strict=True):
        # Clipping: plain scales the full gradient then projects, layer-wise projects then
        # scales; the f32 rounding differs, and Adam's division by sqrt(v) + eps amplifies it
        # where v is tiny (side 'std': up to 2.4e-6 here, 1e-4 of one lr-sized step).
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 if max_norm else 1e-6)
        assert b.grad is None  # layer-wise mode drops gradients once used
    for a, b in zip(plain.parameters(), lw_model.parameters(), strict=True):
        ma, mb = popt.state[a]["exp_avg"], lopt.state[b]["exp_avg"]
        torch.testing.assert_close(ma, mb, rtol=1e-5, atol=1e-7)
    if max_norm is not None:
        assert lw.last_grad_norm is not None and lw.last_grad_norm > max_norm  # clipping active
    # One scheduler step per optimizer step.
    assert lopt.param_groups[0]["lr"] == pytest.approx(3e-2 / (1 + 0.3 * 8))
    assert lopt.state[next(lw_model.parameters())]["step"] == 8
    # The checkpoint format is the plain optimizer's.
    sd = lopt.state_dict()
    popt.load_state_dict(copy.deepcopy(sd))
    assert sorted(sd["state"][0]) == sorted(popt.state_dict()["state"][0])


def test_low_rank_accumulation_with_clipping_uses_the_projected_norm():
    batches = _batches(steps=4, accum=3)
    plain, _ = _plain(batches, None)  # max_norm too large to clip: the plain run unclipped
    lw_model, _, lw = _layerwise(batches, 1e9, accumulate="low_rank")
    for a, b in zip(plain.parameters(), lw_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Step 3 refreshes one matrix only: the others count by their projected norm, which is
    # below the full gradient's norm.
    model = copy.deepcopy(lw_model)
    for x, y in batches[-1]:
        (torch.nn.functional.mse_loss(model(x), y) / 3).backward()
    full = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
    assert lw.last_grad_norm is not None and 0 < lw.last_grad_norm < float(full)


def _peak_gradient_bytes(layerwise, steps=3, accum=4):
    """Peak bytes of live p.grad (+ low-rank accumulators) over backward passes, per step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    peak = [0]
    lw = None

    def measure(_p):  # registered first: runs before the layer-wise hook frees p.grad
        held = sum(
            q.grad.numel() * q.grad.element_size() for q in model.parameters() if q.grad is not None
        )
        peak[0] = max(peak[0], held if lw is None else lw.gradient_bytes())

    for q in model.parameters():
        q.register_post_accumulate_grad_hook(measure)
    mats = [q for q in model.parameters() if q.dim() == 2]
    vecs = [q for q in model.parameters() if q.dim() != 2]
    opt = GaLoreAdamW([{"params": mats, "rank": 8, "update_proj_gap": 8}, {"params": vecs}])
    lw = LayerwiseGaLore(opt, accumulation_steps=accum) if layerwise else None
    peaks = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        peak[0] = 0
        for _ in range(accum):
            model(torch.randn(16, 256, generator=gen)).square().mean().backward()
        if lw is not None:
            lw.step()
        else:
            opt.step()
            opt.zero_grad()
        peaks.append(peak[0])
    return peaks


def test_low_rank_accumulation_saves_gradient_memory():
    plain = _peak_gradient_bytes(layerwise=False)
    layer = _peak_gradient_bytes(layerwise=True)
    full = 4 * (256 * 256 + 256) * 4
    assert plain == [full] * 3
    # Step 0: every matrix refreshes, so every full gradient is accumulated. Step 1 (no
    # refresh, stagger slots 0, 2, 4, 6 of gap 8): one matrix's gradient in flight, the others
    # 8 x 256 in f32; step 2: matrix 1 refreshes and keeps its full gradient as well.
    low = 8 * 256 * 4
    assert layer[0] == full
    assert layer[1] <= 256 * 256 * 4 + 4 * low + 4 * 256 * 4 < full / 3
    assert layer[2] <= 2 * 256 * 256 * 4 + 4 * low + 4 * 256 * 4 < full * 0.55
    print("peak gradient bytes: plain", plain, "layer-wise", layer)


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
