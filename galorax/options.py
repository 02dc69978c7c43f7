"""The options of :func:`galorax.scale_by_galore`, each declared once in :data:`OPTIONS`.

A declaration (:class:`Option`) gives an option's name, type, default, check and one line of
doc. Everything else is built from it: :func:`galore_options` checks the given values, once,
when the transform is built (not when it first runs), into one frozen :class:`GaLoreOptions`
that the per-leaf code and the transform read; the application's command line takes its
GaLore flags' choices and defaults from it (the application's config) and ``galorax.torch`` its
param-group keys (``galorax.torch.groups``). ``scale_by_galore`` and ``galore`` write their
signatures out, for readers and type checkers; a test holds them to the declarations.

Adding an option: its :class:`Option` here (with a check of :mod:`galorax.option_checks`),
its field in :class:`GaLoreOptions`, its keyword in the two signatures and its paragraph in
``scale_by_galore``'s docstring (the tests name whichever is missing), and its use.

This module imports no JAX (the checks import JAX and the settings' modules when they run):
``galorax.torch`` reads :data:`OPTIONS`, and must not load JAX.

Example:
    >>> OPTION["moments"].default, OPTION["moments"].choices
    ('rotate', ('keep', 'align', 'rotate'))
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from inspect import Parameter, Signature
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np

from galorax.option_checks import (
    MOMENTS,
    PROJECTOR_BITS,
    SIDES,
    SUBSPACES,
    MomentKind,
    Moments,
    Option,
    Side,
    check_adaptive,
    check_axes,
    check_base_optimizer,
    check_bool,
    check_choice,
    check_chunking,
    check_leafwise_base,
    check_moment_fields,
    check_positive_int,
    check_precision,
    check_projector_bits,
    check_projector_dtype,
    check_residual,
    check_scale,
    check_subspace,
)

if TYPE_CHECKING:
    from typing import TypeAlias

    import jax

    from galorax.chunking import Chunking
    from galorax.residual import Residual
    from galorax.schedule import AdaptiveRefresh
    from galorax.subspace import Randomized

    Subspace: TypeAlias = Literal["randomized", "svd"] | Randomized

_F = TypeVar("_F", bound=Callable[..., Any])

__all__ = [
    "OPTION",
    "OPTIONS",
    "GaLoreOptions",
    "MomentKind",
    "Moments",
    "Option",
    "Side",
    "check_base_optimizer",
    "document_options",
    "galore_options",
    "given_options",
    "with_keywords_of",
]

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


def with_keywords_of(like: Callable[..., Any]) -> Callable[[_F], _F]:
    """Decorates an alias that forwards ``**options`` to ``like`` (``galore`` to
    ``scale_by_galore``): its signature shows ``like``'s keyword-only parameters in place of
    ``**options`` (``inspect.signature``, ``help``, ``optax.inject_hyperparams``), written
    once, in ``like``'s signature.

    Example:
        >>> def f(a, *, b=1): ...
        >>> @with_keywords_of(f)
        ... def g(x, **options): ...
        >>> import inspect
        >>> str(inspect.signature(g))
        '(x, *, b=1)'
    """

    def decorate(fn: _F) -> _F:
        own = inspect.signature(fn)
        kept = [p for p in own.parameters.values() if p.kind is not Parameter.VAR_KEYWORD]
        extra = inspect.signature(like).parameters.values()
        keywords = [p for p in extra if p.kind is Parameter.KEYWORD_ONLY]
        fn.__signature__ = own.replace(parameters=[*kept, *keywords])  # type: ignore[attr-defined]
        return fn

    return decorate


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
