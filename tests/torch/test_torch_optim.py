"""GaLoreAdamW / GaLoreAdafactor: differential tests against galore-torch 1.0 and the JAX API,
state dicts, dtypes and guards."""

from __future__ import annotations

import copy
import io
import warnings

import pytest

torch = pytest.importorskip("torch")

from galorax_torch_testlib import gradient_sequence  # noqa: E402

from galorax.torch import GaLoreAdafactor, GaLoreAdamW  # noqa: E402

SHAPES = [(24, 16), (12, 20)]  # m >= n and m < n: both sides of every proj_type


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in SHAPES]
    b = torch.nn.Parameter(torch.randn(7, generator=gen))
    return ws, b


def _run(opt_factory, steps, grads_fn, seed=0):
    """Trajectory of the params under a fixed gradient sequence (not param-dependent, so both
    implementations see bitwise-identical gradients and refresh on the same matrices)."""
    ws, b = _params(seed)
    opt = opt_factory(ws, b)
    traj = []
    for t in range(steps):
        gs = grads_fn(t)
        for p, g in zip([*ws, b], gs, strict=True):
            p.grad = g.clone()
        opt.step()
        traj.append([p.detach().clone() for p in [*ws, b]])
    return traj, opt, (ws, b)


def _grads(steps, seed=1):
    seqs = [gradient_sequence(s, steps, seed=seed + i) for i, s in enumerate(SHAPES)]
    gen = torch.Generator().manual_seed(seed + 100)
    bias = [torch.randn(7, generator=gen) * 0.1 for _ in range(steps)]
    return lambda t: [seqs[0][t], seqs[1][t], bias[t]]


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_adamw_matches_galore_torch(galore_torch, proj_type):
    steps, gap = 22, 5  # refreshes at 0, 5, 10, 15, 20
    grads = _grads(steps)
    galore = dict(rank=4, update_proj_gap=gap, scale=0.25, proj_type=proj_type)
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)

    def ours(ws, b):
        return GaLoreAdamW(
            [{"params": ws, **galore}, {"params": [b]}],
            subspace="svd",
            moments="keep",
            stagger=False,
            **hp,
        )

    def ref(ws, b):
        return galore_torch.GaLoreAdamW(
            [{"params": ws, **galore}, {"params": [b]}], no_deprecation_warning=True, **hp
        )

    ours_traj, opt, _ = _run(ours, steps, grads)
    ref_traj, _, _ = _run(ref, steps, grads)
    for t, (a, r) in enumerate(zip(ours_traj, ref_traj, strict=True)):
        for x, y in zip(a, r, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=f"step {t}")
    # Same state shapes as galore-torch's convention.
    for w, (m, n) in zip(opt.param_groups[0]["params"], SHAPES, strict=True):
        right = {"std": m >= n, "reverse_std": m < n, "left": False, "right": True}[proj_type]
        assert opt.state[w]["exp_avg"].shape == ((m, 4) if right else (4, n))


def test_adafactor_matches_galore_torch(galore_torch):
    steps, gap = 16, 5
    grads = _grads(steps, seed=3)
    galore = dict(rank=4, update_proj_gap=gap, scale=0.5, proj_type="std")
    hp = dict(lr=1e-2, beta1=0.9, weight_decay=0.01, relative_step=False, scale_parameter=True)

    def ours(ws, b):
        groups = [{"params": ws, **galore}, {"params": [b]}]
        return GaLoreAdafactor(groups, subspace="svd", moments="keep", stagger=False, **hp)

    def ref(ws, b):
        return galore_torch.GaLoreAdafactor([{"params": ws, **galore}, {"params": [b]}], **hp)

    ours_traj, _, _ = _run(ours, steps, grads)
    ref_traj, _, _ = _run(ref, steps, grads)
    for t, (a, r) in enumerate(zip(ours_traj, ref_traj, strict=True)):
        for x, y in zip(a, r, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=f"step {t}")


