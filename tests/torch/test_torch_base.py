"""The shared GaLore machinery (galorax.torch.base), through every optimizer: which parameters
are projected, bit-identical resume from a weights_only state dict, guards, moments across
refreshes, stagger and seeding."""

from __future__ import annotations

import io

import pytest

torch = pytest.importorskip("torch")

from galorax_torch_testlib import fixed_grads, make_params, train_steps  # noqa: E402

from galorax.torch import GaLoreAdafactor, GaLoreAdamW  # noqa: E402


def test_rank_clamped_and_non_matrices_full_rank():
    w = torch.nn.Parameter(torch.randn(6, 3))
    conv = torch.nn.Parameter(torch.randn(4, 2, 3, 3))
    opt = GaLoreAdamW([w, conv], rank=128)
    w.grad, conv.grad = torch.randn(6, 3), torch.randn(4, 2, 3, 3)
    opt.step()
    assert opt.state[w]["projector"].shape == (3, 3)  # side 'std': right, n x min(r, m, n)
    assert opt.state[conv]["exp_avg"].shape == conv.shape


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdafactor, "8bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_weights_only_bit_identical_resume(cls, dtype):
    n_steps, gap = 7, 3
    grads = fixed_grads(2 * n_steps, seed=7)
    kw = (
        dict(rank=4, update_proj_gap=gap, moments="rotate", beta1=0.9)
        if cls is GaLoreAdafactor
        else dict(rank=4, update_proj_gap=gap, moments="rotate", weight_decay=0.1)
    )
    if cls is GaLoreAdafactor:
        kw.update(lr=1e-2, relative_step=False)
    if cls == "8bit":
        from galorax.torch import GaLoreAdamW8bit

        cls = GaLoreAdamW8bit
        kw.update(min_8bit_size=16, block_size=32)  # quantize even these small moments

    def make():
        ws, b = make_params(0)
        with torch.no_grad():
            for p in [*ws, b]:
                p.data = p.data.to(dtype)
        return ws, b

    def grads_t(t):
        return [g.to(dtype) for g in grads(t)]

    # 2N steps straight.
    ws, b = make()
    opt = cls([{"params": ws}, {"params": [b], "rank": None}], **kw)
    train_steps(opt, ws, b, grads_t, 0, 2 * n_steps)
    straight = [p.detach().clone() for p in [*ws, b]]

    # N steps, save through bytes with weights_only=True, fresh objects, N more.
    ws, b = make()
    opt = cls([{"params": ws}, {"params": [b], "rank": None}], **kw)
    train_steps(opt, ws, b, grads_t, 0, n_steps)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in [*ws, b]]}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    ws2, b2 = make()
    with torch.no_grad():
        for p, saved in zip([*ws2, b2], ckpt["params"], strict=True):
            p.copy_(saved)
    opt2 = cls([{"params": ws2}, {"params": [b2], "rank": None}], **kw)
    opt2.load_state_dict(ckpt["opt"])
    key = "exp_avg" if cls is GaLoreAdafactor else "exp_avg_sq"
    expected = torch.float32 if cls in (GaLoreAdamW, GaLoreAdafactor) else torch.uint8
    assert opt2.state[ws2[0]][key].dtype == expected
    train_steps(opt2, ws2, b2, grads_t, n_steps, 2 * n_steps)
    for x, y in zip(straight, [*ws2, b2], strict=True):
        assert torch.equal(x, y.detach())


def test_guard_nonfinite_and_zero_gradients():
    w = torch.nn.Parameter(torch.randn(12, 6))
    opt = GaLoreAdamW([w], rank=3, update_proj_gap=2, stagger=False, lr=1e-2)
    # First step with a zero gradient: still a valid orthonormal projector, retried next step.
    w.grad = torch.zeros(12, 6)
    opt.step()
    p0 = opt.state[w]["projector"]
    torch.testing.assert_close(p0.T @ p0, torch.eye(3))
    assert opt.state[w]["retry"] == 1 and opt.state[w]["refreshes"] == 0
    w.grad = torch.randn(12, 6)
    opt.step()
    assert opt.state[w]["retry"] == 0 and opt.state[w]["refreshes"] == 1
    good = opt.state[w]["projector"].clone()
    # A NaN gradient at a refresh step keeps the old projector (the update itself is the
    # caller's business: here the moments get NaN, as with any optimizer).
    w.grad = torch.randn(12, 6)
    opt.step()  # step 2: a refresh
    good = opt.state[w]["projector"].clone()
    opt.step()  # step 3: no refresh
    bad = torch.randn(12, 6)
    bad[0, 0] = float("nan")
    w.grad = bad
    opt.step()  # step 4: refresh due, gradient unusable
    assert torch.equal(opt.state[w]["projector"], good)
    assert torch.isfinite(opt.state[w]["projector"]).all()
    assert opt.state[w]["retry"] == 1


