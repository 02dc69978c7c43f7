"""The options of :func:`galorax.scale_by_galore`, each declared once in :data:`OPTIONS`.

A declaration (:class:`Option`) gives an option's name, type, default, check and one line of
doc. Everything else is built from it: :func:`galore_options` checks the given values, once,
when the transform is built (not when it first runs), into one frozen :class:`GaLoreOptions`
that the per-leaf code and the transform read; the application's command line takes its
GaLore flags' choices and defaults from it (``galorax.app.config``) and ``galorax.torch`` its
param-group keys (``galorax.torch.groups``). ``scale_by_galore`` and ``galore`` write their
signatures out, for readers and type checkers; a test holds them to the declarations.

Adding an option: its :class:`Option` here, its field in :class:`GaLoreOptions`, its
keyword in the two signatures and its paragraph in ``scale_by_galore``'s docstring (the tests
name whichever is missing), and its use.

This module imports no JAX (the checks import JAX and the settings' modules when they run):
``galorax.torch`` reads :data:`OPTIONS`, and must not load JAX.

Example:
    >>> OPTION["moments"].default, OPTION["moments"].choices
    ('rotate', ('keep', 'align', 'rotate'))
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from inspect import Parameter, Signature
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args

import numpy as np

if TYPE_CHECKING:
    from typing import TypeAlias

    import jax

    from galorax.chunking import Chunking
    from galorax.residual import Residual
    from galorax.schedule import AdaptiveRefresh
    from galorax.subspace import Randomized

    Subspace: TypeAlias = Literal["randomized", "svd"] | Randomized

_F = TypeVar("_F", bound=Callable[..., Any])

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
        >>> check_choice("left", OPTION["side"])
        'left'
    """
    if value not in option.choices:
        raise ValueError(f"`{option.name}` must be one of {option.choices}, got {value!r}.")
    return value


def check_subspace(value: Any, option: Option) -> Randomized | None:
    """The refresh's :class:`galorax.Randomized` settings, or None for the exact SVD.

    Example:
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
        >>> check_leafwise_base(None, OPTION["leafwise_base"])
        False
    """
    return False if value is None else check_bool(value, option)


def check_chunking(value: Any, option: Option) -> Chunking:
    """``chunking`` as :class:`galorax.chunking.Chunking` settings (None: the defaults).

    Example:
        >>> check_chunking(None, OPTION["chunking"]).max_bytes
        4194304
    """
    from galorax import chunking

    return chunking.resolve(value, option.name)


#: Every option of :func:`galorax.scale_by_galore`, in the order of its signature: optax's
#: positional arguments first (``base_optimizer`` and ``weight_dimension_numbers``, which are
#: not GaLore settings, come between them and the keyword-only ones there).
# fmt: off
OPTIONS: tuple[Option, ...] = (
    Option("rank", "int", 128, check_positive_int,
           "target rank of the projection (clipped to min(m, n) per matrix)", positional=True),
    Option("update_proj_gap", "int", 200, check_positive_int,
           "steps between projector refreshes", positional=True),
    Option("scale", "float", 1.0, check_scale,
           "factor applied to the projected updates", positional=True),
    Option("subspace", "Subspace", "randomized", check_subspace,
           "how a refresh finds the subspace: 'randomized' (or a galorax.Randomized) or 'svd'",
           choices=SUBSPACES),
    Option("moments", "Moments", "rotate", check_choice,
           "the base optimizer's moments at a refresh: 'keep', 'align' or 'rotate' them",
           choices=MOMENTS),
    Option("stagger", "bool", True, check_bool,
           "spread the leaves' refreshes over the gap"),
    Option("side", "Side", "auto", check_choice,
           "which side of each matrix to project ('auto': least state)", choices=SIDES),
    Option("projector_dtype", "Any", "float32", check_projector_dtype,
           "storage dtype of the projectors"),
    # jax.lax.Precision.HIGHEST, by name: this module imports no JAX
    Option("precision", "jax.lax.Precision | str | None", "highest", check_precision,
           "matmul precision of the projections and the refresh"),
    Option("residual", "Residual | bool | None", None, check_residual,
           "add back the gradient outside the subspace, Fira-scaled (galorax.Residual)"),
    Option("adaptive", "AdaptiveRefresh | bool | None", None, check_adaptive,
           "lengthen stable slices' refresh gaps (galorax.AdaptiveRefresh)"),
    Option("projector_bits", "int | None", None, check_projector_bits,
           "store the projectors quantized in 8 or 4 bits (3.9x / 7.8x fewer bytes)",
           choices=PROJECTOR_BITS),
    Option("refresh_axes", "str | Sequence[str] | None", None, check_axes,
           "data-parallel mesh axes to split stacked weights' refreshes over"),
    Option("skip_nonfinite", "bool", False, check_bool,
           "leave a leaf with a non-finite gradient untouched (zero update)"),
    Option("moment_fields", "Mapping[str, MomentKind] | None", None, check_moment_fields,
           "how unknown base-state fields move at a refresh ('first', 'second', 'none')"),
    Option("leafwise_base", "bool | None", None, check_leafwise_base,
           "run the base optimizer one leaf at a time (None: for the default base optimizer)"),
    Option("chunking", "Chunking | None", None, check_chunking,
           "how large leaves are updated in bounded chunks (None: Chunking()'s defaults)"),
)
# fmt: on
#: The declarations by name.
OPTION: Mapping[str, Option] = {o.name: o for o in OPTIONS}


