"""Param groups from module names: the Hugging Face Trainer's ``optim_target_modules``.

:func:`param_groups` splits a model's parameters the way the Trainer does for
``optim="galore_adamw"``: the weights of the ``nn.Linear`` modules whose names match
``target_modules`` form the GaLore group, everything else a plain group.

Example:
    >>> import torch
    >>> model = torch.nn.ModuleDict({"attn": torch.nn.Linear(8, 8), "norm": torch.nn.LayerNorm(8)})
    >>> plain, galore = param_groups(model, ["attn"], rank=4)
    >>> len(plain["params"]), len(galore["params"]), galore["rank"], galore["proj_type"]
    (3, 1, 4, 'std')
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from galorax.torch.groups import GALORE_DEFAULTS, check_galore_keys

__all__ = ["apollo_param_groups", "matches_target", "param_groups", "split_targets"]


def matches_target(target_modules: str | Sequence[str], name: str) -> bool:
    """Whether module ``name`` is targeted (transformers' ``check_target_module_exists``).

    A string is one regex, matched against the whole name; a list matches when it holds the
    name, when one of its entries is a substring of the name, or when one fully matches it
    as a regex.

    Example:
        >>> matches_target(["q_proj", "v_proj"], "model.layers.0.self_attn.q_proj")
        True
        >>> matches_target(r".*\\.mlp\\..*", "model.layers.0.self_attn.q_proj")
        False
    """
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return (
        name in target_modules
        or any(t in name for t in target_modules)
        or any(re.fullmatch(t, name) is not None for t in target_modules)
    )


def param_groups(
    model: torch.nn.Module,
    target_modules: str | Sequence[str],
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    **galore: Any,
) -> list[dict[str, Any]]:
    """The Trainer's GaLore param groups: ``[plain, galore]``, for any galorax.torch optimizer.

    The defaults are the Trainer's (``optim_args`` unset: rank 128, gap 200, scale 0.25,
    ``proj_type='std'``), and so is the group order (the plain group first), so a galore-torch
    state dict saved by the Trainer loads into an optimizer built on these groups.

    Args:
        model: the model.
        target_modules: module names or regexes (:func:`matches_target`), or ``'all-linear'``.
        rank: the GaLore group's rank.
        update_proj_gap: steps between projector refreshes.
        scale: factor on the projected-back update.
        proj_type: galore-torch's projection side.
        **galore: more GaLore keys for the GaLore group (``subspace=``, ``moments=``, ...).

    Returns:
        ``[{"params": rest}, {"params": weights, "rank": ..., ...}]``; every parameter is in
        exactly one group (a weight shared with another module counts as targeted).

    Raises:
        ValueError: no ``nn.Linear`` module matches.
        TypeError: ``target_modules`` is neither a string nor a list of strings, or a key in
            ``galore`` is not a GaLore key.
    """
    check_galore_keys(galore)
    rest, targeted = split_targets(model, target_modules)
    galore_group = {
        "params": targeted,
        "rank": rank,
        "update_proj_gap": update_proj_gap,
        "scale": scale,
        "proj_type": proj_type,
        **galore,
    }
    return [{"params": rest}, galore_group]


def apollo_param_groups(
    model: torch.nn.Module,
    target_modules: str | Sequence[str],
    rank: int = 128,
    proj: str = "random",
    scale_type: str = "channel",
    update_proj_gap: int = 200,
    scale: float = 1.0,
    proj_type: str = "std",
    **apollo: Any,
) -> list[dict[str, Any]]:
    """The Trainer's APOLLO param groups (``optim="apollo_adamw"``): ``[plain, apollo]``.

    As :func:`param_groups`, with the APOLLO group's keys and defaults the Trainer's
    (``optim_args`` unset: rank 128, ``proj='random'``, ``scale_type='channel'``, gap 200,
    scale 1.0, ``proj_type='std'``), for :class:`~galorax.torch.ApolloAdamW`.

    Args:
        model, target_modules: as :func:`param_groups`.
        rank, proj, scale_type, update_proj_gap, scale, proj_type: the APOLLO group's keys.
        **apollo: more keys for the APOLLO group (``growth=``, ``seed=``, ...).

    Example:
        >>> model = torch.nn.ModuleDict({"mlp": torch.nn.Linear(8, 8)})
        >>> plain, apollo = apollo_param_groups(model, ["mlp"], rank=1, scale_type="tensor")
        >>> len(plain["params"]), apollo["rank"], apollo["proj"], apollo["scale"]
        (1, 1, 'random', 1.0)
    """
    from galorax.torch.apollo import APOLLO_DEFAULTS

    unknown = set(apollo) - set(GALORE_DEFAULTS) - set(APOLLO_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown arguments: {sorted(unknown)}")
    rest, targeted = split_targets(model, target_modules)
    group = {
        "params": targeted,
        "rank": rank,
        "proj": proj,
        "scale_type": scale_type,
        "update_proj_gap": update_proj_gap,
        "scale": scale,
        "proj_type": proj_type,
        **apollo,
    }
    return [{"params": rest}, group]


def split_targets(
    model: torch.nn.Module, target_modules: str | Sequence[str]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(rest, weights)``: the weights of the targeted ``nn.Linear`` modules and every other
    parameter, as the Trainer splits them (:func:`param_groups`).

    Raises:
        ValueError: no ``nn.Linear`` module matches.
        TypeError: ``target_modules`` is neither a string nor a list of strings.
    """
    if not isinstance(target_modules, (str, list, tuple)):
        raise TypeError(f"target_modules must be a str or a list of str, got {target_modules!r}")
    all_linear = isinstance(target_modules, str) and target_modules.replace("_", "-") == (
        "all-linear"
    )
    targeted: dict[int, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (
            all_linear or matches_target(target_modules, name)
        ):
            targeted.setdefault(id(module.weight), module.weight)
    if not targeted:
        raise ValueError(f"no nn.Linear module matches target_modules={target_modules!r}")
    rest: list[torch.Tensor] = [p for p in model.parameters() if id(p) not in targeted]
    return rest, list(targeted.values())