@pytest.mark.parametrize("moments", ["keep", "align", "rotate"])
def test_adamw_matches_jax(moments):
    """Same configuration, same gradients: the torch and JAX trajectories agree.

    torch.linalg.svd and jnp.linalg.svd return different column signs for the same matrix.
    Signs are harmless within a gap (Adam is sign-equivariant per coordinate), and 'align' /
    'rotate' make them harmless across refreshes too; with 'keep' (galore-torch's behaviour)
    moments carried into a new basis depend on the library's sign choice, so the two agree
    only until the second refresh: that is the defect 'align' fixes.
    """
    galorax = pytest.importorskip("galorax")
    if not hasattr(galorax, "galore"):
        pytest.skip("galorax.galore (the JAX implementation) is not available yet")
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import numpy as np

    gap, lr = 5, 1e-2
    steps = gap if moments == "keep" else 16
    grads = _grads(steps, seed=5)
    for proj_type, jside in [("std", "std"), ("reverse_std", "auto")]:
        # eps -> 0 on both sides: galore-torch adds eps to sqrt(v), optax to sqrt(v_hat);
        # with eps tiny both are Adam exactly. No weight decay (applied at different times).
        ours_traj, _, _ = _run(
            lambda ws, b, pt=proj_type: GaLoreAdamW(
                [
                    {"params": ws, "rank": 4, "update_proj_gap": gap, "proj_type": pt},
                    {"params": [b]},
                ],
                lr=lr,
                eps=1e-12,
                subspace="svd",
                moments=moments,
                stagger=False,
            ),
            steps,
            grads,
        )
        ws, b = _params(0)
        params = {
            "w0": ws[0].detach().numpy(),
            "w1": ws[1].detach().numpy(),
            "b": b.detach().numpy(),
        }
        params = jax.tree.map(jax.numpy.asarray, params)
        tx = galorax.galore(
            lr,
            rank=4,
            update_proj_gap=gap,
            base_optimizer=optax.scale_by_adam(eps=1e-12),
            subspace="svd",
            moments=moments,
            side=jside,
            stagger=False,
        )
        state = tx.init(params)
        update = jax.jit(tx.update)
        for t in range(steps):
            g = grads(t)
            gj = {"w0": g[0].numpy(), "w1": g[1].numpy(), "b": g[2].numpy()}
            upd, state = update(jax.tree.map(jax.numpy.asarray, gj), state, params)
            params = optax.apply_updates(params, upd)
            for name, ours in zip(["w0", "w1", "b"], ours_traj[t], strict=True):
                np.testing.assert_allclose(
                    np.asarray(params[name]),
                    ours.numpy(),
                    rtol=1e-4,
                    atol=1e-5,
                    err_msg=f"{proj_type} step {t} {name}",
                )


def test_defaults_and_group_keys():
    w = torch.nn.Parameter(torch.randn(30, 10))
    b = torch.nn.Parameter(torch.randn(10))
    opt = GaLoreAdamW([{"params": [w], "rank": 4}, {"params": [b]}])
    g = opt.param_groups[0]
    assert (g["update_proj_gap"], g["scale"], g["subspace"], g["moments"]) == (
        200,
        1.0,
        "randomized",
        "rotate",
    )
    assert opt.param_groups[1]["rank"] is None  # no rank: full-rank AdamW
    w.grad, b.grad = torch.randn(30, 10), torch.randn(10)
    opt.step()
    # side='auto': least state, m >= n -> left projector (m x r), moments r x n.
    assert opt.state[w]["projector"].shape == (30, 4)
    assert opt.state[w]["exp_avg"].shape == (4, 10)
    assert "projector" not in opt.state[b]
    with pytest.raises(ValueError):
        GaLoreAdamW([{"params": [w], "rank": 4, "proj_type": "full"}])
    with pytest.raises(ValueError):
        GaLoreAdamW([{"params": [w], "rank": 4, "moments": "spin"}])
    with pytest.raises(TypeError):
        GaLoreAdamW([w], rnak=4)


def test_accepts_jax_randomized_settings():
    galorax = pytest.importorskip("galorax")
    if not hasattr(galorax, "Randomized"):
        pytest.skip("galorax.Randomized (the JAX API's settings object) is not available")
    w = torch.nn.Parameter(torch.randn(30, 10))
    settings = galorax.Randomized(power_iters=2, oversample=4, warm_start=False, seed=3)
    opt = GaLoreAdamW([{"params": [w], "rank": 4, "subspace": settings}])
    g = opt.param_groups[0]
    assert (g["subspace"], g["power_iters"], g["oversample"], g["warm_start"], g["seed"]) == (
        "randomized",
        2,
        4,
        False,
        3,
    )
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)  # plain values only


