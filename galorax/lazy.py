"""Lazy re-exports for package ``__init__`` modules (standard library only).

``import galorax`` then costs nothing until a name is used, and ``import galorax.torch``
never imports JAX. The table maps each exported name to the module that defines it.

Example:
    >>> import sys, types
    >>> mod = types.ModuleType("demo")
    >>> sys.modules["demo"] = mod
    >>> mod.__getattr__, mod.__dir__ = lazy_exports("demo", {"sqrt": "math"})
    >>> mod.sqrt(4.0)
    2.0
    >>> "sqrt" in dir(mod)
    True
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_exports(
    package: str,
    table: Mapping[str, str],
    *,
    submodules: Iterable[str] = (),
    hidden: Iterable[str] = (),
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module-level ``__getattr__`` and ``__dir__`` that import ``table[name]`` on first use.

    Args:
        package: The importing module's ``__name__``.
        table: Exported name -> defining module.
        submodules: Names of ``package``'s submodules exported as modules.
        hidden: Names resolved like the others but left out of ``dir()`` (kept for
            compatibility).
    """
    hidden = frozenset(hidden)
    modules = frozenset(submodules)

    def __getattr__(name: str) -> Any:
        if name in modules:
            value: Any = importlib.import_module(f"{package}.{name}")
        elif name in table:
            value = getattr(importlib.import_module(table[name]), name)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        own = vars(sys.modules[package])
        return sorted({*own, *modules, *(n for n in table if n not in hidden)})

    return __getattr__, __dir__
