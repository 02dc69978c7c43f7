"""GaLore AdamW for PyTorch: ``GaLoreAdamW`` and its 8-bit-moment variant ``GaLoreAdamW8bit``.

Drop-in for galore-torch 1.0: a param group that has a ``rank`` is a GaLore group, and its 2-D
parameters get their gradient projected on a rank-``rank`` subspace that is refreshed every
``update_proj_gap`` steps; everything else is updated full-rank (the machinery is
:class:`~galorax.torch.base.GaLoreOptimizer`'s). On top of galore-torch:

* ``subspace='randomized'`` (default): a randomized range finder instead of a full SVD (the
  default side is galore-torch's ``'std'``; ``side='auto'`` keeps the least state, at a cost
  in loss measured in BENCHMARKS.md, "Small Llama in PyTorch");
* ``moments='align'|'rotate'``: moments follow the subspace when it changes;
* ``stagger=True``: refreshes spread over the gap instead of all on the same step;
* guards: a refresh on a non-finite or all-zero gradient keeps the previous projector, and
  ``skip_nonfinite=True`` (opt-in, per parameter) leaves a parameter whose gradient is not all
  finite, its moments and projector as they were (:mod:`galorax.torch.nonfinite`);
* ``torch.compile(opt.step, fullgraph=True)``: no host read in a step, refreshes included;
* projectors and moments in float32 whatever the parameter dtype;
* ``state_dict()`` of tensors and plain numbers (``torch.load(weights_only=True)``), DDP and
  FSDP2 (``fully_shard``) support.

Example:
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Linear(32, 16)
    >>> opt = GaLoreAdamW(
    ...     [{"params": [model.weight], "rank": 4, "update_proj_gap": 10},
    ...      {"params": [model.bias]}], lr=1e-2)
    >>> for _ in range(3):
    ...     opt.zero_grad()
    ...     model(torch.randn(8, 32)).square().mean().backward()
    ...     opt.step()
    >>> sorted(opt.state[model.weight])
    ['exp_avg', 'exp_avg_sq', 'projector', 'refresh_offset', 'refreshes', 'retry', 'step']
    >>> tuple(opt.state[model.weight]["exp_avg"].shape)  # side 'std': 16 < 32, left, r x n
    (4, 32)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch

from galorax.torch.base import GaLoreOptimizer
from galorax.torch.blockwise import dequantize_blockwise, quantize_blockwise
from galorax.torch.dtensor import local_tensor, write_param
from galorax.torch.groups import check_galore_keys
from galorax.torch.projector import rotate_coordinates

__all__ = ["BlockwiseMoments", "GaLoreAdamW", "GaLoreAdamW8bit", "adam_defaults"]


def adam_defaults(
    lr: float, betas: tuple[float, float], eps: float, weight_decay: float, correct_bias: bool
) -> dict[str, Any]:
    """The AdamW hyperparameters as param-group defaults, checked.

    Example:
        >>> adam_defaults(-1.0, (0.9, 0.999), 1e-6, 0.0, True)
        Traceback (most recent call last):
            ...
        ValueError: Invalid learning rate: -1.0
    """
    if lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
        raise ValueError(f"Invalid betas: {betas}")
    if eps < 0.0:
        raise ValueError(f"Invalid epsilon: {eps}")
    return {
        "lr": lr,
        "betas": betas,
        "eps": eps,
        "weight_decay": weight_decay,
        "correct_bias": correct_bias,
    }


class GaLoreAdamW(GaLoreOptimizer):
    """AdamW on GaLore-projected gradients; galore-torch 1.0's ``GaLoreAdamW`` semantics.

    The Adam arithmetic is galore-torch's (transformers' old AdamW): ``eps`` is added to the
    uncorrected ``sqrt(v)``, bias correction goes into the step size, the projected-back update
    is multiplied by ``scale``, and decoupled weight decay ``p -= lr * weight_decay * p`` is
    applied after the update. Moments are f32.

    Args:
        params: parameters or param groups. Groups with a ``rank`` are GaLore groups; their keys
            (see :data:`~galorax.torch.GALORE_DEFAULTS`) override the constructor's.
        lr: learning rate.
        betas: Adam's ``(beta1, beta2)``.
        eps: added to ``sqrt(v)``.
        weight_decay: decoupled weight decay.
        correct_bias: Adam bias correction.
        no_deprecation_warning: galore-torch's switch for its deprecation warning; accepted for
            compatibility (galorax issues none).
        **galore: defaults for the GaLore keys of every group (e.g. ``rank=128`` makes every group
            a GaLore group). ``skip_nonfinite=True``: per parameter, a gradient that is not all
            finite leaves the parameter, its moments and its projector unchanged (branch-free,
            so it compiles; the step count still advances, as the JAX API's ``count``).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(20, 10))
        >>> opt = GaLoreAdamW([w], lr=0.1, rank=1, proj_type="std")
        >>> w.grad = torch.ones(20, 10)
        >>> opt.step()
        >>> # Adam's first step is lr * sign, spread over the row by Q.T = 1/sqrt(10):
        >>> round(float(w.detach()[0, 0]), 3)
        0.968
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        no_deprecation_warning: bool = False,
        **galore: Any,
    ):
        del no_deprecation_warning  # galorax's AdamW is not deprecated: nothing to silence
        check_galore_keys(galore)
        defaults = {**adam_defaults(lr, betas, eps, weight_decay, correct_bias), **galore}
        super().__init__(params, defaults)

    def update_param(self, p: torch.Tensor, group: dict[str, Any], grad: torch.Tensor) -> None:
        """One AdamW step of ``p`` from ``grad`` (projected or full), moments in f32."""
        norm_grad, step_size = self.adam_step(self.state[p], group, grad)
        self.apply_step(p, group, self.full_rank_update(p, group, norm_grad), step_size)

    def adam_step(
        self, state: dict[str, Any], group: dict[str, Any], grad: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        """Advance the step count and the f32 moments on ``grad``; returns the normalized
        update ``m / (sqrt(v) + eps)`` (uncorrected moments) and the step size, into which
        the bias corrections go (galore-torch's and apollo-torch's arithmetic)."""
        if "step" not in state:
            state["step"] = 0
        exp_avg, exp_avg_sq = self._load_moments(state, grad)
        beta1, beta2 = group["betas"]
        g = grad.float()
        state["step"] = int(state["step"]) + 1
        t = state["step"]

        exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        step_size = group["lr"]
        if group["correct_bias"]:
            step_size = step_size * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
        norm_grad = exp_avg / denom
        self._store_moments(state, exp_avg, exp_avg_sq)
        return norm_grad, step_size

    @staticmethod
    def apply_step(
        p: torch.Tensor, group: dict[str, Any], update: torch.Tensor, step_size: float
    ) -> None:
        """``p -= step_size * update``, then the decoupled weight decay
        ``p -= lr * weight_decay * p``, in f32 (rounded back into a bf16 ``p``)."""
        p_local = local_tensor(p)
        p32 = p_local.float()
        p32.add_(update, alpha=-step_size)
        if group["weight_decay"] > 0.0:
            p32.add_(p32, alpha=-group["lr"] * group["weight_decay"])
        write_param(p_local, p32)

    def _load_moments(
        self, state: dict[str, Any], grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The f32 moments to update in place (created at zero on the first step)."""
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(grad, dtype=torch.float32)
        return state["exp_avg"], state["exp_avg_sq"]

    def _store_moments(self, state: dict[str, Any], m: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the f32 moments (after a step these are the same tensors, updated in place)."""
        state["exp_avg"], state["exp_avg_sq"] = m, v

    def rotate_moments(self, state: dict[str, Any], c: torch.Tensor, side: str) -> None:
        """Rotate the first moment exactly, the second as the rotated covariance's diagonal."""
        if "exp_avg" not in state:
            return
        # First moment: a vector in the subspace, rotated exactly. Second moment: the diagonal
        # of the rotated covariance, C∘C @ v, which stays non-negative.
        m, v = self._load_moments(state, state["exp_avg"])
        m, v = rotate_coordinates(m, c, side), rotate_coordinates(v, c * c, side)
        self._store_moments(state, m, v)


class BlockwiseMoments:
    """Mixin of an AdamW optimizer (:class:`GaLoreAdamW`'s moment hooks): block-wise 8-bit
    moments. Each moment of at least ``min_8bit_size`` elements is stored as ``uint8`` codes
    of the dynamic map, signed for the first moment and unsigned for the second, with one f32
    absmax per block of ``block_size`` elements (per tensor if not ``block_wise``); a step
    dequantizes, runs the f32 arithmetic and quantizes again."""

    block_size: int = 256
    block_wise: bool = True
    min_8bit_size: int = 4096

    def set_8bit(self, block_size: int, block_wise: bool, min_8bit_size: int) -> None:
        """Set the quantization's settings (before the first step)."""
        self.block_size = int(block_size)
        self.block_wise = bool(block_wise)
        self.min_8bit_size = int(min_8bit_size)

    def _load_moments(
        self, state: dict[str, Any], grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if "exp_avg" not in state:
            z = torch.zeros_like(grad, dtype=torch.float32)
            return z, z.clone()
        return (
            self._dequantize(state, "exp_avg", signed=True),
            self._dequantize(state, "exp_avg_sq", signed=False),
        )

    def _store_moments(self, state: dict[str, Any], m: torch.Tensor, v: torch.Tensor) -> None:
        self._quantize(state, "exp_avg", m, signed=True)
        self._quantize(state, "exp_avg_sq", v, signed=False)

    def _quantize(self, state: dict[str, Any], key: str, x: torch.Tensor, signed: bool) -> None:
        if x.numel() < self.min_8bit_size:
            state[key] = x
            state.pop(f"{key}_absmax", None)
            return
        block = self.block_size if self.block_wise else x.numel()
        state[key], state[f"{key}_absmax"] = quantize_blockwise(x, block, signed)

    def _dequantize(self, state: dict[str, Any], key: str, signed: bool) -> torch.Tensor:
        q = state[key]
        if q.dtype != torch.uint8:
            return q
        block = self.block_size if self.block_wise else q.numel()
        return dequantize_blockwise(q, state[f"{key}_absmax"], block, signed)


class GaLoreAdamW8bit(BlockwiseMoments, GaLoreAdamW):
    """:class:`GaLoreAdamW` with block-wise 8-bit moments, in plain torch (no bitsandbytes).

    Each moment of at least ``min_8bit_size`` elements is stored as ``uint8`` codes of the
    dynamic (8-bit Adam) map, signed for the first moment and unsigned for the second, with one
    f32 absmax per block of ``block_size`` consecutive elements: about 2 bytes of state per
    element instead of 8. Smaller moments stay f32. Every step dequantizes, runs exactly
    :class:`GaLoreAdamW`'s arithmetic in f32 and quantizes again, so the update itself is never
    skipped or zeroed (galore-torch's 8-bit variant swaps ``p.data`` around bitsandbytes' kernel
    and stops updating on current bitsandbytes). State dict: uint8 and f32 tensors only.

    The signature and defaults are galore-torch 1.0's ``GaLoreAdamW8bit`` (bitsandbytes'
    ``AdamW8bit``): ``eps=1e-8``, ``weight_decay=1e-2``, ``min_8bit_size=4096``. Its
    bitsandbytes-only arguments: ``block_wise=False`` is honoured (one absmax per tensor),
    ``percentile_clipping`` below 100 raises (clip with ``torch.nn.utils.clip_grad_norm_``),
    and ``amsgrad``, ``optim_bits`` (galore-torch ignores both and always runs 8-bit Adam),
    ``args`` and ``is_paged`` warn once that they are ignored when not at their defaults.

    Args:
        params, lr, betas, eps, weight_decay, correct_bias: as :class:`GaLoreAdamW`.
        amsgrad: ignored (as galore-torch does); warns if True.
        optim_bits: ignored (always 8-bit, as galore-torch); warns if not 32.
        args: bitsandbytes' override object; ignored, warns if given.
        min_8bit_size: moments with fewer elements stay f32.
        percentile_clipping: bitsandbytes' adaptive clipping; only 100 (off) is supported.
        block_wise: quantize per block of ``block_size`` (True) or per tensor (False).
        is_paged: bitsandbytes' paged (CUDA unified) memory; ignored, warns if True.
        block_size: elements per quantization block (galorax's; bitsandbytes uses 256).
        **galore: defaults for the GaLore keys of every group.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(512, 128))
        >>> opt = GaLoreAdamW8bit([w], rank=32, lr=1e-2)
        >>> w.grad = torch.randn(512, 128)
        >>> opt.step()
        >>> st = opt.state[w]
        >>> st["exp_avg"].dtype, tuple(st["exp_avg"].shape), tuple(st["exp_avg_absmax"].shape)
        (torch.uint8, (512, 32), (64,))
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        is_paged: bool = False,
        correct_bias: bool = True,
        block_size: int = 256,
        **galore: Any,
    ):
        check_bitsandbytes_arguments(
            amsgrad=amsgrad,
            optim_bits=optim_bits,
            args=args,
            percentile_clipping=percentile_clipping,
            is_paged=is_paged,
        )
        self.set_8bit(block_size, block_wise, min_8bit_size)
        super().__init__(params, lr, betas, eps, weight_decay, correct_bias, **galore)


def check_bitsandbytes_arguments(
    amsgrad: bool, optim_bits: int, args: Any, percentile_clipping: int, is_paged: bool
) -> None:
    """Warn about galore-torch 8-bit arguments galorax ignores; raise on ones it cannot honour.

    Example:
        >>> check_bitsandbytes_arguments(False, 32, None, 100, False)  # the defaults: silent
        >>> check_bitsandbytes_arguments(False, 32, None, 95, False)
        Traceback (most recent call last):
            ...
        ValueError: percentile_clipping=95 is not supported (only 100, off); clip with ...
    """
    if percentile_clipping != 100:
        raise ValueError(
            f"percentile_clipping={percentile_clipping} is not supported (only 100, off); "
            "clip with torch.nn.utils.clip_grad_norm_"
        )
    ignored = {
        "amsgrad": (amsgrad, False, "galore-torch ignores it too"),
        "optim_bits": (optim_bits, 32, "always 8-bit moments, as galore-torch"),
        "args": (args, None, "bitsandbytes' override object"),
        "is_paged": (is_paged, False, "no paged memory; the state is plain tensors"),
    }
    for name, (value, default, why) in ignored.items():
        if value != default:
            warnings.warn(f"GaLoreAdamW8bit ignores {name}={value!r} ({why})", stacklevel=3)
