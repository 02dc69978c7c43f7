"""GaLore Adafactor for PyTorch: galore-torch 1.0's ``GaLoreAdafactor``, on the shared base.

The arithmetic is transformers' Adafactor as galore-torch ships it: a factored second moment
(row and column statistics) of the projected gradient, update clipping by RMS, and the
relative-step and parameter-scaling learning-rate options. Refresh, projection, guards and
state handling are :class:`~galorax.torch.base.GaLoreOptimizer`'s.

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.randn(16, 8))
    >>> opt = GaLoreAdafactor([w], rank=2)  # relative step: no lr needed
    >>> w.grad = torch.randn(16, 8)
    >>> opt.step()
    >>> tuple(opt.state[w]["exp_avg_sq_row"].shape), tuple(opt.state[w]["exp_avg_sq_col"].shape)
    ((16,), (2,))
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from galorax.torch.base import GaLoreOptimizer
from galorax.torch.dtensor import is_dtensor, write_param
from galorax.torch.groups import check_galore_keys
from galorax.torch.projector import rotate_coordinates

__all__ = ["GaLoreAdafactor"]


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.norm(2) / (t.numel() ** 0.5)


class GaLoreAdafactor(GaLoreOptimizer):
    """Adafactor on GaLore-projected gradients; galore-torch 1.0's ``GaLoreAdafactor`` semantics.

    The arithmetic is transformers' Adafactor as galore-torch ships it (factored second moment of
    the projected gradient, update clipping, relative step and parameter scaling options).
    Not supported on FSDP2-sharded parameters (its factored statistics and parameter RMS would
    need all-reduces); DDP is fine.

    Args:
        params: parameters or param groups (GaLore keys as in :class:`~galorax.torch.GaLoreAdamW`).
        lr: external learning rate (None with ``relative_step=True``).
        eps: ``(eps_sq, eps_scale)``.
        clip_threshold: threshold on the RMS of the update.
        decay_rate: exponent of the second-moment decay.
        beta1: first-moment coefficient, or None for none.
        weight_decay: weight decay (``p -= p * weight_decay * lr``).
        scale_parameter: scale the learning rate by the parameter's RMS.
        relative_step: time-dependent learning rate.
        warmup_init: warm-up for the relative step.
        **galore: defaults for the GaLore keys of every group (``skip_nonfinite=True`` as in
            :class:`~galorax.torch.GaLoreAdamW`).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(20, 10))
        >>> opt = GaLoreAdafactor([w], lr=0.1, rank=1, relative_step=False, scale_parameter=False)
        >>> w.grad = torch.ones(20, 10)
        >>> opt.step()
        >>> round(float(w.detach()[0, 0]), 3)
        0.968
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        **galore: Any,
    ):
        if lr is not None and relative_step:
            raise ValueError("Cannot combine manual `lr` and `relative_step=True` options")
        if warmup_init and not relative_step:
            raise ValueError("`warmup_init=True` requires `relative_step=True`")
        check_galore_keys(galore)
        defaults = {
            "lr": lr,
            "eps": eps,
            "clip_threshold": clip_threshold,
            "decay_rate": decay_rate,
            "beta1": beta1,
            "weight_decay": weight_decay,
            "scale_parameter": scale_parameter,
            "relative_step": relative_step,
            "warmup_init": warmup_init,
            **galore,
        }
        super().__init__(params, defaults)

    def update_param(self, p: torch.Tensor, group: dict[str, Any], grad: torch.Tensor) -> None:
        """One Adafactor step of ``p`` from ``grad`` (projected or full)."""
        if is_dtensor(p):
            raise NotImplementedError(
                "GaLoreAdafactor does not support DTensor (FSDP2) parameters; use GaLoreAdamW"
            )
        state = self.state[p]
        g = grad.float()
        if "RMS" not in state:
            # galore-torch resets the step here too (after the first refresh at step 0).
            _init_state(state, g, use_first_moment=group["beta1"] is not None)

        p32 = p.detach().float()
        state["step"] = int(state["step"]) + 1
        state["RMS"] = float(_rms(p32).item())
        lr = _learning_rate(group, state)
        update = _normalized_update(group, state, g)
        update.mul_(lr)
        if group["beta1"] is not None:
            exp_avg = state["exp_avg"]
            exp_avg.mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
            update = exp_avg
        update = self.full_rank_update(p, group, update)
        if group["weight_decay"] != 0:
            p32.add_(p32, alpha=-group["weight_decay"] * lr)
        p32.add_(-update)
        write_param(p, p32)

    def rotate_moments(self, state: dict[str, Any], c: torch.Tensor, side: str) -> None:
        """Rotate the first moment exactly and the rank axis' second-moment statistic."""
        if "RMS" not in state:
            return
        if "exp_avg" in state:
            state["exp_avg"] = rotate_coordinates(state["exp_avg"], c, side)
        # Factored second moment: only the statistic along the rank axis lives in the
        # subspace; rotate its diagonal approximation with C∘C, leave the other one.
        cc = c * c
        if side == "left":
            state["exp_avg_sq_row"] = cc @ state["exp_avg_sq_row"]
        else:
            state["exp_avg_sq_col"] = cc @ state["exp_avg_sq_col"]


def _init_state(state: dict[str, Any], g: torch.Tensor, use_first_moment: bool) -> None:
    """Zero moments shaped like the (projected) gradient ``g``: factored if it is a matrix."""
    shape = g.shape
    state["step"] = 0
    if use_first_moment:
        state["exp_avg"] = torch.zeros_like(g)
    if len(shape) >= 2:
        state["exp_avg_sq_row"] = torch.zeros(shape[:-1], dtype=g.dtype, device=g.device)
        state["exp_avg_sq_col"] = torch.zeros(
            shape[:-2] + shape[-1:], dtype=g.dtype, device=g.device
        )
    else:
        state["exp_avg_sq"] = torch.zeros_like(g)
    state["RMS"] = 0.0


def _learning_rate(group: dict[str, Any], state: dict[str, Any]) -> float:
    """This step's learning rate: external or relative, scaled by the parameter's RMS."""
    lr = group["lr"]
    if group["relative_step"]:
        min_step = 1e-6 * state["step"] if group["warmup_init"] else 1e-2
        lr = min(min_step, 1.0 / math.sqrt(state["step"]))
    if group["scale_parameter"]:
        lr = max(group["eps"][1], state["RMS"]) * lr
    return lr


def _normalized_update(
    group: dict[str, Any], state: dict[str, Any], g: torch.Tensor
) -> torch.Tensor:
    """``g`` over the root of the updated second moment, clipped to RMS ``clip_threshold``."""
    beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
    update = g.square() + group["eps"][0]
    if len(g.shape) >= 2:
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
        col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
        r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        c_factor = col.unsqueeze(-2).rsqrt()
        update = torch.mul(r_factor, c_factor).mul_(g)
    else:
        v = state["exp_avg_sq"]
        v.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
        update = v.rsqrt().mul_(g)
    return update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))
