"""The checks of GaLore's options (:data:`galorax.options.OPTIONS`) and the record that
declares one (:class:`Option`): each check takes ``(value, option)`` and returns the value
:class:`galorax.options.GaLoreOptions` holds, or raises a ``TypeError``/``ValueError``
that names the option and what to pass instead.

This module imports no JAX (the checks that need it import it when they run):
``galorax.torch`` reads the declarations, and must not load JAX.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

if TYPE_CHECKING:
    from galorax.chunking import Chunking
    from galorax.residual import Residual
    from galorax.schedule import AdaptiveRefresh
    from galorax.subspace import Randomized

Moments = Literal["keep", "align", "rotate"]
Side = Literal["auto", "std", "reverse_std", "left", "right"]
#: How a field of the base optimizer's state moves when a projector changes
#: (:mod:`galorax.moments`): rotated as a first or a second moment, or left as it is.
MomentKind = Literal["first", "second", "none"]

SUBSPACES = ("randomized", "svd")
MOMENTS: tuple[str, ...] = get_args(Moments)
SIDES: tuple[str, ...] = get_args(Side)
PROJECTOR_BITS = (8, 4)
MOMENT_KINDS: tuple[str, ...] = get_args(MomentKind)


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of :func:`galorax.scale_by_galore` (and :func:`galorax.galore`).

    Attributes:
        name: The keyword, and the field of :class:`GaLoreOptions`.
        type: Its annotation in the two signatures, as written there.
        default: Its default there (``precision``'s by name, which the check resolves:
            this module imports no JAX).
        check: ``check(value, option)``: the resolved value :class:`GaLoreOptions` holds,
            or a ``TypeError``/``ValueError`` that names the option.
        doc: What it does, in one line.
        choices: The values it takes by name, where a fixed set (the command line's choices).
        positional: One of ``optax.contrib.scale_by_galore``'s positional arguments
            (``rank``, ``update_proj_gap``, ``scale``); the others are keyword-only.
    """

    name: str
    type: str
    default: Any
    check: Callable[[Any, Option], Any]
    doc: str
    choices: tuple[Any, ...] = ()
    positional: bool = False


def check_positive_int(value: Any, option: Option) -> int:
    """``value`` as a Python int if it is a positive int (numpy's too), else a
    ``TypeError`` naming the option.

    Example:
        >>> from galorax.options import OPTION
        >>> check_positive_int(3, OPTION["rank"]), check_positive_int(np.int64(2), OPTION["rank"])
        (3, 2)
    """
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)
    if not ok or value <= 0:
        import jax

        hint = ""
        if isinstance(value, jax.Array | float):
            hint = " Under optax.inject_hyperparams, pass static_args=('rank', 'update_proj_gap')."
        raise TypeError(f"`{option.name}` must be a positive int, got {value!r}.{hint}")
    return int(value)


def check_bool(value: Any, option: Option) -> bool:
    """``value`` if it is a bool (numpy's too), else a ``TypeError`` naming the option
    (a string such as ``'no'`` would otherwise count as True).

    Example:
        >>> from galorax.options import OPTION
        >>> check_bool(np.bool_(False), OPTION["stagger"])
        False
    """
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"`{option.name}` must be True or False, got {value!r}.")
    return bool(value)


def check_scale(value: Any, option: Option) -> Any:
    """``value`` as given if it is a real number or a numeric array (a traced one too,
    as under ``optax.inject_hyperparams``), else a ``TypeError`` naming the option.

    Example:
        >>> from galorax.options import OPTION
        >>> import jax.numpy as jnp
        >>> check_scale(0.5, OPTION["scale"]), check_scale(jnp.asarray(2.0), OPTION["scale"]).dtype
        (0.5, dtype('float32'))
    """
    if isinstance(value, bool | np.bool_):
        ok = False
    elif isinstance(value, int | float | np.integer | np.floating):
        ok = True
    else:
        import jax
        import jax.numpy as jnp

        dtype = getattr(value, "dtype", None)
        ok = (
            isinstance(value, jax.Array | np.ndarray)
            and dtype is not None
            and (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))
        )
    if not ok:
        raise TypeError(f"`{option.name}` must be a real number such as 1.0, got {value!r}.")
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


def check_choice(value: Any, option: Option) -> Any:
    """``value`` if it is one of the option's ``choices``, else a ``ValueError`` listing them.

    Example:
        >>> from galorax.options import OPTION
        >>> check_choice("left", OPTION["side"])
        'left'
    """
    if value not in option.choices:
        raise ValueError(f"`{option.name}` must be one of {option.choices}, got {value!r}.")
    return value


