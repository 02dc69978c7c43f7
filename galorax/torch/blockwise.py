"""Block-wise 8-bit quantization in plain torch, on the JAX side's dynamic code table.

A tensor is cut into blocks of ``block_size`` consecutive elements (the last one zero-padded);
each block is divided by its absmax and every element stored as the ``uint8`` index of the
nearest level of the 8-bit dynamic (8-bit Adam) map, signed or unsigned. The table is
:func:`galorax.quantization.codes.dynamic_code` (numpy only), so both APIs share one map.

Example:
    >>> import torch
    >>> x = torch.linspace(-1.0, 1.0, 100)
    >>> codes, absmax = quantize_blockwise(x, block_size=64, signed=True)
    >>> codes.dtype, tuple(codes.shape), tuple(absmax.shape)
    (torch.uint8, (100,), (2,))
    >>> y = dequantize_blockwise(codes, absmax, block_size=64, signed=True)
    >>> bool((y - x).abs().max() < 0.03)
    True
"""

from __future__ import annotations

import torch

from galorax.quantization.codes import dynamic_code

__all__ = ["code", "dequantize_blockwise", "quantize_blockwise"]


def code(signed: bool, device: torch.device) -> torch.Tensor:
    """The sorted 256 levels of the 8-bit dynamic map in ``[-1, 1]`` (``[0, 1]`` unsigned)."""
    return torch.from_numpy(dynamic_code(8, signed=signed).copy()).to(device)


def _blocks(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """``flat`` zero-padded to whole blocks, one block per row."""
    pad = (-flat.numel()) % block_size
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size)


def quantize_blockwise(
    x: torch.Tensor, block_size: int, signed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as uint8 codes of its shape and one f32 absmax per block.

    Args:
        x: a float32 tensor.
        block_size: elements per block.
        signed: use the signed map (first moment) or the unsigned one (second moment).
    """
    levels = code(signed, x.device)
    flat = x.reshape(-1)
    blocks = _blocks(flat, block_size)
    absmax = blocks.abs().amax(dim=1)
    normed = blocks / absmax.clamp_min(1e-30).unsqueeze(1)
    # Nearest level: the sorted table's midpoints split [-1, 1] into 256 bins.
    idx = torch.bucketize(normed.clamp(-1.0, 1.0), (levels[1:] + levels[:-1]) / 2)
    return idx.to(torch.uint8).view(-1)[: flat.numel()].view(x.shape), absmax


def dequantize_blockwise(
    codes: torch.Tensor, absmax: torch.Tensor, block_size: int, signed: bool
) -> torch.Tensor:
    """The float32 tensor that :func:`quantize_blockwise`'s ``(codes, absmax)`` stand for."""
    flat = code(signed, codes.device)[codes.reshape(-1).long()]
    out = (_blocks(flat, block_size) * absmax.unsqueeze(1)).view(-1)[: flat.numel()]
    return out.view(codes.shape)
