"""Loading galore-torch 1.0 state dicts (galorax.torch.migrate): a galore-torch run continued by
galorax.torch equals galore-torch continuing itself."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from galorax_torch_testlib import fixed_grads, make_params, train_steps  # noqa: E402

from galorax.torch import GaLoreAdafactor, GaLoreAdamW  # noqa: E402

#: galorax's settings that reproduce galore-torch (they are not in galore-torch's state dict).
AS_GALORE_TORCH = dict(subspace="svd", moments="keep", stagger=False)


def _adamw(galore_torch, hp, ours):
    def make(ws, b, **galore):
        groups = [{"params": ws, **galore}, {"params": [b]}]
        if ours:
            return GaLoreAdamW(groups, **hp, **AS_GALORE_TORCH)
        return galore_torch.GaLoreAdamW(groups, no_deprecation_warning=True, **hp)

    return make


def _adafactor(galore_torch, hp, ours):
    def make(ws, b, **galore):
        groups = [{"params": ws, **galore}, {"params": [b]}]
        if ours:
            return GaLoreAdafactor(groups, **hp, **AS_GALORE_TORCH)
        return galore_torch.GaLoreAdafactor(groups, **hp)

    return make


@pytest.mark.parametrize(
    "kind, proj_type",
    [("adamw", "std"), ("adamw", "reverse_std"), ("adamw", "right"), ("adafactor", "std")],
)
def test_galore_torch_run_continued_by_galorax(galore_torch, kind, proj_type):
    steps, gap = 13, 4  # saved after step 6: refreshes before (0, 4) and after (8, 12)
    grads = fixed_grads(steps, seed=11)
    galore = dict(rank=4, update_proj_gap=gap, scale=0.25, proj_type=proj_type)
    if kind == "adamw":
        hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)
        factory = _adamw
    else:
        hp = dict(lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.9)
        factory = _adafactor
    ref_make, ours_make = factory(galore_torch, hp, False), factory(galore_torch, hp, True)

    ws, b = make_params(0)
    ref = ref_make(ws, b, **galore)
    train_steps(ref, ws, b, grads, 0, 6)
    saved = ref.state_dict()
    assert type(saved["state"][0]["projector"]).__name__ == "GaLoreProjector"
    ws2, b2 = make_params(0)
    with torch.no_grad():
        for p, q in zip([*ws2, b2], [*ws, b], strict=True):
            p.copy_(q)
    ours = ours_make(ws2, b2, **galore)
    ours.load_state_dict(saved)
    assert ours.param_groups[1]["rank"] is None  # galore-torch's group without a rank
    assert ours.state[ws2[0]]["projector"].dtype == torch.float32

    train_steps(ref, ws, b, grads, 6, steps)
    train_steps(ours, ws2, b2, grads, 6, steps)
    for x, y in zip([*ws, b], [*ws2, b2], strict=True):
        assert torch.equal(x.detach(), y.detach())


def test_galore_torch_state_is_not_modified_and_8bit_is_refused(galore_torch):
    ws, b = make_params(0)
    ref = galore_torch.GaLoreAdamW(
        [
            {"params": ws, "rank": 2, "update_proj_gap": 5, "scale": 1.0, "proj_type": "std"},
            {"params": [b]},
        ],
        no_deprecation_warning=True,
    )
    train_steps(ref, ws, b, fixed_grads(2), 0, 2)
    saved = ref.state_dict()
    ours = GaLoreAdamW([{"params": ws, "rank": 2}, {"params": [b]}])
    ours.load_state_dict(saved)
    assert type(saved["state"][0]["projector"]).__name__ == "GaLoreProjector"
    assert "subspace" not in saved["param_groups"][0]
    bnb_like = {
        "state": {0: {"step": 1, "state1": torch.zeros(4, dtype=torch.uint8)}},
        "param_groups": saved["param_groups"],
    }
    with pytest.raises(ValueError, match="GaLoreAdamW8bit"):
        ours.load_state_dict(bnb_like)


def test_bf16_galore_torch_state_continues_with_f32_state(galore_torch):
    ws, b = make_params(0)
    with torch.no_grad():
        for p in [*ws, b]:
            p.data = p.data.to(torch.bfloat16)
    groups = [{"params": ws, "rank": 2, "update_proj_gap": 3, "scale": 1.0, "proj_type": "std"}]
    ref = galore_torch.GaLoreAdamW(groups + [{"params": [b]}], no_deprecation_warning=True)
    grads = fixed_grads(8)

    def bf16_grads(t):
        return [g.to(torch.bfloat16) for g in grads(t)]

    train_steps(ref, ws, b, bf16_grads, 0, 4)
    assert ref.state[ws[0]]["exp_avg"].dtype == torch.bfloat16  # galore-torch's bf16 moments
    ours = GaLoreAdamW([{"params": ws, "rank": 2}, {"params": [b]}], **AS_GALORE_TORCH)
    ours.load_state_dict(ref.state_dict())
    for p in [*ws, b]:
        st = ours.state[p]
        assert all(st[k].dtype == torch.float32 for k in ("exp_avg", "exp_avg_sq"))
    train_steps(ours, ws, b, bf16_grads, 4, 8)
    assert all(torch.isfinite(p.detach().float()).all() for p in [*ws, b])
    assert ours.state[ws[0]]["exp_avg"].dtype == torch.float32
