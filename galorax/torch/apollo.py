"""APOLLO for PyTorch: ``ApolloAdamW`` (apollo-torch 1.0.3's ``APOLLOAdamW``) and its 8-bit mode.

APOLLO (Zhu et al., MLSys 2025) keeps Adam's moments on a *random* rank-``r`` projection ``R``
of each weight's gradient ``G`` and uses them only to estimate how much Adam would rescale each
channel: ``s = ||N|| / (||R|| + 1e-8)``, ``N = m / (sqrt(v) + eps)``, per channel (the side
``R`` keeps) or per matrix (``scale_type='tensor'``, APOLLO-Mini). The update is ``G * s``,
its norm's growth limited as in Fira (1.01 per step), times ``sqrt(scale)``, with Adam's bias
correction in the step size and the decoupled weight decay after the update.

The param-group keys are apollo-torch's (``rank``, ``proj``, ``scale_type``, ``scale``,
``update_proj_gap``, ``proj_type``): a group with a ``rank`` projects its 2-D parameters, the
others get apollo-torch's plain AdamW. With ``proj='random'`` the projection is drawn exactly as
apollo-torch draws it (a ``torch.Generator`` seeded with the parameter's 1-based index among
all parameters, a new seed from :func:`next_seed` after each draw, ``N(0, 1/rank)`` entries,
the right side for ``proj_type='std'`` when rows >= cols), so with f32 parameters the steps
are apollo-torch's (``tests/torch/test_torch_apollo.py``). ``proj='svd'`` is apollo-torch's
GaLore projector (galorax's :func:`~galorax.torch.projector.find_subspace`). The machinery is
:class:`~galorax.torch.base.GaLoreOptimizer`'s: refresh schedule, DDP/FSDP2, ``skip_nonfinite``,
the layer-wise mode, and a ``state_dict()`` of tensors and plain numbers (the projection and
the next seed, no pickled projector object).

Example:
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Linear(32, 16)
    >>> opt = ApolloAdamW(
    ...     [{"params": [model.weight], "rank": 4, "proj": "random", "scale_type": "channel",
    ...       "update_proj_gap": 10, "scale": 1.0, "proj_type": "std"},
    ...      {"params": [model.bias]}], lr=1e-2)
    >>> for _ in range(3):
    ...     opt.zero_grad()
    ...     model(torch.randn(8, 32)).square().mean().backward()
    ...     opt.step()
    >>> st = opt.state[model.weight]
    >>> tuple(st["exp_avg"].shape), tuple(st["projector"].shape), st["seed"] == next_seed(1)
    ((4, 32), (16, 4), True)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from galorax.torch.adamw import BlockwiseMoments, GaLoreAdamW, adam_defaults
from galorax.torch.base import GaLoreOptimizer
from galorax.torch.dtensor import LocalView
from galorax.torch.groups import GALORE_DEFAULTS
from galorax.torch.migrate import is_galore_torch_state
from galorax.torch.projector import RowReduce, project

__all__ = [
    "APOLLO_DEFAULTS",
    "ApolloAdamW",
    "ApolloAdamW8bit",
    "check_apollo_group",
    "next_seed",
    "random_projection",
]

#: apollo-torch's ``ADV_DEFAULT``: random integers drawn to derive the next seed.
_ADVANCE = 0xF

#: The APOLLO keys of a param group, with their defaults, and the GaLore keys whose default
#: differs for APOLLO (apollo-torch's behaviour: moments kept at a re-draw, every parameter
#: re-drawn on the same steps, apollo-torch's SVD for ``proj='svd'``).
APOLLO_DEFAULTS: dict[str, Any] = {
    "proj": "random",  # 'random' (APOLLO) or 'svd' (GaLore's subspace, apollo-torch's option)
    "scale_type": "channel",  # 'channel' or 'tensor' (APOLLO-Mini)
    "scale_front": False,  # apollo-torch's: sqrt(scale) before the limiter instead of after
    "growth": 1.01,  # the norm-growth limiter's largest growth per step; None: off
    "moments": "keep",
    "stagger": False,
    "subspace": "svd",
    # True: the current random projection is in the state (apollo-torch's); False: only its
    # seed, the projection drawn again at every step (less memory, a randn per step)
    "store_projection": True,
}
_PROJ = ("random", "svd")
_SCALE_TYPES = ("channel", "tensor")


def random_projection(
    shape: tuple[int, ...],
    rank: int,
    side: str,
    seed: int,
    device: torch.device | str = "cpu",
    reduce: RowReduce | None = None,
) -> torch.Tensor:
    """apollo-torch's random projection (``stable_randn(...) / sqrt(rank)``), galorax's layout.

    Entries ``N(0, 1/rank)`` from a ``torch.Generator`` on ``device`` seeded with ``seed``:
    left, the m x r matrix itself (projection ``P.T @ G``); right, apollo-torch's r x n draw
    as its n x r transposed view (``G @ P`` is then the very matmul apollo-torch runs).

    Args:
        shape: the parameter's global shape ``(m, n)``.
        rank: the projection's rank.
        side: ``'left'`` or ``'right'``.
        seed: the generator's seed.
        device: where to draw (apollo-torch draws on the gradient's device).
        reduce: a row-sharded parameter's :class:`~galorax.torch.projector.RowReduce`: a left
            projection is drawn whole and this process's rows returned.

    Example:
        >>> p = random_projection((6, 4), 2, "right", seed=1)
        >>> tuple(p.shape), p.is_contiguous()  # a view of apollo-torch's (2, 4) draw
        ((4, 2), False)
    """
    m, n = int(shape[0]), int(shape[1])
    gen = torch.Generator(device=device).manual_seed(int(seed))
    rows, cols = (m, rank) if side == "left" else (rank, n)
    draw = torch.randn((rows, cols), generator=gen, device=device, dtype=torch.float32)
    draw = draw / math.sqrt(rank)
    if side == "right":
        return draw.T
    if reduce is not None:  # a copy: the whole draw's storage must not stay referenced
        return draw[reduce.offset : reduce.offset + reduce.local_rows].clone()
    return draw


def next_seed(seed: int) -> int:
    """The seed after ``seed`` (apollo-torch's ``next_seed``: the last of 15 random int64s of a
    CPU generator seeded with ``seed``).

    Example:
        >>> next_seed(1) == next_seed(1) != next_seed(2)
        True
    """
    gen = torch.Generator().manual_seed(int(seed))
    high = torch.iinfo(torch.int64).max
    return int(torch.randint(0, high, (_ADVANCE,), generator=gen).tolist()[-1])


def check_apollo_group(group: dict[str, Any]) -> None:
    """Raise ``ValueError`` on an invalid APOLLO key of ``group``; plain groups pass.

    Example:
        >>> check_apollo_group({**GALORE_DEFAULTS, **APOLLO_DEFAULTS, "rank": 4,
        ...                     "scale_type": "row"})
        Traceback (most recent call last):
            ...
        ValueError: scale_type must be one of ('channel', 'tensor'), got 'row'
    """
    if group.get("rank") is None:
        return
    if group["proj"] not in _PROJ:
        raise ValueError(f"proj must be one of {_PROJ}, got {group['proj']!r}")
    if group["scale_type"] not in _SCALE_TYPES:
        raise ValueError(f"scale_type must be one of {_SCALE_TYPES}, got {group['scale_type']!r}")
    growth = group["growth"]
    if growth is not None and not (math.isfinite(float(growth)) and float(growth) > 0.0):
        raise ValueError(f"growth must be a positive number or None (off), got {growth!r}")
    if float(group["scale"]) < 0.0:
        raise ValueError(f"scale must be >= 0 (its square root multiplies), got {group['scale']!r}")
    if group["proj"] != "random" and not group["store_projection"]:
        raise ValueError("store_projection=False needs proj='random' (a draw from a seed)")
    if group["proj"] == "random" and group["moments"] != "keep":
        raise ValueError(
            f"moments={group['moments']!r} needs an orthonormal basis: with proj='random' "
            "the moments are kept at a re-draw (moments='keep'); use it with proj='svd'"
        )


def _norm(x: torch.Tensor, dim: int | None, reduce: RowReduce | None) -> torch.Tensor:
    """``torch.norm(x, dim=dim)`` (apollo-torch's call); over every process's rows if
    ``reduce`` is given (``x`` is this process's rows of a row-sharded matrix)."""
    if reduce is None:
        return torch.norm(x) if dim is None else torch.norm(x, dim=dim)
    sq = x.square().sum() if dim is None else x.square().sum(dim)
    return reduce(sq.reshape(-1)).reshape(sq.shape).sqrt()


class ApolloAdamW(GaLoreAdamW):
    """APOLLO: AdamW's per-channel (or per-matrix) learning-rate scale, estimated on a random
    projection; apollo-torch 1.0.3's ``APOLLOAdamW`` semantics.

    Param groups with a ``rank`` are APOLLO groups (their 2-D parameters); the others, and 1-D
    parameters anywhere, get AdamW (apollo-torch's: ``eps`` on the uncorrected ``sqrt(v)``,
    bias correction in the step size, weight decay after the update). Moments, projections and
    the update arithmetic are f32 whatever the parameter's dtype.

    Args:
        params: parameters or param groups. APOLLO keys (:data:`APOLLO_DEFAULTS`): ``proj``
            (``'random'``, or ``'svd'``: GaLore's subspace), ``scale_type`` (``'channel'``,
            ``'tensor'``), ``scale_front``, ``growth`` (the limiter's, 1.01; None: off); the
            GaLore keys (:data:`~galorax.torch.GALORE_DEFAULTS`): ``rank``, ``update_proj_gap``,
            ``scale`` (the update is multiplied by ``sqrt(scale)``), ``proj_type``/``side``,
            ``seed`` (added to each parameter's 1-based index: 0 draws apollo-torch's
            projections), ``stagger``, ``skip_nonfinite``; with ``proj='svd'`` also
            ``subspace``, ``moments``, ...
        lr: learning rate.
        betas: Adam's ``(beta1, beta2)``.
        eps: added to ``sqrt(v)`` (apollo-torch's default, 1e-6).
        weight_decay: decoupled weight decay, ``p -= lr * weight_decay * p`` after the update.
        correct_bias: Adam bias correction (in the step size).
        scale_front: apollo-torch's switch: ``sqrt(scale)`` before the limiter (the default
            for every group; a group may set its own).
        disable_nl: apollo-torch's switch: no norm-growth limiter (``growth=None``).
        no_deprecation_warning: accepted for compatibility (nothing is deprecated).
        **apollo: defaults of the APOLLO and GaLore keys for every group.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(20, 10))
        >>> opt = ApolloAdamW([{"params": [w], "rank": 2, "scale_type": "tensor"}], lr=0.1)
        >>> w.grad = torch.ones(20, 10)
        >>> opt.step()
        >>> sorted(opt.state[w])  # doctest: +NORMALIZE_WHITESPACE
        ['exp_avg', 'exp_avg_sq', 'projector', 'refresh_offset', 'refreshes', 'retry',
         'scaled_grad', 'seed', 'step']
    """

    updates_from_projection = False  # the update scales the full gradient

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        scale_front: bool = False,
        disable_nl: bool = False,
        no_deprecation_warning: bool = True,
        **apollo: Any,
    ):
        del no_deprecation_warning
        unknown = set(apollo) - set(GALORE_DEFAULTS) - set(APOLLO_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown arguments: {sorted(unknown)}")
        defaults = {
            **adam_defaults(lr, betas, eps, weight_decay, correct_bias),
            **APOLLO_DEFAULTS,
            "scale_front": bool(scale_front),
            "growth": None if disable_nl else APOLLO_DEFAULTS["growth"],
            **apollo,
        }
        GaLoreOptimizer.__init__(self, params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (``torch.optim.Optimizer``'s), then check its keys."""
        super().add_param_group(param_group)
        check_apollo_group(self.param_groups[-1])

    # ------------------------------------------------------------------- projection
    @torch.no_grad()
    def prepare(self, p: torch.Tensor, group: dict[str, Any], grad: torch.Tensor) -> torch.Tensor:
        """Draw a new projection when due; returns the (local) full gradient, which
        :meth:`update_param` both projects and scales."""
        loc = self._local_view(p, grad)
        assert loc.grad is not None
        if self.is_projected(p, group):
            self._refresh_if_due(p, group, loc)
            # The limiter's last norm; 0: none yet (no limit at the next step). Created here,
            # before the update, so that skip_nonfinite restores it.
            self.state[p].setdefault(
                "scaled_grad", torch.zeros((), dtype=torch.float32, device=loc.grad.device)
            )
        return loc.grad

    def _refresh(
        self, group: dict[str, Any], state: dict[str, Any], loc: LocalView, side: str, index: int
    ) -> None:
        if group["proj"] != "random":
            super()._refresh(group, state, loc, side, index)
            return
        assert loc.grad is not None
        # apollo-torch's: the first draw's seed is the parameter's 1-based index among all
        # parameters, the next one next_seed of it. The draw does not look at the gradient,
        # so there is nothing to guard (a NaN gradient draws as apollo-torch does).
        seed = int(state.get("seed", int(group["seed"]) + index + 1))
        if group["store_projection"]:
            rank = min(int(group["rank"]), *loc.shape)
            state["projector"] = random_projection(
                loc.shape, rank, side, seed, loc.grad.device, loc.reduce
            )
        else:
            state.pop("projector", None)
            state["proj_seed"] = seed
        state["seed"] = next_seed(seed)
        state["refreshes"] = int(state["refreshes"]) + 1
        state["retry"] = 0

    @staticmethod
    def has_projection(state: dict[str, Any]) -> bool:
        """Whether ``state`` holds the current projection or, not stored, its seed."""
        return "projector" in state or "proj_seed" in state

    def projection(
        self, p: torch.Tensor, group: dict[str, Any], device: torch.device
    ) -> torch.Tensor:
        """``p``'s current projection (f32, galorax's layout): the stored one, or drawn again
        from its seed (``store_projection=False``)."""
        state = self.state[p]
        if "projector" in state:
            return state["projector"]
        shape = tuple(p.shape)
        rank = min(int(group["rank"]), *shape)
        reduce = LocalView(p, None).reduce
        side = self._side(shape, group)
        return random_projection(shape, rank, side, int(state["proj_seed"]), device, reduce)

    # ------------------------------------------------------------------------ update
    def update_param(self, p: torch.Tensor, group: dict[str, Any], grad: torch.Tensor) -> None:
        """One APOLLO step of ``p`` from its full (local) gradient ``grad``; AdamW if ``p`` is
        not projected."""
        if not self.is_projected(p, group):
            super().update_param(p, group, grad)
            return
        state = self.state[p]
        reduce = LocalView(p, None).reduce
        side = self._side(tuple(p.shape), group)
        g = grad.float()
        low = project(g, self.projection(p, group, g.device), side, reduce)
        norm_grad, step_size = self.adam_step(state, group, low)
        # A right projection's m x r rows are this process's (sharded) ones; a left one's
        # r x n is whole on every process.
        low_reduce = reduce if side == "right" else None
        if group["scale_type"] == "channel":
            dim = 0 if side == "left" else 1  # the rank axis: one factor per kept channel
            factor = _norm(norm_grad, dim, None) / (_norm(low, dim, None) + 1e-8)
            if side == "right":
                factor = factor.unsqueeze(1)
        else:
            factor = _norm(norm_grad, None, low_reduce) / (_norm(low, None, low_reduce) + 1e-8)
        update = g * factor
        root = math.sqrt(float(group["scale"]))
        if group["scale_front"]:
            update = update * root
        growth = group["growth"]
        if growth is not None:
            update = self._limit_growth(state, update, float(growth), reduce)
        if not group["scale_front"]:
            update = update * root
        self.apply_step(p, group, update, step_size)

    @staticmethod
    def _limit_growth(
        state: dict[str, Any], update: torch.Tensor, growth: float, reduce: RowReduce | None
    ) -> torch.Tensor:
        """Fira's norm-growth limiter, apollo-torch's arithmetic, no host read."""
        norm = _norm(update, None, reduce)
        prev = state["scaled_grad"]
        ratio = torch.where(prev > 0, norm / (prev + 1e-8), torch.zeros_like(norm))
        limiter = torch.clamp(ratio, min=growth) / growth
        state["scaled_grad"] = norm / limiter
        return update / limiter

    # -------------------------------------------------------------------- state dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class, or apollo-torch 1.0.3's ``APOLLOAdamW`` (in memory:
        its projector objects become tensors, their current seed the state's ``seed``).

        The groups must be built as the saved ones (the keys a saved apollo-torch group lacks
        come from this optimizer's group at the same position).
        """
        if isinstance(state_dict, dict) and is_galore_torch_state(state_dict):
            state_dict = _seeds_from_apollo_torch(state_dict)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            check_apollo_group(group)
            for p in group["params"]:
                state = self.state.get(p)
                if not state or "projector" not in state or group["proj"] != "random":
                    continue
                if self._side(tuple(p.shape), group) == "right":
                    # apollo-torch's layout (a view of r x n): the same matmul, to the bit.
                    state["projector"] = state["projector"].T.contiguous().T


def _seeds_from_apollo_torch(state_dict: dict[str, Any]) -> dict[str, Any]:
    """An apollo-torch state dict whose random projectors' current seeds are in ``seed``
    (apollo-torch's own ``seed`` entry is the first draw's)."""
    state = {}
    for pid, st in state_dict["state"].items():
        st = dict(st)
        for value in list(st.values()):
            if hasattr(value, "ortho_matrix") and hasattr(value, "seed"):
                st["seed"] = int(value.seed)
        state[pid] = st
    return {**state_dict, "state": state}


class ApolloAdamW8bit(BlockwiseMoments, ApolloAdamW):
    """:class:`ApolloAdamW` with block-wise 8-bit moments (galorax's; apollo-torch has none).

    The moments of at least ``min_8bit_size`` elements are stored as :class:`~galorax.torch.
    GaLoreAdamW8bit`'s are (``uint8`` codes of the dynamic map and one f32 absmax per block of
    ``block_size``); every step dequantizes, runs :class:`ApolloAdamW`'s f32 arithmetic and
    quantizes again. The other arguments and defaults are :class:`ApolloAdamW`'s.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(512, 128))
        >>> opt = ApolloAdamW8bit([w], rank=32, lr=1e-2)
        >>> w.grad = torch.randn(512, 128)
        >>> opt.step()
        >>> st = opt.state[w]
        >>> st["exp_avg"].dtype, tuple(st["exp_avg"].shape), tuple(st["exp_avg_absmax"].shape)
        (torch.uint8, (512, 32), (64,))
    """

    def __init__(
        self,
        params: Iterable[Any],
        *args: Any,
        block_size: int = 256,
        min_8bit_size: int = 4096,
        block_wise: bool = True,
        **kwargs: Any,
    ):
        self.set_8bit(block_size, block_wise, min_8bit_size)
        super().__init__(params, *args, **kwargs)
