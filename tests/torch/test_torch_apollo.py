"""ApolloAdamW / ApolloAdamW8bit (galorax.torch.apollo): the same steps as apollo-torch 1.0.3,
tensors-only state dicts with bit-identical resume, migration from apollo-torch, the
layer-wise mode, ``skip_nonfinite``, the 8-bit moments, the group checks.

apollo-torch is installed without its dependencies (``pip install --no-deps
apollo-torch==1.0.3``, scripts/test.sh) and its ``apollo`` module loaded without the package
__init__, which imports bitsandbytes (``load_apollo_torch``)."""

from __future__ import annotations

import copy
import io
import sys

import pytest

torch = pytest.importorskip("torch")

from galorax_torch_testlib import (  # noqa: E402
    SHAPES,
    fixed_grads,
    make_params,
    run_trajectory,
    train_steps,
)

from galorax.torch import (  # noqa: E402
    ApolloAdamW,
    ApolloAdamW8bit,
    LayerwiseGaLore,
    LayerwiseOptimizer,
    apollo_param_groups,
)
from galorax.torch.apollo import next_seed, random_projection  # noqa: E402

STEPS, GAP = 17, 5  # draws at steps 0, 5, 10, 15
#: apollo-torch's group keys as the Hugging Face Trainer passes them.
APOLLO = dict(rank=4, proj="random", scale_type="channel", update_proj_gap=GAP, scale=1.0)
HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6)


def _factories(apollo_torch, group, ctor):
    """(ours, apollo-torch's) optimizers on make_params' [w0, w1], [b]: the matrices in an
    APOLLO group, the bias plain (no ``rank``: AdamW)."""

    def ours(ws, b):
        return ApolloAdamW([{"params": ws, **group}, {"params": [b]}], **ctor)

    def ref(ws, b):
        return apollo_torch.AdamW([{"params": ws, **group}, {"params": [b]}], **ctor)

    return ours, ref


def _assert_same_trajectories(ours_traj, ref_traj):
    for t, (a, r) in enumerate(zip(ours_traj, ref_traj, strict=True)):
        for i, (x, y) in enumerate(zip(a, r, strict=True)):
            # The very same tensor operations on the same f32 values: equal to the bit.
            assert torch.equal(x, y), f"step {t}, param {i}: {(x - y).abs().max().item():.3g}"


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_matches_apollo_torch(apollo_torch, scale_type, weight_decay):
    # SHAPES: (24, 16) rows >= cols: 'std' projects on the right (moments 24 x 4, one scale per
    # row); (12, 20): on the left (moments 4 x 20, one scale per column).
    group = {**APOLLO, "scale_type": scale_type, "proj_type": "std", "scale": 2.0}
    ctor = {**HP, "weight_decay": weight_decay}
    ours, ref = _factories(apollo_torch, group, ctor)
    grads = fixed_grads(STEPS)
    ours_traj, opt, (ws, _) = run_trajectory(ours, STEPS, grads)
    ref_traj, ref_opt, (ref_ws, _) = run_trajectory(ref, STEPS, grads)
    _assert_same_trajectories(ours_traj, ref_traj)
    for w, rw, (m, n) in zip(ws, ref_ws, SHAPES, strict=True):
        st, rst = opt.state[w], ref_opt.state[rw]
        proj = rst["projector"]
        right = m >= n
        assert st["exp_avg"].shape == ((m, 4) if right else (4, n))
        # The current projection (4 draws) and the next seed are apollo-torch's.
        assert torch.equal(st["projector"], proj.ortho_matrix.T if right else proj.ortho_matrix)
        assert st["seed"] == proj.seed and st["refreshes"] == 4
        for key in ("exp_avg", "exp_avg_sq", "scaled_grad"):
            assert torch.equal(st[key], rst[key]), key


