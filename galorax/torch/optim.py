"""GaLore optimizers for PyTorch: ``GaLoreAdamW`` and ``GaLoreAdafactor``.

Drop-in for galore-torch 1.0: a param group that has a ``rank`` is a GaLore group, and its 2-D
parameters get their gradient projected on a rank-``rank`` subspace that is refreshed every
``update_proj_gap`` steps; everything else is updated full-rank. On top of galore-torch:

* ``subspace='randomized'`` (default): a randomized range finder instead of a full SVD;
* ``moments='align'|'rotate'``: moments follow the subspace when it changes;
* ``stagger=True``: refreshes spread over the gap instead of all on the same step;
* guards: a refresh on a non-finite or all-zero gradient keeps the previous projector;
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
    >>> sorted(opt.state[model.weight]), tuple(opt.state[model.weight]["exp_avg"].shape)
    (['exp_avg', 'exp_avg_sq', 'projector', 'refreshes', 'retry', 'step'], (16, 4))
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from galorax.torch.projector import (
    PROJ_TYPES,
    RowReduce,
    align_signs,
    fallback_basis,
    find_subspace,
    gradient_is_usable,
    project,
    project_back,
    resolve_side,
    rotation,
)

__all__ = ["GALORE_DEFAULTS", "GaLoreAdafactor", "GaLoreAdamW", "GaLoreAdamW8bit"]

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

_MOMENTS = ("keep", "align", "rotate")


def _check_group(group: dict[str, Any]) -> None:
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
    if group["moments"] not in _MOMENTS:
        raise ValueError(f"moments must be one of {_MOMENTS}, got {group['moments']!r}")


def _dtensor_types() -> tuple[type, type, type] | None:
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor, Replicate, Shard


class _Local:
    """A parameter seen as this process's plain tensors, with the row all-reduce if sharded."""

    __slots__ = ("param", "grad", "reduce", "shape")

    def __init__(self, p: torch.Tensor, grad: torch.Tensor | None):
        self.shape = tuple(p.shape)  # global shape
        self.reduce: RowReduce | None = None
        types = _dtensor_types()
        if types is not None and isinstance(p, types[0]):
            dtensor, replicate, shard = types
            placements = tuple(p.placements)  # type: ignore[attr-defined]
            mesh = p.device_mesh  # type: ignore[attr-defined]
            if all(isinstance(pl, replicate) for pl in placements):
                pass
            elif mesh.ndim == 1 and placements == (shard(0),):
                world = mesh.size()
                chunk = -(-self.shape[0] // world)
                offset = min(mesh.get_local_rank() * chunk, self.shape[0])
                local_rows = min(chunk, self.shape[0] - offset)
                self.reduce = RowReduce(mesh.get_group(), self.shape[0], offset, local_rows)
            else:
                raise NotImplementedError(
                    f"galorax.torch supports DTensor parameters sharded as (Shard(0),) on a 1-D "
                    f"mesh (FSDP2's default) or replicated; got {placements}"
                )
            self.param = p.to_local()  # type: ignore[attr-defined]
            self.grad = grad.to_local() if grad is not None else None  # type: ignore[attr-defined]
        else:
            self.param = p
            self.grad = grad


class _GaLoreBase(Optimizer):
    """The GaLore machinery shared by the optimizers: refresh, projection, state handling.

    Subclasses implement :meth:`_update` (the base optimizer on the projected or full gradient)
    and :meth:`_rotate` (how their moments follow a rotation of the basis).
    """

    def __init__(self, params: Any, defaults: dict[str, Any]):
        merged = dict(GALORE_DEFAULTS)
        merged.update(defaults)
        self._meta_cache: dict[int, tuple[int, int]] | None = None
        self._warned: set[str] = set()
        super().__init__(params, merged)

    # ---------------------------------------------------------------- param groups, metadata
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        settings = group.get("subspace")
        if not isinstance(settings, str) and hasattr(settings, "power_iters"):
            # The JAX API's `subspace=galorax.Randomized(...)`: flatten it, so the param groups
            # (and so the state dict) hold plain values only.
            for key in ("power_iters", "oversample", "warm_start", "seed"):
                group[key] = getattr(settings, key, group[key])
            group["subspace"] = "randomized"
        if group.get("proj_type") is not None and group.get("side") not in (None, "auto"):
            if resolve_side((2, 1), group["proj_type"]) != resolve_side((2, 1), group["side"]):
                raise ValueError("give either proj_type (galore-torch) or side (galorax), not both")
        _check_group(group)
        self._meta_cache = None
        self.__dict__["_group_cache"] = None

    def _meta(self) -> dict[int, tuple[int, int]]:
        """id(param) -> (global index, stagger offset): seeds and refresh schedule."""
        if self._meta_cache is None:
            # Stagger slots are spread over all projected parameters (as the JAX API spreads
            # them over all projected leaves), each within its own group's gap.
            projected = [
                id(p) for g in self.param_groups for p in g["params"] if self._is_projected(p, g)
            ]
            pos = {key: j for j, key in enumerate(projected)}
            meta: dict[int, tuple[int, int]] = {}
            index = 0
            for group in self.param_groups:
                gap = int(group["update_proj_gap"])
                for p in group["params"]:
                    j = pos.get(id(p))
                    offset = (
                        (j * gap) // len(projected) if j is not None and group["stagger"] else 0
                    )
                    meta[id(p)] = (index, offset)
                    index += 1
            self._meta_cache = meta
        return self._meta_cache

    @staticmethod
    def _is_projected(p: torch.Tensor, group: dict[str, Any]) -> bool:
        # Only matrices: galore-torch would crash on 1-D tensors; higher ranks (convs, stacked
        # layers) are left full-rank here.
        return group.get("rank") is not None and p.dim() == 2

    @staticmethod
    def _side(shape: tuple[int, ...], group: dict[str, Any]) -> str:
        proj_type = group["proj_type"] if group["proj_type"] is not None else group["side"]
        return resolve_side(shape, proj_type)

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, stacklevel=3)

    # ---------------------------------------------------------------------- state dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as ``torch.optim.Optimizer`` does, but keep the f32 moments/projectors f32.

        (``Optimizer.load_state_dict`` casts every floating state tensor to the parameter's
        dtype, which would round f32 moments of bf16 parameters and break exact resume.)
        """
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(pid)
            if not saved:
                continue
            state = self.state[p]
            for key, value in saved.items():
                if torch.is_tensor(value):
                    device = _Local(p, None).param.device
                    state[key] = value.detach().to(device=device, copy=True)
        self._meta_cache = None
        self.__dict__["_group_cache"] = None

    # ------------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimization step over every parameter that has a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = self._prepare(p, group, p.grad)
                self._update(p, group, g)
        return loss

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        """The param group holding ``p`` (cached: layer-wise hooks ask once per parameter)."""
        cache = self.__dict__.get("_group_cache")
        if cache is None or cache[0] is not self.param_groups or id(p) not in cache[1]:
            # load_state_dict replaces the group dicts, add_param_group extends the list.
            groups = {id(q): g for g in self.param_groups for q in g["params"]}
            cache = (self.param_groups, groups)
            self.__dict__["_group_cache"] = cache
        try:
            return cache[1][id(p)]
        except KeyError:
            raise KeyError("parameter is not in this optimizer") from None

    @torch.no_grad()
    def _prepare(self, p: torch.Tensor, group: dict[str, Any], grad: torch.Tensor) -> torch.Tensor:
        """Refresh the projector if due, and return the gradient to feed the base optimizer.

        For a projected parameter that is the f32 low-rank gradient (the same on every process
        for a left projection under FSDP2); otherwise the (local) gradient itself.
        """
        if grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        loc = _Local(p, grad)
        assert loc.grad is not None
        if not self._is_projected(p, group):
            return loc.grad
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
            state["refreshes"] = 0
            state["retry"] = 0
        side = self._side(loc.shape, group)
        index, offset = self._meta()[id(p)]
        gap = int(group["update_proj_gap"])
        s = int(state["step"])
        due = s == 0 or "projector" not in state or bool(state["retry"])
        due = due or (s % gap == offset % gap)
        if due:
            self._refresh(p, group, state, loc, side, index)
        return project(loc.grad, state["projector"], side, loc.reduce)

    def _refresh(
        self,
        p: torch.Tensor,
        group: dict[str, Any],
        state: dict[str, Any],
        loc: _Local,
        side: str,
        index: int,
    ) -> None:
        m, n = loc.shape
        rank = min(int(group["rank"]), m, n)
        old = state.get("projector")
        assert loc.grad is not None
        if loc.reduce is not None and group["subspace"] == "svd":
            self._warn_once(
                "fsdp-svd",
                "subspace='svd' on a row-sharded (FSDP2) gradient all-gathers the full gradient "
                "on every process and runs the same SVD everywhere; subspace='randomized' works "
                "on the shards with small all-reduces only",
            )
        new: torch.Tensor | None
        if gradient_is_usable(loc.grad, loc.reduce):
            new = find_subspace(
                loc.grad,
                rank,
                side,
                group["subspace"],
                power_iters=int(group["power_iters"]),
                oversample=int(group["oversample"]),
                warm=old if group["warm_start"] else None,
                seed=int(group["seed"]),
                index=index,
                refresh=int(state["refreshes"]),
                reduce=loc.reduce,
            )
            state["refreshes"] = int(state["refreshes"]) + 1
            state["retry"] = 0
        else:
            # Non-finite or all-zero gradient: an SVD of it would be NaN or arbitrary. Keep the
            # previous projector (or, at the first step, the orthonormal placeholder eye(rows, r),
            # as the JAX API does) and try again next step.
            state["retry"] = 1
            if old is not None:
                return
            new = fallback_basis(loc.shape, rank, side, reduce=loc.reduce, device=loc.grad.device)
        if old is not None and group["moments"] != "keep":
            new = align_signs(new, old, loc.reduce, side)
            if group["moments"] == "rotate":
                self._rotate(state, rotation(new, old, loc.reduce, side), side)
        state["projector"] = new

    def _project_back(
        self, p: torch.Tensor, group: dict[str, Any], update: torch.Tensor
    ) -> torch.Tensor:
        """Low-rank update -> the parameter's (local) shape, times ``scale``; identity if the
        parameter is not projected."""
        if not self._is_projected(p, group):
            return update
        side = self._side(tuple(p.shape), group)
        return project_back(update, self.state[p]["projector"], side) * float(group["scale"])

    def _update(self, p: torch.Tensor, group: dict[str, Any], grad: torch.Tensor) -> None:
        raise NotImplementedError

    def _rotate(self, state: dict[str, Any], c: torch.Tensor, side: str) -> None:
        raise NotImplementedError


def _rotate_rows(t: torch.Tensor, c: torch.Tensor, side: str) -> torch.Tensor:
    """Coordinates in the old basis -> the new one: left (r x n): C @ t; right (m x r): t @ C.T."""
    return c @ t if side == "left" else t @ c.T


def _write(p_local: torch.Tensor, p32: torch.Tensor) -> None:
    if p32 is not p_local:
        p_local.copy_(p32)


class GaLoreAdamW(_GaLoreBase):
    """AdamW on GaLore-projected gradients; galore-torch 1.0's ``GaLoreAdamW`` semantics.

    The Adam arithmetic is galore-torch's (transformers' old AdamW): ``eps`` is added to the
    uncorrected ``sqrt(v)``, bias correction goes into the step size, the projected-back update
    is multiplied by ``scale``, and decoupled weight decay ``p -= lr * weight_decay * p`` is
    applied after the update. Moments are f32.

    Args:
        params: parameters or param groups. Groups with a ``rank`` are GaLore groups; their keys
            (see :data:`GALORE_DEFAULTS`) override the constructor's.
        lr: learning rate.
        betas: Adam's ``(beta1, beta2)``.
        eps: added to ``sqrt(v)``.
        weight_decay: decoupled weight decay.
        correct_bias: Adam bias correction.
        **galore: defaults for the GaLore keys of every group (e.g. ``rank=128`` makes every group
            a GaLore group).

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
        **galore: Any,
    ):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas: {betas}")
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon: {eps}")
        unknown = set(galore) - set(GALORE_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown arguments: {sorted(unknown)}")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "correct_bias": correct_bias,
            **galore,
        }
        super().__init__(params, defaults)

    def _update(self, p: torch.Tensor, group: dict[str, Any], grad: torch.Tensor) -> None:
        state = self.state[p]
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
        norm_grad = self._project_back(p, group, exp_avg / denom)
        self._store_moments(state, exp_avg, exp_avg_sq)

        p_local = _Local(p, None).param
        p32 = p_local.float()
        p32.add_(norm_grad, alpha=-step_size)
        if group["weight_decay"] > 0.0:
            p32.add_(p32, alpha=-group["lr"] * group["weight_decay"])
        _write(p_local, p32)

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

    def _rotate(self, state: dict[str, Any], c: torch.Tensor, side: str) -> None:
        if "exp_avg" not in state:
            return
        # First moment: a vector in the subspace, rotated exactly. Second moment: the diagonal
        # of the rotated covariance, C∘C @ v, which stays non-negative.
        m, v = self._load_moments(state, state["exp_avg"])
        self._store_moments(state, _rotate_rows(m, c, side), _rotate_rows(v, c * c, side))


