"""Param-group keys (galorax.torch.groups): defaults, validation, the JAX API's settings object."""

from __future__ import annotations

import io

import pytest

torch = pytest.importorskip("torch")

from galorax.torch import GaLoreAdamW  # noqa: E402


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
    # side='std' (galore-torch's; it trains better, BENCHMARKS.md "Small Llama in PyTorch"):
    # m >= n -> right projector (n x r), moments m x r.
    assert g["side"] == "std"
    assert opt.state[w]["projector"].shape == (10, 4)
    assert opt.state[w]["exp_avg"].shape == (30, 4)
    opt = GaLoreAdamW([{"params": [w], "rank": 4, "side": "auto"}])
    w.grad = torch.randn(30, 10)
    opt.step()  # 'auto': least state, m >= n -> left projector (m x r), moments r x n
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


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"lr": float("nan")}, r"lr must be a finite number, got nan"),
        ({"lr": float("inf")}, r"lr must be a finite number, got inf"),
        ({"rank": 2.5}, r"rank must be a positive integer .*got 2.5"),
        ({"rank": True}, r"rank must be a positive integer .*got True"),
    ],
    ids=["lr-nan", "lr-inf", "rank-2.5", "rank-True"],
)
def test_bad_lr_and_rank_are_named(kw, match):
    w = torch.nn.Parameter(torch.randn(8, 4))
    with pytest.raises(ValueError, match=match):
        GaLoreAdamW([w], **{"rank": 2, **kw})
    with pytest.raises(ValueError, match=match):  # per group too
        GaLoreAdamW([{"params": [w], "rank": 2, **kw}])


def test_integral_ranks_of_any_type_are_taken():
    import numpy as np

    w = torch.nn.Parameter(torch.randn(8, 4))
    assert GaLoreAdamW([w], rank=np.int64(2)).param_groups[0]["rank"] == 2


def test_complex_parameter_is_named():
    w = torch.nn.Parameter(torch.randn(8, 4))
    z = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    with pytest.raises(
        TypeError, match=r"param_groups\[1\]\['params'\]\[0\] \(shape \(4, 4\)\) is complex"
    ):
        GaLoreAdamW([{"params": [w], "rank": 2}, {"params": [z]}])
    opt = GaLoreAdamW([w], rank=2)
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[0\].*view_as_real"):
        opt.add_param_group({"params": [z]})


def test_shared_keys_are_the_jax_declarations():
    """The keys shared with the JAX API take its declared defaults and choices, but where
    TORCH_DEFAULTS says otherwise (and why)."""
    from galorax.options import OPTION
    from galorax.torch.groups import GALORE_DEFAULTS, MOMENTS, SHARED_KEYS, TORCH_DEFAULTS

    assert set(TORCH_DEFAULTS) <= set(SHARED_KEYS)
    for name in SHARED_KEYS:
        declared = TORCH_DEFAULTS.get(name, OPTION[name].default)
        assert name in GALORE_DEFAULTS and GALORE_DEFAULTS[name] == declared, name
    assert MOMENTS == OPTION["moments"].choices
    w = torch.nn.Parameter(torch.randn(8, 4))
    for choice in OPTION["subspace"].choices:
        GaLoreAdamW([w], rank=2, subspace=choice)  # every declared name is taken