def check_subspace(value: Any, option: Option) -> Randomized | None:
    """The refresh's :class:`galorax.Randomized` settings, or None for the exact SVD.

    Example:
        >>> from galorax.options import OPTION
        >>> import galorax
        >>> check_subspace("svd", OPTION["subspace"]) is None
        True
        >>> check_subspace("randomized", OPTION["subspace"]) == galorax.Randomized()
        True
    """
    from galorax.subspace import Randomized

    if isinstance(value, Randomized):
        return value
    check_choice(value, option)
    return Randomized() if value == "randomized" else None


def check_projector_bits(value: Any, option: Option) -> int | None:
    """``projector_bits`` as None, 8 or 4.

    Example:
        >>> from galorax.options import OPTION
        >>> check_projector_bits(np.int64(4), OPTION["projector_bits"])
        4
    """
    if value is None:
        return None
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        if int(value) in option.choices:
            return int(value)
    import jax

    hint = ""
    if isinstance(value, jax.Array):
        hint = f" Under optax.inject_hyperparams, add '{option.name}' to static_args."
    raise ValueError(f"`{option.name}` must be None, 8 or 4, got {value!r}.{hint}")


def check_axes(value: Any, option: Option) -> tuple[str, ...]:
    """``refresh_axes`` as a tuple of mesh axis names.

    Example:
        >>> from galorax.options import OPTION
        >>> check_axes("data", OPTION["refresh_axes"]), check_axes(None, OPTION["refresh_axes"])
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
            f"`{option.name}` must be a mesh axis name or a tuple of distinct names, e.g. "
            f"'data' or ('data', 'replica'), got {value!r}."
        )
    return tuple(axes)


def check_projector_dtype(value: Any, option: Option) -> np.dtype:
    """``projector_dtype`` as a floating numpy dtype.

    Example:
        >>> from galorax.options import OPTION
        >>> check_projector_dtype("bfloat16", OPTION["projector_dtype"]).name
        'bfloat16'
    """
    import jax.numpy as jnp

    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"`{option.name}` must name a floating dtype such as 'float32'.")
    return dtype


def check_precision(value: Any, option: Option) -> Any:
    """``precision`` as given; a precision's name (``"highest"``, the declared default) as
    its ``jax.lax.Precision``, which ``jax.lax`` treats alike.

    Example:
        >>> from galorax.options import OPTION
        >>> import jax
        >>> check_precision("highest", OPTION["precision"]) is jax.lax.Precision.HIGHEST
        True
    """
    if isinstance(value, str):
        import jax

        with contextlib.suppress(ValueError):  # else a DotAlgorithmPreset's name: as given
            return jax.lax.Precision(value)
    return value


def _settings(value: Any, option: Option, settings: type) -> Any:
    """``value`` as ``settings`` or None (``True``: the default settings)."""
    value = settings() if value is True else (value or None)
    if value is not None and not isinstance(value, settings):
        raise TypeError(
            f"`{option.name}` must be a galorax.{settings.__name__} or a bool, got {value!r}."
        )
    return value


def check_residual(value: Any, option: Option) -> Residual | None:
    """``residual`` as :class:`galorax.Residual` settings or None (``True``: the defaults)."""
    from galorax.residual import Residual

    return _settings(value, option, Residual)


def check_adaptive(value: Any, option: Option) -> AdaptiveRefresh | None:
    """``adaptive`` as :class:`galorax.AdaptiveRefresh` settings or None (``True``: the
    defaults)."""
    from galorax.schedule import AdaptiveRefresh

    return _settings(value, option, AdaptiveRefresh)


def check_moment_fields(value: Any, option: Option) -> tuple[tuple[str, str], ...]:
    """``moment_fields`` (field name -> ``"first"``, ``"second"`` or ``"none"``) as sorted pairs.

    Example:
        >>> from galorax.options import OPTION
        >>> check_moment_fields({"ema": "first"}, OPTION["moment_fields"])
        (('ema', 'first'),)
    """
    if value is None:
        return ()
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and v in MOMENT_KINDS for k, v in value.items()
    ):
        raise TypeError(
            f"`{option.name}` must map base-optimizer state field names to 'first', 'second' "
            f"or 'none', e.g. {{'ema': 'first'}}, got {value!r}."
        )
    return tuple(sorted(value.items()))


def check_leafwise_base(value: Any, option: Option) -> bool:
    """``leafwise_base`` as a bool; None is off (:func:`galorax.scale_by_galore` turns it on
    for its default base optimizer before the check).

    Example:
        >>> from galorax.options import OPTION
        >>> check_leafwise_base(None, OPTION["leafwise_base"])
        False
    """
    return False if value is None else check_bool(value, option)


def check_chunking(value: Any, option: Option) -> Chunking:
    """``chunking`` as :class:`galorax.chunking.Chunking` settings (None: the defaults).

    Example:
        >>> from galorax.options import OPTION
        >>> check_chunking(None, OPTION["chunking"]).max_bytes
        4194304
    """
    from galorax import chunking

    return chunking.resolve(value, option.name)