@pytest.mark.parametrize(
    "group,ctor",
    [
        # Per-matrix scale on every side (apollo-torch's channel scale works with 'std' only).
        (dict(proj_type="reverse_std", scale_type="tensor"), {}),
        (dict(proj_type="left", scale_type="tensor"), {}),
        (dict(proj_type="right", scale_type="tensor"), {}),
        # APOLLO-Mini: rank 1, one scale per matrix, the paper's scale.
        (dict(rank=1, scale_type="tensor", scale=128.0, proj_type="std"), {}),
        (dict(proj_type="std", scale=4.0), dict(scale_front=True)),
        (dict(proj_type="std"), dict(disable_nl=True, weight_decay=0.1)),
        (dict(proj_type="std"), dict(correct_bias=False)),
        # The projection drawn again at every step from its seed instead of stored.
        (dict(proj_type="std", store_projection=False), dict(weight_decay=0.05)),
    ],
)
def test_matches_apollo_torch_variants(apollo_torch, group, ctor):
    ours, ref = _factories(apollo_torch, {**APOLLO, **group}, {**HP, **ctor})
    grads = fixed_grads(12)
    ours_traj, _, _ = run_trajectory(ours, 12, grads)
    ref_traj, _, _ = run_trajectory(ref, 12, grads)
    _assert_same_trajectories(ours_traj, ref_traj)


def test_svd_projection_matches_apollo_torch(apollo_torch):
    # proj='svd' is apollo-torch's GaLore projector: galorax's exact SVD (stored n x r, where
    # apollo-torch multiplies by a transposed r x n view: equal to f32 rounding).
    group = {**APOLLO, "proj": "svd", "proj_type": "std"}
    ours, ref = _factories(apollo_torch, group, {**HP, "weight_decay": 0.05})
    grads = fixed_grads(STEPS)
    ours_traj, _, _ = run_trajectory(ours, STEPS, grads)
    ref_traj, _, _ = run_trajectory(ref, STEPS, grads)
    for t, (a, r) in enumerate(zip(ours_traj, ref_traj, strict=True)):
        for x, y in zip(a, r, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=f"step {t}")


def test_channel_scale_on_other_sides_is_per_kept_channel():
    # apollo-torch's channel scale takes norms over the side 'std' keeps whatever the
    # projection, and fails to broadcast otherwise; galorax's is over the rank axis: with a
    # left projection of a 24 x 16 matrix (reverse_std), one factor per column.
    w = torch.nn.Parameter(torch.zeros(SHAPES[0]))
    opt = ApolloAdamW([{"params": [w], **APOLLO, "proj_type": "reverse_std"}], lr=1e-2)
    g = fixed_grads(1)(0)[0]
    w.grad = g.clone()
    opt.step()
    assert opt.state[w]["exp_avg"].shape == (4, 16)
    ratio = w.detach() / g  # -lr * bias correction * factor, per column
    torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-6, atol=0.0)
    assert ratio[0].unique().numel() > 1


def test_random_projection_and_seeds_are_apollo_torchs(apollo_torch):
    rp = sys.modules[apollo_torch.GradientProjector.__module__]  # its random_projector module
    assert next_seed(3) == rp.next_seed(3)
    ref = rp.GradientProjector(4, proj_type="std", seed=7)
    g = torch.randn(10, 6)
    ref.project(g, 0)  # rows >= cols: right, r x n
    assert torch.equal(random_projection((10, 6), 4, "right", 7), ref.ortho_matrix.T)
    ref = rp.GradientProjector(4, proj_type="std", seed=7)
    ref.project(g.T, 0)  # rows < cols: left, m x r
    assert torch.equal(random_projection((6, 10), 4, "left", 7), ref.ortho_matrix)
    assert ref.seed == next_seed(7)


