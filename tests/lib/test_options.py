"""Tests of galorax.options: the checked, resolved options of scale_by_galore."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import galorax
from galorax.options import GaLoreOptions, check_base_optimizer, galore_options


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


@pytest.mark.parametrize(
    "kwargs,field,want",
    [
        (dict(rank=np.int64(2)), "rank", 2),
        (dict(update_proj_gap=np.int32(7)), "update_proj_gap", 7),
        (dict(stagger=np.bool_(False)), "stagger", False),
        (dict(skip_nonfinite=True), "skip_nonfinite", True),
    ],
)
def test_numpy_scalars_are_accepted_as_python(kwargs, field, want):
    value = getattr(galore_options(**kwargs), field)
    assert value == want and type(value) is type(want)


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(stagger="no"), TypeError, "`stagger` must be True or False"),
        (dict(skip_nonfinite=0), TypeError, "`skip_nonfinite`"),
        (dict(scale="abc"), TypeError, "`scale` must be a real number"),
        (dict(scale=True), TypeError, "`scale`"),
        (dict(rank=np.bool_(True)), TypeError, "`rank`"),
    ],
)
def test_more_errors_name_the_argument(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        galore_options(**kwargs)


def test_scale_keeps_arrays_as_given():
    scale = jnp.asarray(0.25)
    assert galore_options(scale=scale).scale is scale
    assert check_base_optimizer(None) is None
    with pytest.raises(TypeError, match="`base_optimizer`.*scale_by_adam"):
        check_base_optimizer("adam")
