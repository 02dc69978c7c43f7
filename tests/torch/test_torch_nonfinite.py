"""``skip_nonfinite=True``: a non-finite gradient leaves its parameter, moments and projector."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from galorax.torch import (  # noqa: E402
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    LayerwiseGaLore,
)

NAN, INF = float("nan"), float("inf")


def _params():
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(24, 16, generator=gen))
    b = torch.nn.Parameter(torch.randn(16, generator=gen))
    return w, b


def _grads(t):
    gen = torch.Generator().manual_seed(100 + t)
    return torch.randn(24, 16, generator=gen), torch.randn(16, generator=gen)


def _make(cls, w, b, **kw):
    groups = [{"params": [w], "rank": 4, "update_proj_gap": 3}, {"params": [b]}]
    if cls is GaLoreAdafactor:
        return cls(groups, lr=1e-2, relative_step=False, skip_nonfinite=True, **kw)
    return cls(groups, lr=1e-2, weight_decay=0.1, skip_nonfinite=True, **kw)


def _snapshot(opt, p):
    tensors = {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
    return p.detach().clone(), tensors


def _same(opt, p, snap):
    value, tensors = snap
    assert torch.equal(p.detach(), value)
    for k, v in tensors.items():
        assert torch.equal(opt.state[p][k], v), k


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit, GaLoreAdafactor])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("at", [1, 3])  # a plain step, and a refresh step (gap 3)
def test_nonfinite_gradient_leaves_parameter_and_state(cls, bad, at):
    w, b = _params()
    opt = _make(cls, w, b, stagger=False)
    for t in range(at):
        w.grad, b.grad = _grads(t)
        opt.step()
    before_w, before_b = _snapshot(opt, w), b.detach().clone()
    gw, gb = _grads(at)
    gw[2, 3] = bad
    w.grad, b.grad = gw, gb
    opt.step()
    _same(opt, w, before_w)  # parameter, moments, projector as they were
    assert not torch.equal(b.detach(), before_b)  # the finite parameter stepped
    assert opt.state[w]["step"] == at + 1  # the count advances (as the JAX API's)
    for t in range(at + 1, at + 4):  # and training goes on, finite
        w.grad, b.grad = _grads(t)
        opt.step()
    assert torch.isfinite(w).all() and not torch.equal(w.detach(), before_w[0])


def test_first_step_nonfinite_leaves_parameter_and_zero_moments():
    w, b = _params()
    opt = _make(GaLoreAdamW, w, b)
    w0 = w.detach().clone()
    w.grad, b.grad = torch.full((24, 16), NAN), torch.zeros(16)
    opt.step()
    assert torch.equal(w.detach(), w0)
    st = opt.state[w]
    assert not st["exp_avg"].any() and not st["exp_avg_sq"].any()
    assert st["retry"] == 1  # the placeholder projector is replaced at the next step
    w.grad, b.grad = _grads(1)
    opt.step()
    assert st["retry"] == 0 and torch.isfinite(w).all()


def test_without_the_option_a_nan_reaches_the_weights():
    w, b = _params()
    opt = GaLoreAdamW([{"params": [w], "rank": 4}, {"params": [b]}], lr=1e-2)
    w.grad, b.grad = _grads(0)
    opt.step()
    gw, gb = _grads(1)
    gw[0, 0] = NAN
    w.grad, b.grad = gw, gb
    opt.step()
    assert not torch.isfinite(w).all()


def test_skip_matches_a_run_without_that_step_except_the_count():
    # Skipping changes nothing but the step count: with bias correction off and no weight
    # decay, a run with a skipped step equals the run that never saw that gradient.
    def run(skip_at):
        w, b = _params()
        groups = [{"params": [w], "rank": 4, "update_proj_gap": 100}, {"params": [b]}]
        opt = GaLoreAdamW(groups, lr=1e-2, correct_bias=False, skip_nonfinite=True)
        for t in range(5):
            if t == skip_at:
                w.grad, b.grad = torch.full((24, 16), NAN), torch.full((16,), INF)
                opt.step()
            w.grad, b.grad = _grads(t)
            opt.step()
        return w.detach(), b.detach()

    for x, y in zip(run(None), run(2), strict=True):
        assert torch.equal(x, y)


def test_layerwise_skips_a_nonfinite_parameter():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    mats = [p for p in model.parameters() if p.dim() == 2]
    vecs = [p for p in model.parameters() if p.dim() != 2]
    opt = GaLoreAdamW([{"params": mats, "rank": 2}, {"params": vecs}], lr=1e-2, skip_nonfinite=True)
    lw = LayerwiseGaLore(opt)
    first = model[0].weight
    first.register_hook(lambda g: torch.full_like(g, NAN))  # the first layer's gradient is NaN
    w0, w1 = first.detach().clone(), model[1].weight.detach().clone()
    model(torch.randn(5, 8)).square().mean().backward()
    lw.step()
    assert torch.equal(first.detach(), w0)
    assert not torch.equal(model[1].weight.detach(), w1)
    assert torch.isfinite(model[1].weight).all()
    lw.remove()


def test_skip_nonfinite_is_a_group_key():
    w, b = _params()
    opt = GaLoreAdamW([{"params": [w], "rank": 4, "skip_nonfinite": True}, {"params": [b]}])
    assert [g["skip_nonfinite"] for g in opt.param_groups] == [True, False]


def test_clipping_with_a_nan_skips_the_whole_step_in_both_modes():
    # clip_grad_norm_ turns one NaN into NaN everywhere; the layer-wise clipping does the same.
    def model_opt():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
        mats = [p for p in model.parameters() if p.dim() == 2]
        vecs = [p for p in model.parameters() if p.dim() != 2]
        groups = [{"params": mats, "rank": 2}, {"params": vecs}]
        return model, GaLoreAdamW(groups, lr=1e-2, skip_nonfinite=True)

    x = torch.randn(5, 8)
    plain, opt = model_opt()
    before = [p.detach().clone() for p in plain.parameters()]
    plain(x).square().mean().backward()
    plain[0].weight.grad[0, 0] = NAN
    torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
    opt.step()
    layered, opt2 = model_opt()
    lw = LayerwiseGaLore(opt2, max_grad_norm=1.0)
    layered[0].weight.register_hook(
        lambda g: g.index_put((torch.tensor([0]),) * 2, g.new_tensor(NAN))
    )
    layered(x).square().mean().backward()
    lw.step()
    lw.remove()
    for a, b, c in zip(before, plain.parameters(), layered.parameters(), strict=True):
        assert torch.equal(a, b.detach()) and torch.equal(a, c.detach())
