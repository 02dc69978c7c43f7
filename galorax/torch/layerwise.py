"""Layer-wise GaLore: update each parameter from its own post-accumulate-grad hook.

Updating a parameter as soon as its gradient is final, and dropping that gradient, means the
full set of gradients does not live in memory at once (the paper's 7B-on-24GB recipe). Unlike
galore-torch/Hugging Face's layer-wise mode, :class:`LayerwiseGaLore`

* respects gradient accumulation: a parameter is updated on the last of
  ``accumulation_steps`` micro-batches only. Between micro-batches (``accumulate='low_rank'``,
  the default without clipping) each hook projects a projected parameter's micro-batch
  gradient with its current projector, adds it into an f32 low-rank accumulator (r x n or
  m x r) and frees ``p.grad``. Exceptions, which keep their full gradient in ``p.grad`` until
  their last micro-batch: parameters whose projector refreshes at this step (a new projector
  needs the full accumulated gradient: every projected parameter at step 0, and with
  ``stagger=False`` at every refresh step; with ``stagger=True`` about one gap's share),
  and non-projected parameters (biases, norms: small). Peak gradient bytes (live ``p.grad``
  plus accumulators), 4 Linear(256, 256) layers, rank 8, 4 micro-batches, gap 8, staggered
  (``test_low_rank_accumulation_saves_gradient_memory``): plain optimizer 1,052,672 every
  step; layer-wise 299,008 at a step without a refresh (one layer's full micro-batch
  gradient in flight, the others' 8 x 256 accumulators), 552,960 at a step where one layer
  refreshes, 1,052,672 at step 0 (every layer refreshes);
* respects gradient clipping by global norm, exactly: with ``max_grad_norm`` set, a
  projected parameter's hook refreshes its projector, projects its gradient (small, r x n),
  records the full gradient's squared norm and drops the full gradient; :meth:`step` then
  computes the global norm and applies the clipped updates (projection is linear, so
  clipping the projected gradient is clipping the gradient). Non-projected parameters keep
  their gradient until then. The exact norm of an accumulated gradient needs its full sum, so
  with clipping the default is ``accumulate='full'`` (``p.grad`` kept between micro-batches);
  ``accumulate='low_rank'`` with clipping saves the memory but measures a low-rank
  accumulated parameter by the norm of its projected gradient (what the optimizer uses;
  at most the full norm, so it clips no more often than the plain mode);
* keeps one optimizer (a :class:`~galorax.torch.GaLoreAdamW` or ``GaLoreAdafactor``) whose
  ``state_dict`` is the same as in the plain mode, and one learning-rate scheduler on it,
  stepped once per optimizer step.

:class:`~galorax.torch.ApolloAdamW` runs here too, but its update scales the *full* gradient
(``updates_from_projection`` is False): its gradients accumulate in ``p.grad``
(``accumulate='full'``; ``'low_rank'`` raises), and with clipping each full gradient waits
for :meth:`LayerwiseGaLore.step`. What it saves is the gradients of the layers already
updated within one backward pass (no accumulation, no clipping).

Not for DDP/FSDP: their gradient reduction ends after the hooks run. For code that needs a
``torch.optim.Optimizer`` (the Hugging Face Trainer), see
:class:`~galorax.torch.trainer.LayerwiseOptimizer`.

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

__all__ = ["ACCUMULATE", "LayerwiseGaLore"]

#: ``LayerwiseGaLore(accumulate=...)`` values.
ACCUMULATE = ("auto", "low_rank", "full")


class LayerwiseGaLore:
    """Drive a GaLore optimizer from per-parameter gradient hooks.

    Args:
        optimizer: a :class:`~galorax.torch.base.GaLoreOptimizer` (``GaLoreAdamW``,
            ``GaLoreAdamW8bit``, ``GaLoreAdafactor``, ``ApolloAdamW``, ``ApolloAdamW8bit``)
            over the parameters to update layer-wise (schedulers attach to it, as usual).
        accumulation_steps: micro-batches (backward passes) per optimizer step.
        max_grad_norm: clip the global 2-norm of the (accumulated) gradient to this; None: no
            clipping (parameters are then updated inside the backward pass).
        accumulate: how a projected parameter's gradient is accumulated between micro-batches
            (``accumulation_steps > 1``): ``'low_rank'`` (projected in the hook, full gradient
            freed), ``'full'`` (kept in ``p.grad``), or ``'auto'``: ``'full'`` when clipping
            (the exact global norm needs the full sums) or for an optimizer that updates from
            the full gradient (APOLLO), else ``'low_rank'``.

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
        accumulate: str = "auto",
    ):
        if not isinstance(optimizer, GaLoreOptimizer):
            raise TypeError("LayerwiseGaLore drives a galorax.torch GaLore optimizer")
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        if accumulate not in ACCUMULATE:
            raise ValueError(f"accumulate must be one of {ACCUMULATE}, got {accumulate!r}")
        if accumulate == "low_rank" and not optimizer.updates_from_projection:
            raise ValueError(
                f"{type(optimizer).__name__} updates from the full gradient: "
                "accumulate='low_rank' cannot free it (use 'full' or 'auto')"
            )
        if accumulate == "auto":
            low_rank = max_grad_norm is None and optimizer.updates_from_projection
            accumulate = "low_rank" if low_rank else "full"
        self.optimizer = optimizer
        self.accumulation_steps = int(accumulation_steps)
        self.max_grad_norm = max_grad_norm
        self.accumulate = accumulate
        self.last_grad_norm: float | None = None
        self._count: dict[int, int] = {}
        self._low: dict[int, torch.Tensor] = {}  # id(p) -> sum of projected micro-gradients
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
        """Drop leftover gradients, accumulators and pending updates."""
        self._pending.clear()
        self._count.clear()
        self._low.clear()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def gradient_bytes(self) -> int:
        """Bytes of gradients held now: live ``p.grad`` plus low-rank accumulators.

        Example:
            >>> from galorax.torch import GaLoreAdamW
            >>> w = torch.nn.Parameter(torch.zeros(6, 4))
            >>> lw = LayerwiseGaLore(GaLoreAdamW([w], rank=2), accumulation_steps=2)
            >>> w.grad = torch.ones(6, 4)
            >>> lw.gradient_bytes()  # 24 f32 elements
            96
        """
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        held = [p.grad for p in params if p.grad is not None] + list(self._low.values())
        return sum(t.numel() * t.element_size() for t in held)

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        key = id(p)
        count = self._count.get(key, 0) + 1
        if count >= self.accumulation_steps:
            self._count[key] = 0
            self._finalize(p)
            return
        self._count[key] = count
        group = self.optimizer.group_of(p)
        if self.accumulate == "low_rank" and self._projects_now(p, group):
            # The projector stays fixed until p's last micro-batch, so summing projections
            # equals projecting the sum; p's full gradient can go.
            assert p.grad is not None  # the hook runs once p.grad is accumulated
            low = self.optimizer.project_gradient(p, group, p.grad)
            acc = self._low.get(key)
            self._low[key] = low if acc is None else acc.add_(low)
            p.grad = None

    def _projects_now(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        # A refresh needs the full accumulated gradient: those parameters keep p.grad.
        opt = self.optimizer
        return opt.is_projected(p, group) and not opt.refresh_due(p, group)

    def _finalize(self, p: torch.Tensor) -> None:
        grad = p.grad
        acc = self._low.pop(id(p), None)
        if grad is None and acc is None:
            return
        opt = self.optimizer
        group = opt.group_of(p)
        if acc is not None:
            g = acc if grad is None else acc.add_(opt.project_gradient(p, group, grad))
            norm_of = g  # accumulate='low_rank' clips by the norm of what the optimizer uses
        else:
            assert grad is not None
            norm_of = grad
            g = opt.prepare(p, group, grad)
        p.grad = None  # a projected gradient is now r x n; the full one can go
        if self.max_grad_norm is None:
            opt.apply_update(p, group, g)
            return
        sq = float(norm_of.detach().float().square().sum().item())
        self._pending[id(p)] = (p, group, g, sq)

    @torch.no_grad()
    def step(self) -> None:
        """Finish the optimizer step: leftover gradients, clipping, pending updates."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None or id(p) in self._low:
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
        coef = float(self.max_grad_norm) / (total + 1e-6)
        clip = math.isnan(coef) or coef < 1.0  # clamp(max=1) keeps a NaN: every gradient NaN
        for p, group, g, _ in self._pending.values():
            if clip:
                g = g * coef
            self.optimizer.apply_update(p, group, g)
        self._pending.clear()
