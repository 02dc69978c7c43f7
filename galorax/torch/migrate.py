"""Migration from galore-torch 1.0: its optimizer state dict, in galorax.torch's format.

galore-torch keeps a ``GaLoreProjector`` object per projected parameter (its ``ortho_matrix``
the projector, r x n for a right projection), and its groups carry only galore-torch's keys
(a group without ``rank`` is not a GaLore group). :func:`from_galore_torch` maps the objects to
galorax's f32 projector tensors (n x r on the right), makes the moments f32, adds the refresh
count and retry flag,
and takes every key a saved group lacks from the loading optimizer's group at the same
position. :meth:`~galorax.torch.base.GaLoreOptimizer.load_state_dict` calls it, so migrating a
running job is ``galorax_opt.load_state_dict(galore_torch_opt.state_dict())`` (in memory: the
pickled projector objects do not load with ``torch.load(weights_only=True)``).

Example:
    >>> import torch
    >>> from types import SimpleNamespace
    >>> w = torch.nn.Parameter(torch.zeros(6, 4))
    >>> current = [{"params": [w], "rank": 2, "update_proj_gap": 5, "proj_type": "std",
    ...             "subspace": "svd"}]
    >>> ortho = torch.linalg.qr(torch.randn(4, 2))[0].T  # galore-torch's right projector, r x n
    >>> saved = {"state": {0: {"step": 7, "projector": SimpleNamespace(ortho_matrix=ortho)}},
    ...          "param_groups": [{"params": [0], "rank": 2, "update_proj_gap": 5,
    ...                            "scale": 1.0, "proj_type": "std"}]}
    >>> out = from_galore_torch(saved, current)
    >>> tuple(out["state"][0]["projector"].shape), out["state"][0]["refreshes"]
    ((4, 2), 2)
    >>> out["param_groups"][0]["subspace"]
    'svd'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from galorax.torch.projector import resolve_side

__all__ = ["from_galore_torch", "is_galore_torch_state"]


def is_galore_torch_state(state_dict: dict[str, Any]) -> bool:
    """Whether ``state_dict`` holds galore-torch projector objects (anything with an
    ``ortho_matrix``) or bitsandbytes' 8-bit state (``state1``)."""
    return any(
        hasattr(v, "ortho_matrix") or k == "state1"
        for st in state_dict["state"].values()
        for k, v in st.items()
    )


def from_galore_torch(
    state_dict: dict[str, Any], param_groups: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """``state_dict`` with galore-torch's projector objects and group keys made galorax's.

    A galorax state dict comes back with its groups completed the same way (a no-op for a
    current one).

    Args:
        state_dict: ``opt.state_dict()`` of a galore-torch 1.0 ``GaLoreAdamW`` or
            ``GaLoreAdafactor`` (or of a galorax optimizer).
        param_groups: the loading optimizer's param groups, built like the saved ones: they
            give the parameters' shapes and the keys the saved groups lack.

    Returns:
        A new state dict (the input is not modified).

    Raises:
        ValueError: bitsandbytes' 8-bit state (galore-torch's ``GaLoreAdamW8bit``), or a
            ``proj_type='full'`` projector.
    """
    groups = []
    for saved, current in zip(state_dict["param_groups"], param_groups, strict=False):
        group = {k: v for k, v in current.items() if k != "params"}
        if "rank" not in saved:  # galore-torch's rule: no rank, no projection
            group["rank"] = None
        group.update(saved)
        groups.append(group)
    groups += state_dict["param_groups"][len(groups) :]  # torch reports the mismatch
    if not is_galore_torch_state(state_dict):
        return {**state_dict, "param_groups": groups}
    shapes = {
        pid: tuple(p.shape)
        for saved, current in zip(groups, param_groups, strict=False)
        for pid, p in zip(saved["params"], current["params"], strict=False)
    }
    group_of = {pid: g for g in groups for pid in g["params"]}
    state = {
        pid: _param_state(st, shapes.get(pid), group_of.get(pid, {}))
        for pid, st in state_dict["state"].items()
    }
    return {"state": state, "param_groups": groups}


def _param_state(
    st: dict[str, Any], shape: tuple[int, ...] | None, group: dict[str, Any]
) -> dict[str, Any]:
    """One parameter's galore-torch state in galorax's format."""
    if "state1" in st:
        raise ValueError(
            "galore-torch's GaLoreAdamW8bit state (bitsandbytes' state1/state2) cannot be "
            "loaded; migrate from its GaLoreAdamW or GaLoreAdafactor"
        )
    # galore-torch keeps the moments in the parameter's dtype; galorax's are f32 (bf16 moments
    # stop decaying), so a bf16 run continues with f32 state.
    out = {
        k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
        for k, v in st.items()
        if not hasattr(v, "ortho_matrix")
    }
    projectors = [v for v in st.values() if hasattr(v, "ortho_matrix")]
    ortho = projectors[0].ortho_matrix if projectors else None
    if ortho is None or shape is None:
        return out
    if not torch.is_tensor(ortho):
        raise ValueError("galore-torch proj_type='full' projectors are not supported")
    proj_type = group.get("proj_type") or group.get("side") or "std"
    side = resolve_side(shape, proj_type)
    # galore-torch stores a right projector as Vh[:r] (r x n) in the parameter's dtype.
    out["projector"] = (ortho.T if side == "right" else ortho).float().contiguous()
    step = int(out.get("step", 0))
    gap = int(group.get("update_proj_gap", 200))
    # Refreshes so far (galore-torch's at steps 0, gap, 2 gap, ... before `step`): only
    # seeds the randomized refresh.
    out["refreshes"] = (step - 1) // gap + 1 if step > 0 else 0
    out["retry"] = 0
    return out
