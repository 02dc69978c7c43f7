"""GaLoreAdamW / GaLoreAdamW8bit (galorax.torch.adamw): differential tests against galore-torch
1.0 and the JAX API, f32 state of bf16 parameters, 8-bit moments."""

from __future__ import annotations

import copy
import inspect
import io
import warnings

import pytest

torch = pytest.importorskip("torch")

from galorax_torch_testlib import (  # noqa: E402
    SHAPES,
    fixed_grads,
    galore_torch_defaults,
    make_params,
    run_trajectory,
)

from galorax.torch import GaLoreAdamW  # noqa: E402


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_adamw_matches_galore_torch(galore_torch, proj_type):
    steps, gap = 22, 5  # refreshes at 0, 5, 10, 15, 20
    grads = fixed_grads(steps)
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

    ours_traj, opt, _ = run_trajectory(ours, steps, grads)
    ref_traj, _, _ = run_trajectory(ref, steps, grads)
    for t, (a, r) in enumerate(zip(ours_traj, ref_traj, strict=True)):
        for x, y in zip(a, r, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=f"step {t}")
    # Same state shapes as galore-torch's convention.
    for w, (m, n) in zip(opt.param_groups[0]["params"], SHAPES, strict=True):
        right = {"std": m >= n, "reverse_std": m < n, "left": False, "right": True}[proj_type]
        assert opt.state[w]["exp_avg"].shape == ((m, 4) if right else (4, n))


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
    grads = fixed_grads(steps, seed=5)
    for proj_type, jside in [("std", "std"), ("reverse_std", "auto")]:
        # eps -> 0 on both sides: galore-torch adds eps to sqrt(v), optax to sqrt(v_hat);
        # with eps tiny both are Adam exactly. No weight decay (applied at different times).
        ours_traj, _, _ = run_trajectory(
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
        ws, b = make_params(0)
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


def test_bf16_params_keep_f32_state():
    w = torch.nn.Parameter(torch.randn(16, 8, dtype=torch.bfloat16))
    opt = GaLoreAdamW([w], rank=2, lr=1e-2)
    for _ in range(3):
        w.grad = torch.randn(16, 8, dtype=torch.bfloat16)
        opt.step()
    st = opt.state[w]
    assert st["projector"].dtype == st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32
    assert w.dtype == torch.bfloat16


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
        # The f32 optimizer's eps and weight decay, and moments of 2048 (rank 32 x 64) in 8 bits:
        # GaLoreAdamW8bit's defaults before they became galore-torch's (1e-8, 1e-2, 4096).
        kw = dict(eps=1e-6, weight_decay=0.0)
        if cls is GaLoreAdamW8bit:
            kw.update(min_8bit_size=2048)
        groups = [{"params": mats, "rank": 32, "update_proj_gap": 10}, {"params": rest}]
        opt = cls(groups, lr=1e-2, **kw)
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


def test_adamw8bit_signature_and_defaults_are_galore_torch(galore_torch):
    from galorax.torch import GaLoreAdamW8bit

    ref = galore_torch_defaults(galore_torch, "adamw8bit", "AdamW8bit")
    assert {"amsgrad", "block_wise", "is_paged", "optim_bits", "percentile_clipping"} <= set(ref)
    ours = inspect.signature(GaLoreAdamW8bit).parameters
    for name, default in ref.items():
        assert ours[name].default == default, name  # eps 1e-8, weight_decay 1e-2, 4096, ...
    # galore-torch's positional order too (params, lr, betas, eps, weight_decay, amsgrad, ...).
    assert list(ours)[1 : 1 + len(ref)] == list(ref)
    ref_adamw = galore_torch_defaults(galore_torch, "adamw", "AdamW")
    ours_adamw = inspect.signature(GaLoreAdamW).parameters
    assert {n: ours_adamw[n].default for n in ref_adamw} == ref_adamw


def test_galore_torch_keywords_accepted_warned_or_refused():
    from galorax.torch import GaLoreAdamW8bit

    w = torch.nn.Parameter(torch.randn(64, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GaLoreAdamW([w], rank=4, no_deprecation_warning=True)
        GaLoreAdamW([w], rank=4, no_deprecation_warning=False)  # no deprecation to warn about
        GaLoreAdamW8bit(  # galore-torch's defaults spelled out: silent
            [w],
            rank=4,
            amsgrad=False,
            optim_bits=32,
            args=None,
            percentile_clipping=100,
            block_wise=True,
            is_paged=False,
        )
    for kw in ({"amsgrad": True}, {"optim_bits": 8}, {"is_paged": True}, {"args": object()}):
        with pytest.warns(UserWarning) as rec:
            GaLoreAdamW8bit([w], rank=4, **kw)
        (name,) = kw
        assert len(rec) == 1 and f"{name}=" in str(rec[0].message)
    with pytest.raises(ValueError, match="percentile_clipping=95"):
        GaLoreAdamW8bit([w], rank=4, percentile_clipping=95)


def test_adamw8bit_block_wise_false_is_one_block_per_tensor():
    from galorax.torch import GaLoreAdamW8bit

    w = torch.nn.Parameter(torch.zeros(512, 128))
    opt = GaLoreAdamW8bit([w], rank=32, block_wise=False)
    for _ in range(2):
        w.grad = torch.randn(512, 128)
        opt.step()
    st = opt.state[w]
    assert st["exp_avg"].dtype == torch.uint8
    assert st["exp_avg_absmax"].numel() == st["exp_avg_sq_absmax"].numel() == 1
