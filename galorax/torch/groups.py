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

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch

from galorax.options import OPTION
from galorax.torch.dtensor import local_tensor
from galorax.torch.projector import PROJ_TYPES, resolve_side

__all__ = [
    "GALORE_DEFAULTS",
    "MOMENTS",
    "check_galore_keys",
    "check_group",
    "check_moment_shapes",
    "check_real",
    "check_saved_groups",
    "normalize_group",
]

#: The options of the JAX API (:data:`galorax.options.OPTIONS`) that are param-group keys too,
#: with the same names, meanings and choices.
SHARED_KEYS = (
    "rank",
    "update_proj_gap",
    "scale",
    "side",
    "subspace",
    "moments",
    "stagger",
    "skip_nonfinite",
)
#: Where a param group's default differs from the JAX API's, and why.
TORCH_DEFAULTS: dict[str, Any] = {
    # galore-torch's rule: a group is a GaLore group when its rank is not None
    "rank": None,
    # galore-torch's 'std' trains better than 'auto' (least state) on a small Llama:
    # BENCHMARKS.md, "Small Llama in PyTorch"
    "side": "std",
}
#: Defaults of the GaLore keys of a param group. A group is a GaLore group when its ``rank`` is
#: not None; galore-torch's keys (``rank``, ``update_proj_gap``, ``scale``, ``proj_type``) keep
#: their meaning, the rest are galorax's, under the JAX API's names: its declared defaults
#: (:data:`SHARED_KEYS`) but :data:`TORCH_DEFAULTS`, then the keys of the torch port only.
GALORE_DEFAULTS: dict[str, Any] = {
    **{name: OPTION[name].default for name in SHARED_KEYS},
    **TORCH_DEFAULTS,
    "proj_type": None,  # galore-torch's name; None -> `side`
    # subspace=galorax.Randomized(...)'s settings, flattened (normalize_group)
    "power_iters": 1,
    "oversample": 8,
    "warm_start": True,
    "seed": 0,
}

#: How moments follow a refreshed subspace: as galore-torch (``'keep'``), sign-aligned, rotated.
MOMENTS: tuple[str, ...] = OPTION["moments"].choices


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
    if group.get("proj_type") is not None and group.get("side") not in (None, "std"):
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
    lr = group.get("lr")
    if lr is not None and (isinstance(lr, bool) or not math.isfinite(float(lr))):
        raise ValueError(f"lr must be a finite number, got {lr!r}")
    if group.get("rank") is None:
        return
    rank = group["rank"]
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise ValueError(f"rank must be a positive integer (or None: no GaLore), got {rank!r}")
    if int(rank) < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if int(group["update_proj_gap"]) < 1:
        raise ValueError(f"update_proj_gap must be >= 1, got {group['update_proj_gap']}")
    if group["proj_type"] == "full":
        raise ValueError("proj_type='full' (two-sided projection) is not supported")
    for key in ("proj_type", "side"):
        if group[key] is not None and group[key] not in PROJ_TYPES:
            raise ValueError(f"{key} must be one of {PROJ_TYPES}, got {group[key]!r}")
    if group["subspace"] not in OPTION["subspace"].choices:
        raise ValueError(f"subspace must be 'svd' or 'randomized', got {group['subspace']!r}")
    if group["moments"] not in MOMENTS:
        raise ValueError(f"moments must be one of {MOMENTS}, got {group['moments']!r}")


def check_real(group: Mapping[str, Any], index: int) -> None:
    """Raise ``TypeError`` naming the first complex parameter of param group ``index``.

    Example:
        >>> import torch
        >>> try:
        ...     check_real({"params": [torch.zeros(2, 2, dtype=torch.complex64)]}, 0)
        ... except TypeError as e:
        ...     print(str(e)[:56])
        param_groups[0]['params'][0] (shape (2, 2)) is complex (
    """
    names = group.get("param_names") or []
    for i, p in enumerate(group["params"]):
        if p.is_complex():
            name = f"{names[i]!r} " if i < len(names) else ""
            raise TypeError(
                f"{name}param_groups[{index}]['params'][{i}] (shape {tuple(p.shape)}) is complex "
                f"({p.dtype}): galorax.torch optimizes real parameters; pass "
                "torch.view_as_real(p) as a real parameter"
            )


def check_saved_groups(saved: Any, groups: Any) -> None:
    """Raise ``ValueError`` naming the first saved param group that does not match ``groups``
    (count, then sizes): before anything loads, not later in a matmul."""
    saved_groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    if not isinstance(saved_groups, list) or not isinstance(saved.get("state"), Mapping):
        raise ValueError("not an optimizer state dict (no 'param_groups' list and 'state')")
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"the state dict has {len(saved_groups)} param groups, this optimizer "
            f"{len(groups)}; build the optimizer with the param groups it was saved with"
        )
    for i, (s, g) in enumerate(zip(saved_groups, groups, strict=True)):
        if len(s["params"]) != len(g["params"]):
            raise ValueError(
                f"param_groups[{i}] holds {len(s['params'])} parameters in the state dict, "
                f"{len(g['params'])} here; build the optimizer with the parameters it was "
                "saved with"
            )


def check_moment_shapes(
    state_dict: Mapping[str, Any],
    groups: list[dict[str, Any]],
    is_projected: Callable[[torch.Tensor, dict[str, Any]], bool],
) -> None:
    """Raise ``ValueError`` naming the first parameter whose saved first moment cannot be its
    own: full-rank ones must have its shape, projected ones share a side with it."""
    for gi, (saved, group) in enumerate(zip(state_dict["param_groups"], groups, strict=True)):
        for pi, (pid, p) in enumerate(zip(saved["params"], group["params"], strict=True)):
            m = (state_dict["state"].get(pid) or {}).get("exp_avg")
            if not torch.is_tensor(m):
                continue
            shape, got = tuple(local_tensor(p).shape), tuple(m.shape)
            if is_projected(p, {**group, **saved}) and len(got) == 2:
                fits = all(a <= b for a, b in zip(got, shape, strict=True))
                fits = fits and (got[0] == shape[0] or got[1] == shape[1])
            else:
                fits = got == shape
            if not fits:
                raise ValueError(
                    f"param_groups[{gi}]['params'][{pi}] has shape {shape} but its saved "
                    f"exp_avg {got}: the state dict is another model's (or in another "
                    "parameter order)"
                )
