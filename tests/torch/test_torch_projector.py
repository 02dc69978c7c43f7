"""galorax.torch.projector: sides, exact and randomized subspaces, warm start, guards."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from galorax.torch.projector import (  # noqa: E402
    align_signs,
    fallback_basis,
    find_subspace,
    gradient_is_usable,
    project,
    project_back,
    resolve_side,
    rotation,
)


def _energy(g, basis, side):
    inside = basis.T @ g if side == "left" else g @ basis
    return float(inside.square().sum() / g.square().sum())


def _decaying(m, n, seed=0, power=1.0):
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=gen))
    s = 1.0 / torch.arange(1, min(m, n) + 1, dtype=torch.float32) ** power
    return (u * s) @ v.T


@pytest.mark.parametrize(
    "shape,proj_type,side",
    [
        ((8, 4), "std", "right"),
        ((4, 8), "std", "left"),
        ((8, 4), "reverse_std", "left"),
        ((4, 8), "reverse_std", "right"),
        ((8, 4), "auto", "left"),
        ((4, 8), "auto", "right"),
        ((4, 8), "left", "left"),
        ((8, 4), "right", "right"),
        ((5, 5), "std", "right"),
        ((5, 5), "auto", "left"),
    ],
)
def test_resolve_side(shape, proj_type, side):
    assert resolve_side(shape, proj_type) == side


def test_resolve_side_rejects_unknown():
    with pytest.raises(ValueError):
        resolve_side((4, 4), "full")


@pytest.mark.parametrize("side", ["left", "right"])
def test_svd_matches_galore_torch_convention(side):
    g = _decaying(30, 20, seed=1)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    basis = find_subspace(g, 5, side, "svd")
    expected = u[:, :5] if side == "left" else vh[:5].T  # same signs as galore-torch
    torch.testing.assert_close(basis, expected)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shape", [(96, 64), (48, 120)])
def test_randomized_orthonormal_and_captures_energy(side, shape):
    g = _decaying(*shape, seed=2)
    exact = find_subspace(g, 8, side, "svd")
    for q in (0, 1, 2):
        basis = find_subspace(g, 8, side, "randomized", power_iters=q, seed=3)
        rows = shape[0] if side == "left" else shape[1]
        assert basis.shape == (rows, 8) and basis.dtype == torch.float32
        torch.testing.assert_close(basis.T @ basis, torch.eye(8), atol=1e-5, rtol=0)
        ratio = _energy(g, basis, side) / _energy(g, exact, side)
        assert ratio > (0.9 if q == 0 else 0.99), (q, ratio)


def test_randomized_exact_on_low_rank():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(64, 6, generator=gen) @ torch.randn(6, 40, generator=gen)
    for side in ("left", "right"):
        basis = find_subspace(g, 6, side, "randomized", power_iters=0)
        recon = project_back(project(g, basis, side), basis, side)
        assert float((recon - g).norm() / g.norm()) < 1e-4


def test_power_iterations_help_on_flat_spectrum():
    g = _decaying(200, 200, seed=4, power=0.1)
    e = [
        _energy(g, find_subspace(g, 16, "left", "randomized", power_iters=q), "left")
        for q in (0, 2)
    ]
    exact = _energy(g, find_subspace(g, 16, "left", "svd"), "left")
    assert e[0] < e[1] <= exact + 1e-6


def test_warm_start_tracks_previous_subspace():
    g = _decaying(128, 96, seed=5)
    old = find_subspace(g, 8, "left", "svd")
    drift = g + 0.01 * _decaying(128, 96, seed=6)
    for side, prev in (("left", old), ("right", find_subspace(g, 8, "right", "svd"))):
        warm = find_subspace(drift, 8, side, "randomized", power_iters=0, oversample=0, warm=prev)
        cold = find_subspace(drift, 8, side, "randomized", power_iters=0, oversample=0)
        exact = find_subspace(drift, 8, side, "svd")
        assert _energy(drift, warm, side) > _energy(drift, cold, side)
        assert _energy(drift, warm, side) > 0.999 * _energy(drift, exact, side)


def test_seeding_is_deterministic():
    g = _decaying(50, 40, seed=7)
    a = find_subspace(g, 4, "left", seed=1, index=2, refresh=3)
    b = find_subspace(g, 4, "left", seed=1, index=2, refresh=3)
    c = find_subspace(g, 4, "left", seed=1, index=2, refresh=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_align_and_rotation():
    gen = torch.Generator().manual_seed(0)
    old, _ = torch.linalg.qr(torch.randn(10, 3, generator=gen))
    flipped = old * torch.tensor([-1.0, 1.0, -1.0])
    torch.testing.assert_close(align_signs(flipped, old), old)
    torch.testing.assert_close(rotation(old, old), torch.eye(3))
    # Rotating coordinates by C = new^T old maps old-basis vectors into the new basis.
    new, _ = torch.linalg.qr(torch.randn(10, 3, generator=gen))
    new = torch.cat([old[:, :2], new[:, 2:]], 1)
    new, _ = torch.linalg.qr(new)
    x = torch.randn(3, 5, generator=gen)
    c = rotation(new, old)
    torch.testing.assert_close(new @ (c @ x), new @ new.T @ (old @ x), atol=1e-5, rtol=0)


def test_guards():
    assert gradient_is_usable(torch.ones(3, 3))
    assert not gradient_is_usable(torch.zeros(3, 3))
    bad = torch.ones(3, 3)
    bad[1, 1] = float("inf")
    assert not gradient_is_usable(bad)
    for side in ("left", "right"):
        b = fallback_basis((9, 4), 3, side)
        torch.testing.assert_close(b.T @ b, torch.eye(3))


def test_bf16_gradient_gives_f32_projector():
    g = _decaying(32, 16, seed=8).to(torch.bfloat16)
    for method in ("svd", "randomized"):
        assert find_subspace(g, 4, "left", method).dtype == torch.float32
