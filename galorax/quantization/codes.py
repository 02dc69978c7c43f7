"""Quantization code tables (numpy only: galorax.torch's 8-bit optimizer shares them).

The *dynamic* ("dynamic tree") map of 8-bit Adam (Dettmers et al., 2022, arXiv 2110.02861)
spends its levels on orders of magnitude like a float does; the *linear* (uniform) map suits
near-Gaussian data such as projector matrices.
"""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np

Code = Literal["dynamic", "linear"]


def check_bits(bits: int) -> None:
    """Raises ``ValueError`` unless ``bits`` is 4 or 8."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")


@functools.cache
def dynamic_code(bits: int = 8, signed: bool = True) -> np.ndarray:
    """The dynamic (dynamic-tree) quantization map of 8-bit Adam, sorted, in ``[-1, 1]``.

    Same construction as ``bitsandbytes.functional.create_dynamic_map`` with
    ``max_exponent_bits = bits - 1``: for each decade ``10**(e - bits + 2)`` (``e = 0 ..
    bits - 2``) the interval ``[0.1, 1]`` is split into ``2**e`` (signed) or ``2**(e + 1)``
    (unsigned) linear steps whose midpoints become levels, mirrored for the sign; then 0 and 1
    are added. Levels are dense near 1 and sparse but present down to ``~1e-7`` (8-bit), so
    small moments keep a relative rather than absolute precision.

    Args:
        bits: 8 or 4.
        signed: Signed map (first moment) or unsigned map (second moment, twice the levels).

    Returns:
        ``2**bits`` sorted ``float32`` levels.

    Example:
        >>> c = dynamic_code(8, signed=True)
        >>> c.shape, float(c[-1]), float(c.min()) > -1.0
        ((256,), 1.0, True)
    """
    check_bits(bits)
    levels: list[float] = []
    n = bits - 1  # non-sign bits; bitsandbytes uses max_exponent_bits = n as well
    for e in range(n):
        items = 2 ** (e + (0 if signed else 1)) + 1
        bounds = np.linspace(0.1, 1.0, items)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        decade = 10.0 ** (-(n - 1) + e)
        levels += list(decade * means)
        if signed:
            levels += list(-decade * means)
    levels += [0.0, 1.0]
    assert len(levels) == 2**bits, len(levels)
    return np.sort(np.asarray(levels, np.float32))


@functools.cache
def linear_code(bits: int = 8, signed: bool = True) -> np.ndarray:
    """The uniform map in ``[-1, 1]`` (signed, symmetric, exact zero) or ``[0, 1]``.

    The signed map has ``2**bits - 1`` levels (index ``2**bits - 1`` repeats 1.0, unused) so
    that 0 is exact and the map is symmetric; the unsigned one has ``2**bits``.

    Example:
        >>> linear_code(4, signed=True)[:3].tolist(), float(linear_code(4)[7])
        ([-1.0, -0.8571428656578064, -0.7142857313156128], 0.0)
    """
    check_bits(bits)
    if signed:
        levels = np.linspace(-1.0, 1.0, 2**bits - 1)
        levels = np.concatenate([levels, [1.0]])
    else:
        levels = np.linspace(0.0, 1.0, 2**bits)
    return levels.astype(np.float32)


def code_table(code: Code, bits: int, signed: bool) -> np.ndarray:
    """The sorted level table of ``code`` (see :func:`dynamic_code`, :func:`linear_code`)."""
    if code == "dynamic":
        return dynamic_code(bits, signed)
    if code == "linear":
        return linear_code(bits, signed)
    raise ValueError(f"code must be 'dynamic' or 'linear', got {code!r}")
