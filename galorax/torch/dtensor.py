"""Parameters as this process's plain tensors: DTensor (FSDP2) handling in one place.

The optimizers never do arithmetic on DTensors: :class:`LocalView` hands them the local
shard and, for a row-sharded (``Shard(0)``) parameter, the :class:`~galorax.torch.projector.
RowReduce` that the projector math needs to combine the shards. Plain tensors and replicated
DTensors pass through unchanged.

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(4, 3))
    >>> view = LocalView(w, torch.zeros(4, 3))
    >>> view.shape, view.param is w, view.reduce is None
    ((4, 3), True, True)
    >>> is_dtensor(w)
    False
"""

from __future__ import annotations

import torch

from galorax.torch.projector import RowReduce

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]

__all__ = ["LocalView", "is_dtensor", "local_tensor", "write_param"]


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (False without distributed)."""
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t``: its local shard for a DTensor, else ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def _row_reduce(p: torch.Tensor, shape: tuple[int, ...]) -> RowReduce | None:
    """The row all-reduce of a DTensor parameter: None if replicated, raises if unsupported."""
    placements = tuple(p.placements)  # type: ignore[attr-defined]
    mesh = p.device_mesh  # type: ignore[attr-defined]
    if all(isinstance(pl, Replicate) for pl in placements):
        return None
    if mesh.ndim == 1 and placements == (Shard(0),):
        # torch.chunk's split: ceil(m / world) rows per rank, the last ranks get fewer (or none).
        chunk = -(-shape[0] // mesh.size())
        offset = min(mesh.get_local_rank() * chunk, shape[0])
        local_rows = min(chunk, shape[0] - offset)
        return RowReduce(mesh.get_group(), shape[0], offset, local_rows)
    raise NotImplementedError(
        f"galorax.torch supports DTensor parameters sharded as (Shard(0),) on a 1-D "
        f"mesh (FSDP2's default) or replicated; got {placements}"
    )


class LocalView:
    """A parameter seen as this process's plain tensors, with the row all-reduce if sharded.

    Attributes:
        shape: the parameter's global shape.
        param: the local parameter tensor (updated in place by the optimizers).
        grad: the local gradient, or None.
        reduce: the :class:`~galorax.torch.projector.RowReduce` of a row-sharded parameter;
            None when this process holds every row.
    """

    __slots__ = ("param", "grad", "reduce", "shape")

    def __init__(self, p: torch.Tensor, grad: torch.Tensor | None):
        self.shape = tuple(p.shape)  # global shape
        self.reduce: RowReduce | None = None
        if is_dtensor(p):
            self.reduce = _row_reduce(p, self.shape)
        self.param = local_tensor(p)
        self.grad = local_tensor(grad) if grad is not None else None


def write_param(p_local: torch.Tensor, p32: torch.Tensor) -> None:
    """Store the f32 working copy ``p32`` into the (local) parameter, rounding to its dtype.

    (For an f32 parameter ``p32`` *is* the parameter, updated in place already.)
    """
    if p32 is not p_local:
        p_local.copy_(p32)