def test_rank_clamped_and_non_matrices_full_rank():
    w = torch.nn.Parameter(torch.randn(6, 3))
    conv = torch.nn.Parameter(torch.randn(4, 2, 3, 3))
    opt = GaLoreAdamW([w, conv], rank=128)
    w.grad, conv.grad = torch.randn(6, 3), torch.randn(4, 2, 3, 3)
    opt.step()
    assert opt.state[w]["projector"].shape == (6, 3)
    assert opt.state[conv]["exp_avg"].shape == conv.shape


def _train(opt, ws, b, grads, start, stop):
    for t in range(start, stop):
        for p, g in zip([*ws, b], grads(t), strict=True):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdafactor, "8bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_weights_only_bit_identical_resume(cls, dtype):
    n_steps, gap = 7, 3
    grads = _grads(2 * n_steps, seed=7)
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
        ws, b = _params(0)
        with torch.no_grad():
            for p in [*ws, b]:
                p.data = p.data.to(dtype)
        return ws, b

    def grads_t(t):
        return [g.to(dtype) for g in grads(t)]

    # 2N steps straight.
    ws, b = make()
    opt = cls([{"params": ws}, {"params": [b], "rank": None}], **kw)
    _train(opt, ws, b, grads_t, 0, 2 * n_steps)
    straight = [p.detach().clone() for p in [*ws, b]]

    # N steps, save through bytes with weights_only=True, fresh objects, N more.
    ws, b = make()
    opt = cls([{"params": ws}, {"params": [b], "rank": None}], **kw)
    _train(opt, ws, b, grads_t, 0, n_steps)
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
    _train(opt2, ws2, b2, grads_t, n_steps, 2 * n_steps)
    for x, y in zip(straight, [*ws2, b2], strict=True):
        assert torch.equal(x, y.detach())


def test_bf16_params_keep_f32_state():
    w = torch.nn.Parameter(torch.randn(16, 8, dtype=torch.bfloat16))
    opt = GaLoreAdamW([w], rank=2, lr=1e-2)
    for _ in range(3):
        w.grad = torch.randn(16, 8, dtype=torch.bfloat16)
        opt.step()
    st = opt.state[w]
    assert st["projector"].dtype == st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32
    assert w.dtype == torch.bfloat16


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


def test_galore_torch_style_usage_warns_nothing():
    model = torch.nn.Linear(8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = GaLoreAdamW(
            [
                {
                    "params": [model.weight],
                    "rank": 2,
                    "update_proj_gap": 200,
                    "scale": 0.25,
                    "proj_type": "std",
                },
                {"params": [model.bias]},
            ]
        )
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
    copy.deepcopy(opt.state_dict())


def test_adamw8bit_tracks_f32_and_saves_memory():
    from galorax.torch import GaLoreAdamW8bit

    def train(cls):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 64)
        )
        mats = [p for p in model.parameters() if p.dim() == 2]
        rest = [p for p in model.parameters() if p.dim() != 2]
        opt = cls([{"params": mats, "rank": 32, "update_proj_gap": 10}, {"params": rest}], lr=1e-2)
        gen = torch.Generator().manual_seed(1)
        target = torch.nn.Linear(64, 64)
        losses = []
        for _ in range(40):
            x = torch.randn(32, 64, generator=gen)
            loss = torch.nn.functional.mse_loss(model(x), target(x).detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return losses, opt

    f32, _ = train(GaLoreAdamW)
    q8, opt = train(GaLoreAdamW8bit)
    assert q8[-1] < 0.5 * q8[0]  # it trains (no silently skipped updates)
    assert abs(q8[-1] - f32[-1]) < 0.1 * f32[-1]
    state_bytes = sum(
        t.numel() * t.element_size()
        for st in opt.state.values()
        for k, t in st.items()
        if torch.is_tensor(t) and k.startswith("exp_avg")
    )
    f32_bytes = sum(
        2 * 4 * t.numel() for st in opt.state.values() for k, t in st.items() if k == "exp_avg"
    )
    assert state_bytes < 0.35 * f32_bytes
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    opt.load_state_dict(sd)
    codes = [st["exp_avg"] for st in opt.state.values() if st["exp_avg"].numel() >= 2048]
    assert codes and all(c.dtype == torch.uint8 for c in codes)
