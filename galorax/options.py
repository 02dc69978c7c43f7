"""The options of :func:`galorax.scale_by_galore`: their types, checks and resolved value.

Every argument is checked here, once, when the transform is built (not when it first
runs), and the checked arguments become one frozen :class:`GaLoreOptions` that the
per-leaf projectors (:mod:`galorax.projector`) and the transform read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from galorax.residual import Residual
from galorax.schedule import AdaptiveRefresh
from galorax.subspace import Randomized

Subspace = Literal["svd", "randomized"] | Randomized
Moments = Literal["keep", "align", "rotate"]
Side = Literal["auto", "std", "reverse_std", "left", "right"]
#: How a field of the base optimizer's state moves when a projector changes
#: (:mod:`galorax.moments`): rotated as a first or a second moment, or left as it is.
MomentKind = Literal["first", "second", "none"]

SUBSPACES = ("svd", "randomized")
MOMENTS = ("keep", "align", "rotate")
SIDES = ("auto", "std", "reverse_std", "left", "right")
PROJECTOR_BITS = (8, 4)
MOMENT_KINDS = ("first", "second", "none")


def check_positive_int(value: Any, name: str) -> int:
    """``value`` as a Python int if it is a positive int (numpy's too), else a
    ``TypeError`` naming ``name``.

    Example:
        >>> check_positive_int(3, "rank"), check_positive_int(np.int64(2), "rank")
        (3, 2)
    """
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)
    if not ok or value <= 0:
        hint = ""
        if isinstance(value, jax.Array | float):
            hint = " Under optax.inject_hyperparams, pass static_args=('rank', 'update_proj_gap')."
        raise TypeError(f"`{name}` must be a positive int, got {value!r}.{hint}")
    return int(value)


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is a bool (numpy's too), else a ``TypeError`` naming ``name``
    (a string such as ``'no'`` would otherwise count as True).

    Example:
        >>> check_bool(np.bool_(False), "stagger")
        False
    """
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")
    return bool(value)


def check_scale(value: Any) -> Any:
    """``scale`` as given if it is a real number or a numeric array (a traced one too,
    as under ``optax.inject_hyperparams``), else a ``TypeError`` naming it.

    Example:
        >>> check_scale(0.5), check_scale(jnp.asarray(2.0)).dtype
        (0.5, dtype('float32'))
    """
    if isinstance(value, bool | np.bool_):
        ok = False
    elif isinstance(value, int | float | np.integer | np.floating):
        ok = True
    else:
        dtype = getattr(value, "dtype", None)
        ok = (
            isinstance(value, jax.Array | np.ndarray)
            and dtype is not None
            and (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))
        )
    if not ok:
        raise TypeError(f"`scale` must be a real number such as 1.0, got {value!r}.")
    return value


def check_base_optimizer(value: Any) -> Any:
    """``base_optimizer`` if it is None or an optax transformation (``init`` and
    ``update``), else a ``TypeError`` naming it.

    Example:
        >>> import optax
        >>> check_base_optimizer(None) is None
        True
    """
    if value is None or (
        callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))
    ):
        return value
    hint = " such as optax.scale_by_adam()"
    if isinstance(value, str):
        hint = f" such as optax.scale_by_{value.lower()}()" if value.isidentifier() else hint
    raise TypeError(
        f"`base_optimizer` must be an optax.GradientTransformation{hint} (or None), got {value!r}."
    )


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> Any:
    """``value`` if it is one of ``choices``, else a ``ValueError`` listing them.

    Example:
        >>> check_choice("left", "side", SIDES)
        'left'
    """
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")
    return value


def check_subspace(value: Any) -> Randomized | None:
    """The refresh's :class:`Randomized` settings, or None for the exact SVD.

    Example:
        >>> check_subspace("svd") is None, check_subspace("randomized") == Randomized()
        (True, True)
    """
    if isinstance(value, Randomized):
        return value
    check_choice(value, "subspace", SUBSPACES)
    return Randomized() if value == "randomized" else None


def check_projector_bits(value: Any) -> int | None:
    """``projector_bits`` as None, 8 or 4.

    Example:
        >>> check_projector_bits(np.int64(4))
        4
    """
    if value is None:
        return None
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        if int(value) in PROJECTOR_BITS:
            return int(value)
    hint = ""
    if isinstance(value, jax.Array):
        hint = " Under optax.inject_hyperparams, add 'projector_bits' to static_args."
    raise ValueError(f"`projector_bits` must be None, 8 or 4, got {value!r}.{hint}")


def check_axes(value: Any) -> tuple[str, ...]:
    """``refresh_axes`` as a tuple of mesh axis names.

    Example:
        >>> check_axes("data"), check_axes(None)
        (('data',), ())
    """
    if value is None:
        return ()
    axes = (value,) if isinstance(value, str) else value
    if (
        not isinstance(axes, tuple | list)
        or not all(isinstance(a, str) and a for a in axes)
        or len(set(axes)) != len(axes)
    ):
        raise TypeError(
            f"`refresh_axes` must be a mesh axis name or a tuple of distinct names, e.g. "
            f"'data' or ('data', 'replica'), got {value!r}."
        )
    return tuple(axes)


