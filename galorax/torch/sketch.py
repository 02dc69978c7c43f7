"""The randomized range finder's Gaussian sketch, from a counter-based hash (no RNG object).

The sketch of a refresh is a pure function of ``(seed, parameter index, refresh count)``,
computed with integer tensor ops on the gradient's device: every process gets the same sketch
for the same parameter, a resumed run the same as the uninterrupted one, and the computation
traces under ``torch.compile(fullgraph=True)`` (a ``torch.Generator`` cannot be created or
seeded inside a compiled graph). The hash is a 32-bit integer mix (Wellons' ``lowbias32``) in
int64 with 16-bit partial products, so nothing overflows; Box-Muller turns pairs of 24-bit
uniforms into normals.

Example:
    >>> import torch
    >>> x = gaussian(256, 64, seed=1, device=torch.device("cpu"))
    >>> x.shape, x.dtype, bool(x.equal(gaussian(256, 64, 1, torch.device("cpu"))))
    (torch.Size([256, 64]), torch.float32, True)
    >>> abs(float(x.mean())) < 0.02, abs(float(x.std()) - 1.0) < 0.02
    (True, True)
"""

from __future__ import annotations

import math

import torch

__all__ = ["gaussian", "sketch_seed"]

_M32 = 0xFFFFFFFF


def sketch_seed(seed: int, index: int, refresh: int) -> int:
    """A fixed 63-bit mix of (seed, parameter index, refresh count).

    Example:
        >>> sketch_seed(0, 1, 0) != sketch_seed(0, 0, 1)
        True
    """
    h = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + refresh * 0x94D049BB133111EB) % (
        2**63
    )
    return h ^ (h >> 31)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in [0, 2**32): partial products below 2**49."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + ((hi * c) & 0xFFFF) * 65536) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gaussian(rows: int, cols: int, seed: int, device: torch.device) -> torch.Tensor:
    """A ``rows x cols`` f32 matrix of standard normals, a pure function of ``seed``."""
    k1, k2 = seed & _M32, (seed >> 32) & _M32
    counter = torch.arange(2 * rows * cols, dtype=torch.int64, device=device)
    bits = _hash32(_hash32((counter + k1) & _M32) ^ k2)
    u = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / 2**24)  # in (0, 1)
    u1, u2 = u[0::2], u[1::2]
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
    return z.reshape(rows, cols)
