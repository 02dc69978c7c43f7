"""Tests of galorax.options: the checked, resolved options of scale_by_galore."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import galorax
from galorax.options import (
    OPTION,
    OPTIONS,
    GaLoreOptions,
    check_base_optimizer,
    galore_options,
)


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


# ---- one vocabulary: every declared option reaches every place built from OPTIONS ----------


@pytest.mark.parametrize("fn", [galorax.scale_by_galore, galorax.galore], ids=lambda f: f.__name__)
def test_signatures_are_the_declarations(fn):
    """Each option in the written-out signature: its kind, annotation and default (equal once
    checked: ``precision``'s is declared by name)."""
    params = inspect.signature(fn).parameters
    keyword_only = [p.name for p in params.values() if p.kind is p.KEYWORD_ONLY]
    assert keyword_only == [o.name for o in OPTIONS if not o.positional]
    for o in OPTIONS:
        assert o.name in params, f"{fn.__name__} lacks the declared option {o.name!r}"
        p = params[o.name]
        kind = p.POSITIONAL_OR_KEYWORD if o.positional else p.KEYWORD_ONLY
        assert (p.kind, p.annotation) == (kind, o.type), o.name
        assert o.check(p.default, o) == o.check(o.default, o), o.name


def test_options_hold_the_declarations():
    assert [f.name for f in dataclasses.fields(GaLoreOptions)] == [o.name for o in OPTIONS]
    assert list(OPTION) == [o.name for o in OPTIONS]
    opts = galore_options()
    for o in OPTIONS:
        assert getattr(opts, o.name) == o.check(o.default, o), o.name
    assert all(o.doc and "\n" not in o.doc for o in OPTIONS)
    with pytest.raises(TypeError, match="rnak"):
        galore_options(rnak=4)


def test_docstrings_name_every_option():
    args = galorax.scale_by_galore.__doc__.split("Args:")[1].split("Returns:")[0]
    keyword_args = galorax.galore.__doc__.split("Keyword Args:")[1]
    for o in OPTIONS:
        assert f"\n        {o.name}: " in args, f"scale_by_galore's Args lack {o.name!r}"
        if not o.positional:
            assert f"\n        {o.name}: " in keyword_args, o.name


def _unlike_default(o):
    """A value of option ``o`` other than its default, checked as ``o`` checks."""
    others = {
        "rank": 3,
        "update_proj_gap": 7,
        "scale": 0.5,
        "stagger": False,
        "projector_dtype": "bfloat16",
        "precision": "high",
        "residual": True,
        "adaptive": True,
        "refresh_axes": "data",
        "skip_nonfinite": True,
        "moment_fields": {"ema": "first"},
        "leafwise_base": True,
        "chunking": galorax.chunking.Chunking(max_bytes=2**20),
    }
    value = others[o.name] if o.name in others else [c for c in o.choices if c != o.default][0]
    assert o.check(value, o) != o.check(o.default, o), o.name
    return value


@pytest.mark.parametrize("fn", [galorax.scale_by_galore, galorax.galore], ids=lambda f: f.__name__)
def test_every_option_is_forwarded(fn, monkeypatch):
    """``galore`` -> ``scale_by_galore`` -> ``galore_options`` pass every declared option on
    (collected by name, not listed): a new declaration needs no forwarding of its own."""
    import galorax.transform

    seen = {}

    def spy(**given):
        seen.update(given)
        return galore_options(**given)

    monkeypatch.setattr(galorax.transform, "galore_options", spy)
    given = {o.name: _unlike_default(o) for o in OPTIONS}
    args = (0.1,) if fn is galorax.galore else ()
    fn(*args, **given)
    assert seen == given


def test_declarations_import_no_jax():
    """galorax.torch builds its param-group keys from OPTIONS without loading JAX."""
    code = (
        "import sys, galorax.options as o; o.OPTION['moments'].default; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'jax'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