def check_projector_dtype(value: Any) -> np.dtype:
    """``projector_dtype`` as a floating numpy dtype.

    Example:
        >>> check_projector_dtype("bfloat16").name
        'bfloat16'
    """
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError("`projector_dtype` must name a floating dtype such as 'float32'.")
    return dtype


def check_residual(value: Any) -> Residual | None:
    """``residual`` as :class:`Residual` settings or None (``True``: the defaults)."""
    value = Residual() if value is True else (value or None)
    if value is not None and not isinstance(value, Residual):
        raise TypeError(f"`residual` must be a galorax.Residual or a bool, got {value!r}.")
    return value


def check_adaptive(value: Any) -> AdaptiveRefresh | None:
    """``adaptive`` as :class:`AdaptiveRefresh` settings or None (``True``: the defaults)."""
    value = AdaptiveRefresh() if value is True else (value or None)
    if value is not None and not isinstance(value, AdaptiveRefresh):
        raise TypeError(f"`adaptive` must be a galorax.AdaptiveRefresh or a bool, got {value!r}.")
    return value


def check_moment_fields(value: Any) -> tuple[tuple[str, str], ...]:
    """``moment_fields`` (field name -> ``"first"``, ``"second"`` or ``"none"``) as sorted pairs.

    Example:
        >>> check_moment_fields({"ema": "first"})
        (('ema', 'first'),)
    """
    if value is None:
        return ()
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and v in MOMENT_KINDS for k, v in value.items()
    ):
        raise TypeError(
            "`moment_fields` must map base-optimizer state field names to 'first', 'second' "
            f"or 'none', e.g. {{'ema': 'first'}}, got {value!r}."
        )
    return tuple(sorted(value.items()))


@dataclasses.dataclass(frozen=True)
class GaLoreOptions:
    """The checked arguments of :func:`galorax.scale_by_galore`, built by :func:`galore_options`.

    The same names and meanings as those arguments, resolved: ``subspace`` is the
    :class:`Randomized` settings or None (exact SVD), ``residual``/``adaptive`` their
    settings or None, ``projector_dtype`` a dtype, ``refresh_axes`` a tuple and
    ``moment_fields`` sorted ``(name, kind)`` pairs.
    """

    rank: int
    update_proj_gap: int
    scale: Any
    subspace: Randomized | None
    moments: str
    stagger: bool
    side: str
    projector_dtype: np.dtype
    precision: jax.lax.Precision | str | None
    residual: Residual | None
    adaptive: AdaptiveRefresh | None
    projector_bits: int | None
    refresh_axes: tuple[str, ...]
    moment_fields: tuple[tuple[str, str], ...] = ()
    skip_nonfinite: bool = False
    leafwise_base: bool = False


def galore_options(
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: Any = 1.0,
    *,
    subspace: Subspace = "randomized",
    moments: Moments = "rotate",
    stagger: bool = True,
    side: Side = "auto",
    projector_dtype: Any = "float32",
    precision: jax.lax.Precision | str | None = jax.lax.Precision.HIGHEST,
    residual: Residual | bool | None = None,
    adaptive: AdaptiveRefresh | bool | None = None,
    projector_bits: int | None = None,
    refresh_axes: str | Sequence[str] | None = None,
    moment_fields: Mapping[str, MomentKind] | None = None,
    skip_nonfinite: bool = False,
    leafwise_base: bool = False,
) -> GaLoreOptions:
    """Checks :func:`galorax.scale_by_galore`'s arguments and resolves them (see there).

    Raises:
        TypeError, ValueError: An argument is not what it may be; the message names it.

    Example:
        >>> opts = galore_options(8, 50, subspace="svd", residual=True)
        >>> opts.subspace is None, opts.residual, opts.refresh_axes
        (True, Residual(granularity='channel', limit=1.01), ())
    """
    rank = check_positive_int(rank, "rank")
    update_proj_gap = check_positive_int(update_proj_gap, "update_proj_gap")
    resolved = check_subspace(subspace)
    check_choice(moments, "moments", MOMENTS)
    check_choice(side, "side", SIDES)
    bits = check_projector_bits(projector_bits)
    axes = check_axes(refresh_axes)
    return GaLoreOptions(
        rank=rank,
        update_proj_gap=update_proj_gap,
        scale=check_scale(scale),
        subspace=resolved,
        moments=moments,
        stagger=check_bool(stagger, "stagger"),
        side=side,
        projector_dtype=check_projector_dtype(projector_dtype),
        precision=precision,
        residual=check_residual(residual),
        adaptive=check_adaptive(adaptive),
        projector_bits=bits,
        refresh_axes=axes,
        moment_fields=check_moment_fields(moment_fields),
        skip_nonfinite=check_bool(skip_nonfinite, "skip_nonfinite"),
        leafwise_base=check_bool(leafwise_base, "leafwise_base"),
    )