@pytest.mark.parametrize("moments", ["align", "rotate"])
def test_moments_follow_subspace(moments):
    """A refresh on the same gradient subspace must not scramble the update: the update right
    after a refresh stays aligned with the one before it."""
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 4))
    v, _ = torch.linalg.qr(torch.randn(20, 4))

    def run(mom):
        w = torch.nn.Parameter(torch.zeros(40, 20))
        opt = GaLoreAdamW(
            [w], rank=4, update_proj_gap=5, moments=mom, stagger=False, lr=1.0, subspace="svd"
        )
        gen = torch.Generator().manual_seed(1)
        cos = []
        prev = None
        for t in range(30):
            s = torch.rand(4, generator=gen) + torch.tensor([4.0, 3.0, 2.0, 1.0])
            w.grad = (u * s) @ v.T
            before = w.detach().clone()
            opt.step()
            step = w.detach() - before
            if prev is not None and t % 5 == 0:
                cos.append(
                    float(
                        torch.nn.functional.cosine_similarity(step.flatten(), prev.flatten(), dim=0)
                    )
                )
            prev = step
        return min(cos)

    assert run(moments) > 0.95


def test_stagger_spreads_refreshes():
    ws = [torch.nn.Parameter(torch.randn(16, 8)) for _ in range(4)]
    opt = GaLoreAdamW(ws, rank=2, update_proj_gap=8, stagger=True)
    counts = []
    for _ in range(17):
        before = [opt.state[w].get("refreshes", 0) for w in ws]
        for w in ws:
            w.grad = torch.randn(16, 8)
        opt.step()
        counts.append(sum(opt.state[w]["refreshes"] - r for w, r in zip(ws, before, strict=True)))
    assert counts[0] == 4  # everyone at step 0
    assert counts[1:9] == [0, 1, 0, 1, 0, 1, 0, 1]  # offsets 0, 2, 4, 6 -> steps 2, 4, 6, 8
    assert max(counts[1:]) == 1


def test_deterministic_seeding():
    def run(seed):
        w = torch.nn.Parameter(torch.zeros(32, 16))
        opt = GaLoreAdamW([w], rank=4, seed=seed)
        w.grad = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
        opt.step()
        return opt.state[w]["projector"]

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def _refresh_steps(opt, ws, steps, start=0):
    """``{param index: [steps at which it refreshed]}`` over ``steps`` steps of random gradients."""
    seen: dict[int, list[int]] = {i: [] for i in range(len(ws))}
    gen = torch.Generator().manual_seed(3)
    for t in range(start, start + steps):
        before = [opt.state[w].get("refreshes", 0) for w in ws]
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        for i, w in enumerate(ws):
            if opt.state[w]["refreshes"] > before[i]:
                seen[i].append(t)
    return seen


def test_add_param_group_keeps_existing_refresh_slots():
    """Adding a group mid-training leaves the old parameters' staggered refreshes where they
    were, also across a save/load; the new ones refresh at their first step."""
    torch.manual_seed(0)
    init = [torch.randn(16, 8) for _ in range(8)]

    def params(which):
        return [torch.nn.Parameter(init[i].clone()) for i in which]

    def make(ws):
        return GaLoreAdamW(ws, rank=2, update_proj_gap=8, stagger=True)

    ws = params(range(4))
    expected = _refresh_steps(make(ws), ws, 20)
    assert expected[1] == [0, 2, 10, 18]  # offsets 0, 2, 4, 6 over the gap of 8

    ws, new = params(range(4)), params(range(4, 8))
    opt = make(ws)
    first = _refresh_steps(opt, ws, 3)
    opt.add_param_group({"params": new})
    ws2, new2 = params(range(4)), params(range(4, 8))
    fresh = make(ws2)
    fresh.add_param_group({"params": new2})
    fresh.load_state_dict(opt.state_dict())

    later = _refresh_steps(opt, ws, 17, start=3)
    assert {i: first[i] + later[i] for i in first} == expected
    resumed = _refresh_steps(fresh, ws2, 17, start=3)
    assert resumed == {i: [t for t in expected[i] if t >= 3] for i in expected}
    assert all(opt.state[p]["refreshes"] >= 1 for p in new)  # refreshed at their first step


def _stepped(shapes, rank=2):
    ps = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    opt = GaLoreAdamW(ps, rank=rank, update_proj_gap=2)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    return ps, opt


@pytest.mark.parametrize(
    "saved_shapes, shapes, match",
    [
        ([(8, 4), (4,)], [(8, 4)], r"state dict has 2 param groups|holds 2 parameters"),
        ([(8, 4), (4,)], [(8, 4), (4,), (3,)], r"param_groups\[0\] holds 2 parameters .* 3 here"),
        ([(8, 4), (4,)], [(8, 4), (5,)], r"param_groups\[0\]\['params'\]\[1\] has shape \(5,\)"),
        ([(8, 4), (4,)], [(4,), (8, 4)], r"param_groups\[0\]\['params'\]\[0\] has shape \(4,\)"),
        ([(8, 4)], [(16, 12)], r"param_groups\[0\]\['params'\]\[0\] has shape \(16, 12\)"),
    ],
    ids=["fewer-params", "more-params", "vector-size", "order-swapped", "matrix-size"],
)
def test_load_state_dict_names_a_mismatched_group_or_parameter(saved_shapes, shapes, match):
    _, saved = _stepped(saved_shapes)
    _, opt = _stepped(shapes)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(saved.state_dict())


def test_load_state_dict_names_a_missing_group():
    _, saved = _stepped([(8, 4)])
    ps = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]
    opt = GaLoreAdamW([{"params": ps[:1], "rank": 2}, {"params": ps[1:]}])
    with pytest.raises(ValueError, match=r"state dict has 1 param groups, this optimizer 2"):
        opt.load_state_dict(saved.state_dict())
    with pytest.raises(ValueError, match=r"not an optimizer state dict"):
        opt.load_state_dict({"state": {}})
