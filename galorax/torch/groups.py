"""The GaLore keys of a param group: their defaults, and the checks every optimizer runs.

A param group is a GaLore group when its ``rank`` is not None (galore-torch's rule). The
groups are plain dicts; the checks run when an optimizer adds a group, so a bad value fails at
construction rather than at the first refresh.

Example:
    >>> group = {**GALORE_DEFAULTS, "rank": 4, "moments": "spin"}
    >>> check_group(group)
    Traceback (most recent call last):
        ...
    ValueError: moments must be one of ('keep', 'align', 'rotate'), got 'spin'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from galorax.torch.projector import PROJ_TYPES, resolve_side

__all__ = ["GALORE_DEFAULTS", "MOMENTS", "check_galore_keys", "check_group", "normalize_group"]

#: Defaults of the GaLore keys of a param group. A group is a GaLore group when its ``rank`` is
#: not None; galore-torch's keys (``rank``, ``update_proj_gap``, ``scale``, ``proj_type``) keep
#: their meaning, the rest are galorax's, under the JAX API's names.
GALORE_DEFAULTS: dict[str, Any] = {
    "rank": None,
    "update_proj_gap": 200,
    "scale": 1.0,
    "proj_type": None,  # galore-torch's name; None -> `side`
    "side": "auto",  # galorax's name: 'auto' (least state), 'left', 'right'
    "subspace": "randomized",  # or 'svd'
    "power_iters": 1,
    "oversample": 8,
    "warm_start": True,
    "moments": "rotate",  # 'keep' (galore-torch), 'align', 'rotate'
    "stagger": True,
    "seed": 0,
}

#: How moments follow a refreshed subspace: as galore-torch (``'keep'``), sign-aligned, rotated.
MOMENTS = ("keep", "align", "rotate")


def check_galore_keys(galore: Mapping[str, Any]) -> None:
    """Reject constructor keywords that are not GaLore keys (a typo would silently do nothing).

    Example:
        >>> check_galore_keys({"rnak": 4})
        Traceback (most recent call last):
            ...
        TypeError: unknown arguments: ['rnak']
    """
    unknown = set(galore) - set(GALORE_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown arguments: {sorted(unknown)}")


def normalize_group(group: dict[str, Any]) -> None:
    """Flatten a JAX-style ``subspace`` settings object into plain keys, in place.

    ``subspace=galorax.Randomized(...)`` becomes ``subspace='randomized'`` plus its
    ``power_iters``, ``oversample``, ``warm_start`` and ``seed``, so the param groups (and so the
    state dict) hold plain values only. Also rejects a ``proj_type`` and a ``side`` that
    disagree.

    Example:
        >>> from types import SimpleNamespace
        >>> group = {**GALORE_DEFAULTS, "rank": 2}
        >>> group["subspace"] = SimpleNamespace(power_iters=3, oversample=2)
        >>> normalize_group(group)
        >>> group["subspace"], group["power_iters"], group["oversample"], group["seed"]
        ('randomized', 3, 2, 0)
    """
    settings = group.get("subspace")
    if not isinstance(settings, str) and hasattr(settings, "power_iters"):
        for key in ("power_iters", "oversample", "warm_start", "seed"):
            group[key] = getattr(settings, key, group[key])
        group["subspace"] = "randomized"
    if group.get("proj_type") is not None and group.get("side") not in (None, "auto"):
        if resolve_side((2, 1), group["proj_type"]) != resolve_side((2, 1), group["side"]):
            raise ValueError("give either proj_type (galore-torch) or side (galorax), not both")


def check_group(group: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` on an invalid GaLore key of ``group``; non-GaLore groups pass.

    Example:
        >>> check_group({**GALORE_DEFAULTS, "rank": 4})  # valid: returns None
        >>> check_group({**GALORE_DEFAULTS, "rank": 0})
        Traceback (most recent call last):
            ...
        ValueError: rank must be >= 1, got 0
    """
    if group.get("rank") is None:
        return
    if int(group["rank"]) < 1:
        raise ValueError(f"rank must be >= 1, got {group['rank']}")
    if int(group["update_proj_gap"]) < 1:
        raise ValueError(f"update_proj_gap must be >= 1, got {group['update_proj_gap']}")
    if group["proj_type"] == "full":
        raise ValueError("proj_type='full' (two-sided projection) is not supported")
    for key in ("proj_type", "side"):
        if group[key] is not None and group[key] not in PROJ_TYPES:
            raise ValueError(f"{key} must be one of {PROJ_TYPES}, got {group[key]!r}")
    if group["subspace"] not in ("svd", "randomized"):
        raise ValueError(f"subspace must be 'svd' or 'randomized', got {group['subspace']!r}")
    if group["moments"] not in MOMENTS:
        raise ValueError(f"moments must be one of {MOMENTS}, got {group['moments']!r}")
