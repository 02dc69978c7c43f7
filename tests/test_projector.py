"""Tests of galorax.projector: quantized projectors (projector_bits) and their error."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from galorax.accounting import tree_bytes
from galorax.projector import projector_error, quantize_projector

CODES = [(c, b, s) for c in ("dynamic", "linear") for b in (8, 4) for s in (True, False)]




@functools.cache
def _gradient_and_projector() -> tuple[jax.Array, jax.Array]:
    """A 256 x 128 gradient with a 1/i spectrum and its exact top-32 left basis."""

    @jax.jit
    def make():
        k1, k2 = jax.random.split(jax.random.key(7))
        g = (jax.random.normal(k1, (256, 128)) / jnp.arange(1, 129)) @ jax.random.normal(
            k2, (128, 128)
        )
        return g, jnp.linalg.svd(g, full_matrices=False)[0][:, :32]

    return make()


@pytest.mark.parametrize(
    "bits,group,max_rel,max_energy_drop",
    [(8, 256, 0.01, 1e-3), (4, 64, 0.12, 0.03), (4, 256, 0.15, 0.04)],
)
def test_projector_quantization_error(bits, group, max_rel, max_energy_drop):
    """Linear absmax code on a Gaussian-like orthonormal P: rms error ~ step / sqrt(12) with
    step = 2 * absmax / (2**bits - 2) and absmax ~ 2.5-3 sigma of a group: ~0.6% (8-bit),
    ~10% (4-bit). The captured energy of the gradient barely moves: quantization noise is
    spread over all m directions, only r / m of it lands in the subspace."""
    k1, k2 = jax.random.split(jax.random.key(7))
    g = (
        jax.random.normal(k1, (512, 256))
        @ jnp.diag(1.0 / jnp.arange(1, 257))
        @ (jax.random.normal(k2, (256, 256)))
    )
    p = jnp.linalg.svd(g, full_matrices=False)[0][:, :64]
    q = quantize_projector(p, bits=bits, group_size=group)
    err = projector_error(p, q, g)
    assert float(err.relative) < max_rel
    assert float(err.energy - err.energy_quantized) < max_energy_drop
    assert tree_bytes(q) < tree_bytes(p) * (bits / 32 + 4 / group + 1e-6)