def given_options(scope: Mapping[str, Any]) -> dict[str, Any]:
    """The declared options' values in ``scope``, by name: what a function that takes them
    all (``scale_by_galore``, ``galore``) was given, from its ``locals()``.

    Example:
        >>> scope = {o.name: o.default for o in OPTIONS} | {"learning_rate": 0.1, "rank": 4}
        >>> given = given_options(scope)
        >>> given["rank"], "learning_rate" in given, list(given) == list(OPTION)
        (4, False, True)
    """
    return {o.name: scope[o.name] for o in OPTIONS}


def document_options(fn: _F) -> _F:
    """Appends a ``Keyword Args`` section to ``fn``'s docstring: each keyword-only option
    and its line of doc (``galore``'s, which passes them to ``scale_by_galore``).

    Example:
        >>> @document_options
        ... def f():
        ...     "Does f."
        >>> f.__doc__.splitlines()[2:4]  # doctest: +ELLIPSIS
        ['    Keyword Args:', "        subspace: How a refresh finds the subspace: ..."]
    """
    if fn.__doc__:  # None under python -OO
        lines = "".join(
            f"\n        {o.name}: {o.doc[0].upper()}{o.doc[1:]}."
            for o in OPTIONS
            if not o.positional
        )
        fn.__doc__ = f"{fn.__doc__.rstrip()}\n\n    Keyword Args:{lines}\n"
    return fn


@dataclasses.dataclass(frozen=True)
class GaLoreOptions:
    """The checked options of :func:`galorax.scale_by_galore`, built by :func:`galore_options`.

    One field per :data:`OPTIONS` entry, in their order, resolved: ``subspace`` is the
    :class:`galorax.Randomized` settings or None (exact SVD), ``residual``/``adaptive``
    their settings or None, ``projector_dtype`` a dtype, ``refresh_axes`` a tuple and
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
    skip_nonfinite: bool
    moment_fields: tuple[tuple[str, str], ...]
    leafwise_base: bool
    chunking: Chunking


#: :func:`galore_options`' signature: the declarations, as ``scale_by_galore`` takes them.
_SIGNATURE = Signature(
    [
        Parameter(
            o.name,
            Parameter.POSITIONAL_OR_KEYWORD if o.positional else Parameter.KEYWORD_ONLY,
            default=o.default,
        )
        for o in OPTIONS
    ]
)


def galore_options(*args: Any, **kwargs: Any) -> GaLoreOptions:
    """Checks :func:`galorax.scale_by_galore`'s options and resolves them (see there).

    Takes them as ``scale_by_galore`` does (``rank``, ``update_proj_gap`` and ``scale`` may
    come positionally); one left out takes its declared default (:data:`OPTIONS`).

    Raises:
        TypeError, ValueError: An argument is not what it may be; the message names it.

    Example:
        >>> opts = galore_options(8, 50, subspace="svd", residual=True)
        >>> opts.subspace is None, opts.residual, opts.refresh_axes
        (True, Residual(granularity='channel', limit=1.01), ())
    """
    given = _SIGNATURE.bind(*args, **kwargs)
    given.apply_defaults()
    return GaLoreOptions(**{o.name: o.check(given.arguments[o.name], o) for o in OPTIONS})


galore_options.__signature__ = _SIGNATURE  # type: ignore[attr-defined]
