"""``skip_nonfinite=True``: a parameter whose gradient is not all finite is left as it was.

The torch counterpart of :func:`galorax.scale_by_galore`'s ``skip_nonfinite``, per parameter:
the update runs on a zeroed gradient and then every tensor it touched (the parameter, its
moments, its projector) is put back with ``torch.where`` on a 0-d flag, so there is no host read
and no data-dependent Python branch: the step stays ``torch.compile(fullgraph=True)``-able.
Plain-number state advances (``state["step"]``, so the next bias correction and the refresh
schedule use the later count, as the JAX API's ``count``); a refresh never takes a non-finite
gradient anyway (it keeps the previous projector and retries at the next step).

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(3))
    >>> state = {"m": torch.zeros(3)}
    >>> def update(g):  # a toy optimizer: a moment and a step
    ...     state["m"].add_(g)
    ...     w.data.sub_(state["m"])
    >>> update_or_keep(update, w, state, torch.tensor([1.0, float("nan"), 0.0]))
    >>> w.detach().tolist(), state["m"].tolist()
    ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    >>> update_or_keep(update, w, state, torch.tensor([1.0, 2.0, 0.0]))
    >>> w.detach().tolist()
    [0.0, -1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from galorax.torch.dtensor import LocalView

__all__ = ["all_finite", "update_or_keep"]


def all_finite(p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor: every element of ``grad`` (``p``'s, local if sharded) is finite.

    For a row-sharded (FSDP2) parameter the count of non-finite elements is all-reduced, so
    every process takes the same decision for the whole parameter.
    """
    view = LocalView(p, grad)
    assert view.grad is not None
    bad = (~torch.isfinite(view.grad)).sum(dtype=torch.float32).reshape(1)
    if view.reduce is not None:  # every process, whatever its shard: the same collectives
        bad = view.reduce(bad)
    return bad[0] == 0


@torch.no_grad()
def update_or_keep(
    update: Callable[[torch.Tensor], None],
    p: torch.Tensor,
    state: dict[str, Any],
    grad: torch.Tensor,
) -> None:
    """Run ``update(grad)``; if ``grad`` is not all finite, undo it on ``p`` and ``state``.

    Args:
        update: applies the optimizer's update of ``p`` from a gradient, in place (it may also
            replace tensors in ``state``, e.g. rotated or requantized moments).
        p: the parameter.
        state: its optimizer state; every tensor in it is restored on a skip.
        grad: the gradient ``update`` takes (projected or full); never non-finite inside
            ``update``, which sees zeros instead.
    """
    ok = all_finite(p, grad)
    local = LocalView(p, None).param
    saved = {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}
    saved_param = local.clone()
    update(torch.where(ok, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)))
    local.copy_(torch.where(ok, local, saved_param))
    for key, old in saved.items():
        new = state.get(key)
        # The optimizers keep each state tensor's shape and dtype from step to step, so the
        # choice is an elementwise select, in place (the tensor's identity is kept too).
        if torch.is_tensor(new) and new.shape == old.shape and new.dtype == old.dtype:
            new.copy_(torch.where(ok, new, old))
