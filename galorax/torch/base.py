"""The GaLore machinery shared by the optimizers: when to refresh, projection, state handling.

:class:`GaLoreOptimizer` is a ``torch.optim.Optimizer`` whose :meth:`~GaLoreOptimizer.step`
turns each gradient into the one its base optimizer sees (:meth:`~GaLoreOptimizer.prepare`:
refresh the projector when due, project), then hands it to the subclass's
:meth:`~GaLoreOptimizer.update_param`. Subclasses also say how their moments follow a change
of basis (:meth:`~GaLoreOptimizer.rotate_moments`). :class:`~galorax.torch.LayerwiseGaLore`
calls the same three methods from gradient hooks.

Example:
    >>> import torch
    >>> class SGD(GaLoreOptimizer):  # plain SGD on the projected gradient
    ...     def update_param(self, p, group, grad):
    ...         p.sub_(self.full_rank_update(p, group, grad), alpha=group["lr"])
    ...     def rotate_moments(self, state, c, side):
    ...         pass  # no moments
    >>> w = torch.nn.Parameter(torch.ones(8, 4))
    >>> opt = SGD([w], {"lr": 0.5, "rank": 2})
    >>> w.grad = torch.ones(8, 4)
    >>> opt.step()
    >>> tuple(opt.state[w]["projector"].shape), round(float(w.detach()[0, 0]), 3)
    ((4, 2), 0.5)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from galorax.torch.dtensor import LocalView, local_tensor
from galorax.torch.groups import (
    GALORE_DEFAULTS,
    check_group,
    check_moment_shapes,
    check_real,
    check_saved_groups,
    normalize_group,
)
from galorax.torch.migrate import from_galore_torch
from galorax.torch.nonfinite import update_or_keep
from galorax.torch.projector import (
    align_signs,
    fallback_basis,
    find_subspace,
    project,
    project_back,
    resolve_side,
    rotation,
    usable_flag,
)

__all__ = ["GaLoreOptimizer"]


class GaLoreOptimizer(Optimizer):
    """Base class of the GaLore optimizers: refresh, projection, state handling.

    Subclasses implement :meth:`update_param` (the base optimizer on the projected or full
    gradient) and :meth:`rotate_moments` (how their moments follow a rotation of the basis).

    Args:
        params: parameters or param groups; groups with a ``rank`` are GaLore groups.
        defaults: the base optimizer's defaults and any GaLore key (see
            :data:`~galorax.torch.GALORE_DEFAULTS`, which fills in the rest).
    """

    #: Whether :meth:`update_param` needs nothing but :meth:`prepare`'s projected gradient, so
    #: that a layer-wise mode may sum projected micro-batch gradients and free the full ones
    #: (APOLLO's update scales the full gradient: False there).
    updates_from_projection: bool = True

    def __init__(self, params: Any, defaults: dict[str, Any]):
        merged = dict(GALORE_DEFAULTS)
        merged.update(defaults)
        self._meta_cache: dict[int, tuple[int, int]] | None = None
        self._warned: set[str] = set()
        super().__init__(params, merged)

    # ---------------------------------------------------------------- param groups, metadata
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group as ``torch.optim.Optimizer`` does, then normalize and check it.

        Parameters that have stepped keep their refresh slot (``state["refresh_offset"]``);
        the new group's parameters get theirs at their first step.
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_real(group, len(self.param_groups) - 1)
        normalize_group(group)
        check_group(group)
        self._meta_cache = None
        self.__dict__["_group_cache"] = None

    def _meta(self) -> dict[int, tuple[int, int]]:
        """id(param) -> (global index, stagger offset): seeds and refresh schedule.

        The offset is only a proposal: a parameter's first :meth:`prepare` stores it in its
        state, so a later ``add_param_group`` (which changes the spread) moves no one.
        """
        if self._meta_cache is None:
            # Stagger slots are spread over all projected parameters (as the JAX API spreads
            # them over all projected leaves), each within its own group's gap.
            projected = [
                id(p) for g in self.param_groups for p in g["params"] if self.is_projected(p, g)
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
    def is_projected(p: torch.Tensor, group: dict[str, Any]) -> bool:
        """Whether ``p`` gets a projected gradient: a matrix in a GaLore group."""
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

    def group_of(self, p: torch.Tensor) -> dict[str, Any]:
        """The param group holding ``p`` (cached: layer-wise hooks ask once per parameter).

        Raises:
            KeyError: ``p`` is not in this optimizer.
        """
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

    # ---------------------------------------------------------------------- state dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as ``torch.optim.Optimizer`` does, but keep the f32 moments/projectors f32.

        (``Optimizer.load_state_dict`` casts every floating state tensor to the parameter's
        dtype, which would round f32 moments of bf16 parameters and break exact resume.)
        A galore-torch 1.0 state dict (``opt.state_dict()`` of its ``GaLoreAdamW`` or
        ``GaLoreAdafactor``) loads too: :func:`~galorax.torch.migrate.from_galore_torch` maps
        its projector objects to tensors and takes the keys its groups lack from this
        optimizer's groups (so ``subspace='svd', moments='keep', stagger=False`` given here
        continue a galore-torch run exactly).
        """
        check_saved_groups(state_dict, self.param_groups)
        state_dict = from_galore_torch(state_dict, self.param_groups)
        check_moment_shapes(state_dict, self.param_groups, self.is_projected)
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
                    device = local_tensor(p).device
                    state[key] = value.detach().to(device=device, copy=True)
        for group in self.param_groups:
            normalize_group(group)
            check_group(group)
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
                g = self.prepare(p, group, p.grad)
                self.apply_update(p, group, g)
        return loss

    def apply_update(self, p: torch.Tensor, group: dict[str, Any], grad: torch.Tensor) -> None:
        """:meth:`update_param`; with the group's ``skip_nonfinite``, a ``grad`` that is not all
        finite leaves ``p`` and its state tensors as they were
        (:func:`~galorax.torch.nonfinite.update_or_keep`: no host read)."""
        if group.get("skip_nonfinite"):
            update_or_keep(lambda g: self.update_param(p, group, g), p, self.state[p], grad)
        else:
            self.update_param(p, group, grad)

    @torch.no_grad()
    def prepare(self, p: torch.Tensor, group: dict[str, Any], grad: torch.Tensor) -> torch.Tensor:
        """Refresh the projector if due, and return the gradient to feed the base optimizer.

        For a projected parameter that is the f32 low-rank gradient (the same on every process
        for a left projection under FSDP2); otherwise the (local) gradient itself.

        Args:
            p: a parameter of ``group``.
            group: its param group (:meth:`group_of`).
            grad: its gradient (``p.grad``, or an accumulated one).
        """
        loc = self._local_view(p, grad)
        assert loc.grad is not None
        if not self.is_projected(p, group):
            return loc.grad
        side = self._refresh_if_due(p, group, loc)
        return project(loc.grad, self.state[p]["projector"], side, loc.reduce)

    def _local_view(self, p: torch.Tensor, grad: torch.Tensor) -> LocalView:
        if grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        return LocalView(p, grad)

    def _refresh_if_due(self, p: torch.Tensor, group: dict[str, Any], loc: LocalView) -> str:
        """Start a projected ``p``'s state and refresh its projector when due; its side."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
            state["refreshes"] = 0
            state["retry"] = 0
        side = self._side(loc.shape, group)
        index, offset = self._meta()[id(p)]
        state.setdefault("refresh_offset", offset)
        if self.refresh_due(p, group):
            self._refresh(group, state, loc, side, index)
        return side

    def refresh_due(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """Whether the next :meth:`prepare` of ``p`` refreshes its projector (and so needs
        ``p``'s full gradient): at its first step, on its slot of every gap, after a refused
        refresh. False for a parameter that is not projected.

        Example:
            >>> from galorax.torch import GaLoreAdamW
            >>> w = torch.nn.Parameter(torch.zeros(8, 4))
            >>> opt = GaLoreAdamW([w], rank=2, update_proj_gap=3, stagger=False)
            >>> due = []
            >>> for _ in range(4):
            ...     due.append(opt.refresh_due(w, opt.param_groups[0]))
            ...     w.grad = torch.randn(8, 4)
            ...     opt.step()
            >>> due
            [True, False, False, True]
            >>> tuple(opt.project_gradient(w, opt.param_groups[0], torch.ones(8, 4)).shape)
            (8, 2)
        """
        if not self.is_projected(p, group):
            return False
        state = self.state.get(p, {})
        s = int(state.get("step", 0))
        if s == 0 or not self.has_projection(state) or bool(state.get("retry", 0)):
            return True
        offset = int(state.get("refresh_offset", self._meta()[id(p)][1]))
        gap = int(group["update_proj_gap"])
        return s % gap == offset % gap

    @staticmethod
    def has_projection(state: dict[str, Any]) -> bool:
        """Whether a parameter's ``state`` holds its current projection (one refresh done)."""
        return "projector" in state

    @torch.no_grad()
    def project_gradient(
        self, p: torch.Tensor, group: dict[str, Any], grad: torch.Tensor
    ) -> torch.Tensor:
        """``grad`` projected with ``p``'s current projector (no refresh), in f32.

        What :meth:`prepare` returns when :meth:`refresh_due` is False; being linear, the
        projections of micro-batch gradients sum to the projection of their sum.

        Raises:
            ValueError: ``p`` is not projected or has no projector yet.
        """
        state = self.state.get(p, {})
        if not self.is_projected(p, group) or "projector" not in state:
            raise ValueError("project_gradient needs a projected parameter with a projector")
        loc = LocalView(p, grad)
        assert loc.grad is not None
        return project(loc.grad, state["projector"], self._side(loc.shape, group), loc.reduce)

    def _refresh(
        self, group: dict[str, Any], state: dict[str, Any], loc: LocalView, side: str, index: int
    ) -> None:
        rank = min(int(group["rank"]), *loc.shape)
        old = state.get("projector")
        assert loc.grad is not None
        if loc.reduce is not None and group["subspace"] == "svd":
            self._warn_once(
                "fsdp-svd",
                "subspace='svd' on a row-sharded (FSDP2) gradient all-gathers the full gradient "
                "on every process and runs the same SVD everywhere; subspace='randomized' works "
                "on the shards with small all-reduces only",
            )
        # Eager, an unusable (non-finite or all-zero) gradient is not refreshed on: keep the
        # previous projector (or, at the first step, the orthonormal placeholder eye(rows, r),
        # as the JAX API does) and retry next step. Under torch.compile there is no host read:
        # the refresh runs on the zeroed gradient (an SVD of NaN can raise) and torch.where
        # keeps the previous basis, without a retry (docs/torch.md, "torch.compile").
        traced = torch.compiler.is_compiling()
        ok = usable_flag(loc.grad, loc.reduce)
        placeholder = lambda: fallback_basis(  # noqa: E731
            loc.shape, rank, side, reduce=loc.reduce, device=loc.grad.device
        )
        if not traced and not bool(ok.item()):
            state["retry"] = 1
            if old is not None:
                return
            new = placeholder()
        else:
            zero = torch.zeros((), dtype=loc.grad.dtype, device=loc.grad.device)
            grad = torch.where(ok, loc.grad, zero) if traced else loc.grad
            new = self._find_subspace(grad, group, state, side, index, rank, loc.reduce)
            if traced:
                new = torch.where(ok, new, old if old is not None else placeholder())
            state["refreshes"] = int(state["refreshes"]) + 1
            state["retry"] = 0
        if old is not None and group["moments"] != "keep":
            new = align_signs(new, old, loc.reduce, side)
            if group["moments"] == "rotate":
                c = rotation(new, old, loc.reduce, side)
                if traced:  # a kept basis must not move the moments by C = old.T @ old's rounding
                    c = torch.where(ok, c, torch.eye(c.shape[0], dtype=c.dtype, device=c.device))
                self.rotate_moments(state, c, side)
        state["projector"] = new

    @staticmethod
    def _find_subspace(
        grad: torch.Tensor,
        group: dict[str, Any],
        state: dict[str, Any],
        side: str,
        index: int,
        rank: int,
        reduce: Any,
    ) -> torch.Tensor:
        return find_subspace(
            grad,
            rank,
            side,
            group["subspace"],
            power_iters=int(group["power_iters"]),
            oversample=int(group["oversample"]),
            warm=state.get("projector") if group["warm_start"] else None,
            seed=int(group["seed"]),
            index=index,
            refresh=int(state["refreshes"]),
            reduce=reduce,
        )

    def full_rank_update(
        self, p: torch.Tensor, group: dict[str, Any], update: torch.Tensor
    ) -> torch.Tensor:
        """Low-rank update -> the parameter's (local) shape, times ``scale``; identity if the
        parameter is not projected."""
        if not self.is_projected(p, group):
            return update
        side = self._side(tuple(p.shape), group)
        return project_back(update, self.state[p]["projector"], side) * float(group["scale"])

    # ------------------------------------------------------------------- subclass hooks
    def update_param(self, p: torch.Tensor, group: dict[str, Any], grad: torch.Tensor) -> None:
        """Apply the base optimizer's update to ``p`` from ``grad`` (:meth:`prepare`'s result).

        Implementations map a low-rank update back with :meth:`full_rank_update`.
        """
        raise NotImplementedError

    def rotate_moments(self, state: dict[str, Any], c: torch.Tensor, side: str) -> None:
        """Re-express the moments in ``state`` in a refreshed basis (``moments='rotate'``).

        Args:
            state: the parameter's optimizer state.
            c: the r x r rotation ``P_new^T P_old`` (:func:`~galorax.torch.projector.rotation`).
            side: ``'left'`` (moments r x n) or ``'right'`` (moments m x r).
        """
        raise NotImplementedError
