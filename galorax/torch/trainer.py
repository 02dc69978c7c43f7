"""The layer-wise mode as a ``torch.optim.Optimizer``: for the Hugging Face Trainer and schedulers.

The Trainer (and ``torch.optim.lr_scheduler``) take a ``torch.optim.Optimizer`` only.
:class:`LayerwiseOptimizer` is one: it installs a :class:`~galorax.torch.LayerwiseGaLore` on
a GaLore optimizer and shares that optimizer's ``param_groups`` and ``state``, so a scheduler
built on it (the Trainer's own) sets the learning rates the hooks use, and the Trainer's
checkpoints hold the inner optimizer's ``state_dict()``. Its :meth:`~LayerwiseOptimizer.step`
is what the Trainer calls after the last micro-batch: it finishes the layer-wise step
(parameters still holding a gradient, clipping, pending updates); the hooks have done the
rest inside the backward passes. Imports nothing from transformers.

With the Trainer, give ``accumulation_steps=args.gradient_accumulation_steps`` and clip
here (``max_grad_norm=``) with ``TrainingArguments(max_grad_norm=0)``: the Trainer clips
before ``step()``, when the projected parameters' gradients are already gone, so its norm
would count the biases and norms only.

Example:
    >>> import torch
    >>> from galorax.torch import GaLoreAdamW
    >>> model = torch.nn.Linear(16, 8)
    >>> inner = GaLoreAdamW([{"params": [model.weight], "rank": 2}, {"params": [model.bias]}])
    >>> opt = LayerwiseOptimizer(inner, accumulation_steps=2)
    >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    >>> for _ in range(2):
    ...     model(torch.randn(4, 16)).sum().backward()
    >>> opt.step(); sched.step(); opt.zero_grad()
    >>> inner.state[model.weight]["step"], inner.param_groups[0]["lr"]
    (1, 0.0005)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from galorax.torch.base import GaLoreOptimizer
from galorax.torch.layerwise import LayerwiseGaLore

__all__ = ["LayerwiseOptimizer"]


class LayerwiseOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` that runs ``optimizer`` layer-wise (from gradient hooks).

    Args:
        optimizer: the GaLore optimizer to drive (``GaLoreAdamW``, ``GaLoreAdamW8bit``,
            ``GaLoreAdafactor``).
        **layerwise: ``accumulation_steps``, ``max_grad_norm``, ``accumulate``: as
            :class:`~galorax.torch.LayerwiseGaLore` (memory: gradients accumulate low-rank
            unless clipping).

    Attributes:
        layerwise: the :class:`~galorax.torch.LayerwiseGaLore` installed on ``optimizer``.
        optimizer: the inner optimizer (whose ``param_groups``/``state`` these are).
    """

    def __init__(self, optimizer: GaLoreOptimizer, **layerwise: Any):
        # The keywords are LayerwiseGaLore's (accumulation_steps, max_grad_norm, accumulate).
        self.layerwise = LayerwiseGaLore(optimizer, **layerwise)
        self.optimizer = optimizer
        # Optimizer.__init__ wants parameters: it gets a placeholder, whose group and state
        # the properties below drop; from then on they are the inner optimizer's (schedulers
        # write the inner learning rates, even after its load_state_dict replaced them).
        self._installed = False
        super().__init__([torch.zeros(0)], dict(optimizer.defaults))
        self._installed = True

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        """The inner optimizer's param groups."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if self._installed:
            self.optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        """The inner optimizer's per-parameter state."""
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        if self._installed:
            self.optimizer.state = value

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Finish the optimizer step (:meth:`LayerwiseGaLore.step`); the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.layerwise.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop leftover gradients, accumulators and pending updates."""
        self.layerwise.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict (the plain mode's format)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the inner optimizer's state dict."""
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Not supported: the hooks are installed at construction."""
        if not self._installed:  # Optimizer.__init__'s placeholder
            return
        raise NotImplementedError("build a new LayerwiseOptimizer to add parameters")

    def remove(self) -> None:
        """Remove the gradient hooks (the inner optimizer then steps as usual)."""
        self.layerwise.remove()