def _is_plain(obj):
    """Tensors, numbers, strings, None and containers of them: what weights_only loads."""
    if isinstance(obj, dict):
        return all(_is_plain(k) and _is_plain(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_is_plain(v) for v in obj)
    return obj is None or isinstance(obj, (torch.Tensor, int, float, str, bool))


@pytest.mark.parametrize(
    "cls,kw",
    [
        (ApolloAdamW, dict(scale_type="channel")),
        (ApolloAdamW, dict(scale_type="tensor", rank=1, scale=128.0)),
        (ApolloAdamW, dict(scale_type="channel", store_projection=False)),
        (ApolloAdamW8bit, dict(scale_type="channel", min_8bit_size=16, block_size=32)),
    ],
)
def test_state_dict_weights_only_and_bit_identical_resume(cls, kw):
    steps, half = 14, 7  # draws at 0, 5, 10: the resumed half draws again
    grads = fixed_grads(steps)
    ctor = {k: v for k, v in kw.items() if k in ("min_8bit_size", "block_size")}
    group = {**APOLLO, **{k: v for k, v in kw.items() if k not in ctor}}

    def make(ws, b):
        return cls(
            [{"params": ws, **group}, {"params": [b]}], **HP, weight_decay=0.05, **ctor
        )

    full_traj, _, _ = run_trajectory(make, steps, grads)

    ws, b = make_params()
    opt = make(ws, b)
    train_steps(opt, ws, b, grads, 0, half)
    sd = opt.state_dict()
    assert _is_plain(sd)
    assert ("projector" in sd["state"][0]) == group.get("store_projection", True)
    if cls is ApolloAdamW8bit:
        assert sd["state"][0]["exp_avg"].dtype == torch.uint8
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    ws2, b2 = make_params(seed=5)  # other values: everything comes from the checkpoint
    with torch.no_grad():
        for p, q in zip([*ws2, b2], [*ws, b], strict=True):
            p.copy_(q)
    opt2 = make(ws2, b2)
    opt2.load_state_dict(loaded)
    train_steps(opt2, ws2, b2, grads, half, steps)
    for p, q in zip([*ws2, b2], full_traj[-1], strict=True):
        assert torch.equal(p.detach(), q)


def test_apollo_torch_state_dict_migrates(apollo_torch):
    # An apollo-torch run continued by galorax after load_state_dict (in memory: its state
    # pickles GradientProjector objects) equals apollo-torch continuing itself, to the bit.
    steps, half = 14, 7
    group = {**APOLLO, "proj_type": "std"}
    ours, ref = _factories(apollo_torch, group, {**HP, "weight_decay": 0.05})
    grads = fixed_grads(steps)
    ref_traj, _, _ = run_trajectory(ref, steps, grads)

    ws, b = make_params()
    ref_opt = ref(ws, b)
    train_steps(ref_opt, ws, b, grads, 0, half)
    ws2, b2 = make_params(seed=5)
    with torch.no_grad():
        for p, q in zip([*ws2, b2], [*ws, b], strict=True):
            p.copy_(q)
    opt = ours(ws2, b2)
    opt.load_state_dict(ref_opt.state_dict())
    assert _is_plain(opt.state_dict())
    train_steps(opt, ws2, b2, grads, half, steps)
    for p, q in zip([*ws2, b2], ref_traj[-1], strict=True):
        assert torch.equal(p.detach(), q)


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
    return ApolloAdamW(
        [{"params": mats, **APOLLO, "update_proj_gap": 3}, {"params": vecs}],
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


@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_layerwise_equals_plain(max_norm):
    batches = _batches(steps=7, accum=2)
    plain = _model()
    popt = _optimizer(plain)
    for micro in batches:
        for x, y in micro:
            (torch.nn.functional.mse_loss(plain(x), y) / len(micro)).backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(plain.parameters(), max_norm)
        popt.step()
        popt.zero_grad()

    model = _model()
    lw = LayerwiseGaLore(_optimizer(model), accumulation_steps=2, max_grad_norm=max_norm)
    assert lw.accumulate == "full"  # APOLLO scales the full gradient: no low-rank sums
    for micro in batches:
        for x, y in micro:
            (torch.nn.functional.mse_loss(model(x), y) / len(micro)).backward()
        lw.step()
    for a, b in zip(plain.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert b.grad is None
    if max_norm is not None:
        assert lw.last_grad_norm is not None and lw.last_grad_norm > max_norm
    with pytest.raises(ValueError, match="full gradient"):
        LayerwiseGaLore(_optimizer(_model()), accumulation_steps=2, accumulate="low_rank")


def test_layerwise_optimizer_and_trainer_groups():
    # The Trainer helper: the Trainer's APOLLO groups (plain first), its default keys.
    model = _model()
    plain, group = apollo_param_groups(model, "all-linear", rank=4, update_proj_gap=3)
    assert {k: v for k, v in group.items() if k != "params"} == dict(
        rank=4, proj="random", scale_type="channel", update_proj_gap=3, scale=1.0, proj_type="std"
    )
    assert [p.dim() for p in group["params"]] == [2, 2, 2]
    assert [p.dim() for p in plain["params"]] == [1, 1, 1]
    inner = ApolloAdamW([plain, group], lr=1e-2)
    opt = LayerwiseOptimizer(inner)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    for x, y in _batches(steps=2, accum=1)[0] * 2:
        torch.nn.functional.mse_loss(model(x), y).backward()  # updates inside the backward
        opt.step()
        sched.step()
        opt.zero_grad()
    assert inner.state[group["params"][0]]["step"] == 2
    assert inner.param_groups[0]["lr"] == pytest.approx(5e-3)


def test_skip_nonfinite_leaves_parameter_and_state():
    ws, b = make_params()
    w = ws[0]
    opt = ApolloAdamW([{"params": [w], **APOLLO, "skip_nonfinite": True}], lr=1e-2)
    g = fixed_grads(4)
    w.grad = torch.full_like(w, float("nan"))  # the very first step: nothing to keep but zeros
    opt.step()
    assert torch.equal(w.detach(), ws[0].detach()) and float(opt.state[w]["scaled_grad"]) == 0.0
    for t in range(3):
        w.grad = g(t)[0].clone()
        opt.step()
    before = w.detach().clone()
    state = {k: v.clone() for k, v in opt.state[w].items() if torch.is_tensor(v)}
    w.grad = g(3)[0].clone()
    w.grad[0, 0] = float("inf")
    opt.step()
    assert torch.equal(w.detach(), before)
    for key, value in state.items():
        assert torch.equal(opt.state[w][key], value), key
    assert opt.state[w]["step"] == 5


def test_zero_first_gradient_does_not_hold_the_limiter(apollo_torch):
    # apollo-torch stores a zero first norm and then limits every update to about
    # 1e-8 * 1.01^t; galorax reads a last norm of 0 as "none yet" (the JAX API's rule).
    moved = {}
    for name, cls in (("ours", ApolloAdamW), ("apollo-torch", apollo_torch.AdamW)):
        w = torch.nn.Parameter(torch.zeros(SHAPES[0]))
        opt = cls([{"params": [w], **APOLLO, "proj_type": "std"}], lr=1e-2)
        w.grad = torch.zeros_like(w)
        opt.step()
        w.grad = fixed_grads(1)(0)[0].clone()
        opt.step()
        moved[name] = float(w.detach().norm())
    assert moved["ours"] > 1e-3 and moved["apollo-torch"] < 1e-7, moved


def test_8bit_follows_f32():
    grads = fixed_grads(12)

    def make(cls, **kw):
        return lambda ws, b: cls([{"params": ws, **APOLLO}, {"params": [b]}], **HP, **kw)

    f32, _, _ = run_trajectory(make(ApolloAdamW), 12, grads)
    q8_make = make(ApolloAdamW8bit, min_8bit_size=16, block_size=32)
    q8, opt, (ws, _) = run_trajectory(q8_make, 12, grads)
    assert opt.state[ws[0]]["exp_avg_sq"].dtype == torch.uint8
    ws0, b0 = make_params()
    for a, b, start in zip(f32[-1], q8[-1], [*ws0, b0], strict=True):
        # The 8-bit moments move the per-channel scales a little, not the direction.
        moved = (a - start.detach()).abs().max()
        assert (a - b).abs().max() < 0.05 * moved, float((a - b).abs().max() / moved)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(proj="gaussian"), "proj must be"),
        (dict(scale_type="row"), "scale_type must be"),
        (dict(moments="rotate"), "moments='rotate' needs"),
        (dict(growth=0.0), "growth must be"),
        (dict(scale=-1.0), "scale must be"),
        (dict(rank=0), "rank must be"),
        (dict(proj="svd", store_projection=False), "store_projection=False needs"),
    ],
)
def test_bad_group_keys_are_named(kw, match):
    w = torch.nn.Parameter(torch.zeros(6, 4))
    with pytest.raises(ValueError, match=match):
        ApolloAdamW([{"params": [w], **APOLLO, **kw}])


def test_unknown_keyword_and_plain_groups():
    w = torch.nn.Parameter(torch.zeros(6, 4))
    with pytest.raises(TypeError, match="scale_typ"):
        ApolloAdamW([w], scale_typ="tensor")
    # Without a rank no key is checked (apollo-torch's plain groups carry none).
    opt = ApolloAdamW([{"params": [w], "proj": "whatever"}])
    w.grad = torch.ones(6, 4)
    opt.step()
    assert opt.state[w]["exp_avg"].shape == (6, 4)
    assert copy.deepcopy(opt.state_dict())["param_groups"][0]["rank"] is None