class GaLoreAdamW8bit(GaLoreAdamW):
    """:class:`GaLoreAdamW` with block-wise 8-bit moments, in plain torch (no bitsandbytes).

    Each moment of at least ``min_8bit_size`` elements is stored as ``uint8`` codes of the
    dynamic (8-bit Adam) map, signed for the first moment and unsigned for the second, with one
    f32 absmax per block of ``block_size`` consecutive elements: about 2 bytes of state per
    element instead of 8. Smaller moments stay f32. Every step dequantizes, runs exactly
    :class:`GaLoreAdamW`'s arithmetic in f32 and quantizes again, so the update itself is never
    skipped or zeroed (galore-torch's 8-bit variant swaps ``p.data`` around bitsandbytes' kernel
    and stops updating on current bitsandbytes). State dict: uint8 and f32 tensors only.

    Args:
        params, lr, betas, eps, weight_decay, correct_bias: as :class:`GaLoreAdamW`.
        block_size: elements per quantization block.
        min_8bit_size: moments with fewer elements stay f32.
        **galore: defaults for the GaLore keys of every group.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(512, 64))
        >>> opt = GaLoreAdamW8bit([w], rank=32, lr=1e-2)
        >>> w.grad = torch.randn(512, 64)
        >>> opt.step()
        >>> st = opt.state[w]
        >>> st["exp_avg"].dtype, tuple(st["exp_avg"].shape), tuple(st["exp_avg_absmax"].shape)
        (torch.uint8, (32, 64), (8,))
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        block_size: int = 256,
        min_8bit_size: int = 2048,
        **galore: Any,
    ):
        self.block_size = int(block_size)
        self.min_8bit_size = int(min_8bit_size)
        super().__init__(params, lr, betas, eps, weight_decay, correct_bias, **galore)

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

    @staticmethod
    def _code(signed: bool, device: torch.device) -> torch.Tensor:
        from galorax.quantization.codes import dynamic_code  # the JAX side's table (numpy)

        return torch.from_numpy(dynamic_code(8, signed=signed).copy()).to(device)

    def _quantize(self, state: dict[str, Any], key: str, x: torch.Tensor, signed: bool) -> None:
        if x.numel() < self.min_8bit_size:
            state[key] = x
            state.pop(f"{key}_absmax", None)
            return
        code = self._code(signed, x.device)
        flat = x.reshape(-1)
        pad = (-flat.numel()) % self.block_size
        blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, self.block_size)
        absmax = blocks.abs().amax(dim=1)
        normed = blocks / absmax.clamp_min(1e-30).unsqueeze(1)
        # Nearest level: the sorted table's midpoints split [-1, 1] into 256 bins.
        idx = torch.bucketize(normed.clamp(-1.0, 1.0), (code[1:] + code[:-1]) / 2)
        state[key] = idx.to(torch.uint8).view(-1)[: flat.numel()].view(x.shape)
        state[f"{key}_absmax"] = absmax

    def _dequantize(self, state: dict[str, Any], key: str, signed: bool) -> torch.Tensor:
        q = state[key]
        if q.dtype != torch.uint8:
            return q
        absmax = state[f"{key}_absmax"]
        code = self._code(signed, q.device)
        flat = code[q.reshape(-1).long()]
        pad = (-flat.numel()) % self.block_size
        blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, self.block_size)
        out = (blocks * absmax.unsqueeze(1)).view(-1)[: flat.numel()]
        return out.view(q.shape)


class GaLoreAdafactor(_GaLoreBase):
    """Adafactor on GaLore-projected gradients; galore-torch 1.0's ``GaLoreAdafactor`` semantics.

    The arithmetic is transformers' Adafactor as galore-torch ships it (factored second moment of
    the projected gradient, update clipping, relative step and parameter scaling options).
    Not supported on FSDP2-sharded parameters (its factored statistics and parameter RMS would
    need all-reduces); DDP is fine.

    Args:
        params: parameters or param groups (GaLore keys as in :class:`GaLoreAdamW`).
        lr: external learning rate (None with ``relative_step=True``).
        eps: ``(eps_sq, eps_scale)``.
        clip_threshold: threshold on the RMS of the update.
        decay_rate: exponent of the second-moment decay.
        beta1: first-moment coefficient, or None for none.
        weight_decay: weight decay (``p -= p * weight_decay * lr``).
        scale_parameter: scale the learning rate by the parameter's RMS.
        relative_step: time-dependent learning rate.
        warmup_init: warm-up for the relative step.
        **galore: defaults for the GaLore keys of every group.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(20, 10))
        >>> opt = GaLoreAdafactor([w], lr=0.1, rank=1, relative_step=False, scale_parameter=False)
        >>> w.grad = torch.ones(20, 10)
        >>> opt.step()
        >>> round(float(w.detach()[0, 0]), 3)
        0.978
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
        unknown = set(galore) - set(GALORE_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown arguments: {sorted(unknown)}")
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

    @staticmethod
    def _rms(t: torch.Tensor) -> torch.Tensor:
        return t.norm(2) / (t.numel() ** 0.5)

    def _update(self, p: torch.Tensor, group: dict[str, Any], grad: torch.Tensor) -> None:
        types = _dtensor_types()
        if types is not None and isinstance(p, types[0]):
            raise NotImplementedError(
                "GaLoreAdafactor does not support DTensor (FSDP2) parameters; use GaLoreAdamW"
            )
        state = self.state[p]
        g = grad.float()
        shape = g.shape
        factored = len(shape) >= 2
        use_first_moment = group["beta1"] is not None
        if "RMS" not in state:
            # galore-torch resets the step here too (after the first refresh at step 0).
            state["step"] = 0
            if use_first_moment:
                state["exp_avg"] = torch.zeros_like(g)
            if factored:
                state["exp_avg_sq_row"] = torch.zeros(shape[:-1], dtype=g.dtype, device=g.device)
                state["exp_avg_sq_col"] = torch.zeros(
                    shape[:-2] + shape[-1:], dtype=g.dtype, device=g.device
                )
            else:
                state["exp_avg_sq"] = torch.zeros_like(g)
            state["RMS"] = 0.0

        p32 = p.detach().float()
        state["step"] = int(state["step"]) + 1
        state["RMS"] = float(self._rms(p32).item())
        lr = group["lr"]
        if group["relative_step"]:
            min_step = 1e-6 * state["step"] if group["warmup_init"] else 1e-2
            lr = min(min_step, 1.0 / math.sqrt(state["step"]))
        if group["scale_parameter"]:
            lr = max(group["eps"][1], state["RMS"]) * lr

        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        update = g.square() + group["eps"][0]
        if factored:
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
        update.div_((self._rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(lr)
        if use_first_moment:
            exp_avg = state["exp_avg"]
            exp_avg.mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
            update = exp_avg
        update = self._project_back(p, group, update)
        if group["weight_decay"] != 0:
            p32.add_(p32, alpha=-group["weight_decay"] * lr)
        p32.add_(-update)
        _write(p, p32)

    def _rotate(self, state: dict[str, Any], c: torch.Tensor, side: str) -> None:
        if "RMS" not in state:
            return
        if "exp_avg" in state:
            state["exp_avg"] = _rotate_rows(state["exp_avg"], c, side)
        # Factored second moment: only the statistic along the rank axis lives in the
        # subspace; rotate its diagonal approximation with C∘C, leave the other one.
        cc = c * c
        if side == "left":
            state["exp_avg_sq_row"] = cc @ state["exp_avg_sq_row"]
        else:
            state["exp_avg_sq_col"] = cc @ state["exp_avg_sq_col"]
