"""Tests of galorax.options: the checked, resolved options of scale_by_galore."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

import galorax
from galorax.options import GaLoreOptions, galore_options


def test_resolved_values():
    opts = galore_options(
        4, 10, subspace="randomized", residual=True, adaptive=True, refresh_axes="data"
    )
    assert isinstance(opts, GaLoreOptions)
    assert opts.subspace == galorax.Randomized()
    assert opts.residual == galorax.Residual() and opts.adaptive == galorax.AdaptiveRefresh()
    assert opts.refresh_axes == ("data",) and opts.projector_dtype == jnp.float32
    off = galore_options(subspace="svd", residual=False, adaptive=None, projector_bits=8)
    assert off.subspace is None and off.residual is None and off.adaptive is None
    assert off.projector_bits == 8
    custom = galorax.Randomized(power_iters=2)
    assert galore_options(subspace=custom).subspace is custom


def test_frozen():
    with pytest.raises(AttributeError):
        galore_options().rank = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(residual="yes"), TypeError, "residual"),
        (dict(adaptive=3), TypeError, "adaptive"),
        (dict(moment_fields={"ema": "third"}), TypeError, "moment_fields"),
        (dict(refresh_axes=("data", "data")), TypeError, "refresh_axes"),
    ],
)
def test_errors_name_the_argument(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        galore_options(**kwargs)
