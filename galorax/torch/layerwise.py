"""Layer-wise GaLore: update each parameter from its own post-accumulate-grad hook.

Updating a parameter as soon as its gradient is final, and dropping that gradient, means the
full set of gradients never lives in memory at once (the paper's 7B-on-24GB recipe). Unlike
galore-torch/Hugging Face's layer-wise mode, :class:`LayerwiseGaLore`

* respects gradient accumulation: a parameter is updated on the last of
  ``accumulation_steps`` micro-batches only;
* respects gradient clipping by global norm, exactly: with ``max_grad_norm`` set, a
  projected parameter's hook refreshes its projector, projects its gradient (small, r x n),
  records the full gradient's squared norm and drops the full gradient; :meth:`step` then
  computes the global norm and applies the clipped updates (projection is linear, so
  clipping the projected gradient is clipping the gradient). Non-projected parameters keep
  their gradient until then;
* keeps one optimizer (a :class:`~galorax.torch.GaLoreAdamW` or ``GaLoreAdafactor``) whose
  ``state_dict`` is the same as in the plain mode, and one learning-rate scheduler on it,
  stepped once per optimizer step.

Not for DDP/FSDP: their gradient reduction ends after the hooks run.

Example:
    >>> import torch
    >>> from galorax.torch import GaLoreAdamW
    >>> model = torch.nn.Linear(16, 8)
    >>> opt = GaLoreAdamW([{"params": [model.weight], "rank": 2}, {"params": [model.bias]}])
    >>> lw = LayerwiseGaLore(opt, accumulation_steps=2, max_grad_norm=1.0)
    >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    >>> for _ in range(2):  # two micro-batches
    ...     model(torch.randn(4, 16)).sum().backward()
    >>> lw.step(); sched.step()
    >>> opt.state[model.weight]["step"], model.weight.grad is None
    (1, True)
    >>> lw.remove()
"""

from __future__ import annotations

import math
from typing import Any

import torch

from galorax.torch.base import GaLoreOptimizer

__all__ = ["LayerwiseGaLore"]


class LayerwiseGaLore:
    """Drive a GaLore optimizer from per-parameter gradient hooks.

    Args:
        optimizer: a :class:`~galorax.torch.base.GaLoreOptimizer` (``GaLoreAdamW``,
            ``GaLoreAdamW8bit``, ``GaLoreAdafactor``) over the parameters to update layer-wise
            (schedulers attach to it, as usual).
        accumulation_steps: micro-batches (backward passes) per optimizer step.
        max_grad_norm: clip the global 2-norm of the (accumulated) gradient to this; None: no
            clipping (parameters are then updated inside the backward pass).

    Call :meth:`step` once per optimizer step, after the last micro-batch's backward: it
    applies the clipped updates and updates any parameter whose gradient did not arrive
    ``accumulation_steps`` times (e.g. one unused in some micro-batch). The global gradient
    norm before clipping is in :attr:`last_grad_norm` (when clipping).
    """

    def __init__(
        self,
        optimizer: GaLoreOptimizer,
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
    ):
        if not isinstance(optimizer, GaLoreOptimizer):
            raise TypeError("LayerwiseGaLore drives a galorax.torch GaLore optimizer")
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        self.optimizer = optimizer
        self.accumulation_steps = int(accumulation_steps)
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm: float | None = None
        self._count: dict[int, int] = {}
        self._pending: dict[int, tuple[torch.Tensor, dict[str, Any], torch.Tensor, float]] = {}
        self._handles = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's param groups (learning rates live here)."""
        return self.optimizer.param_groups

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state dict: the same as in the plain mode."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the optimizer's state dict."""
        self.optimizer.load_state_dict(state_dict)

    def remove(self) -> None:
        """Remove the hooks (the model then trains with the plain ``optimizer.step()``)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop leftover gradients and any pending update (the hooks already drop theirs)."""
        self._pending.clear()
        self._count.clear()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        key = id(p)
        self._count[key] = self._count.get(key, 0) + 1
        if self._count[key] < self.accumulation_steps:
            return  # keep accumulating into p.grad
        self._count[key] = 0
        self._finalize(p)

    def _finalize(self, p: torch.Tensor) -> None:
        grad = p.grad
        if grad is None:
            return
        opt = self.optimizer
        group = opt.group_of(p)
        if self.max_grad_norm is None:
            g = opt.prepare(p, group, grad)
            p.grad = None
            opt.update_param(p, group, g)
            return
        sq = float(grad.detach().float().square().sum().item())
        g = opt.prepare(p, group, grad)
        p.grad = None  # a projected gradient is now r x n; the full one can go
        self._pending[id(p)] = (p, group, g, sq)

    @torch.no_grad()
    def step(self) -> None:
        """Finish the optimizer step: leftover gradients, clipping, pending updates."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._finalize(p)
        self._count.clear()
        if self.max_grad_norm is not None:
            self._apply_pending()
        # Nothing has a gradient left, so this updates nothing; it runs the optimizer's step
        # hooks and tells a learning-rate scheduler that the optimizer stepped.
        self.optimizer.step()

    def _apply_pending(self) -> None:
        total = math.sqrt(sum(sq for _, _, _, sq in self._pending.values()))
        self.last_grad_norm = total
        # torch.nn.utils.clip_grad_norm_'s rule, so this equals clip-then-step.
        assert self.max_grad_norm is not None
        coef = min(1.0, float(self.max_grad_norm) / (total + 1e-6))
        for p, group, g, _ in self._pending.values():
            if coef < 1.0:
                g = g * coef
            self.optimizer.update_param(p, group, g)
        self._pending.clear()
