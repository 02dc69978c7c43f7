"""Block-wise 8-bit quantization in torch (galorax.torch.blockwise): the JAX side's code table,
per-block absmax, padding of the last block."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from galorax.quantization.codes import dynamic_code  # noqa: E402
from galorax.torch.blockwise import code, dequantize_blockwise, quantize_blockwise  # noqa: E402


@pytest.mark.parametrize("signed", [True, False])
def test_code_is_the_shared_dynamic_table(signed):
    levels = code(signed, torch.device("cpu"))
    np.testing.assert_array_equal(levels.numpy(), dynamic_code(8, signed=signed))
    assert levels.numel() == 256 and bool((levels[1:] > levels[:-1]).all())


@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_error_is_relative_to_each_block(signed):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 70, generator=gen)  # 350 elements: the last 32-block is padded
    x[0] *= 1e-4  # a block of tiny values keeps its own scale
    x = x if signed else x.abs()
    codes, absmax = quantize_blockwise(x, block_size=32, signed=signed)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.shape == (11,)
    y = dequantize_blockwise(codes, absmax, block_size=32, signed=signed)
    blocks = torch.nn.functional.pad(x.reshape(-1), (0, 2)).view(-1, 32)
    err = torch.nn.functional.pad((y - x).reshape(-1), (0, 2)).view(-1, 32)
    assert bool((err.abs().amax(dim=1) <= 0.05 * blocks.abs().amax(dim=1)).all())


def test_zero_block_stays_zero():
    x = torch.zeros(64)
    codes, absmax = quantize_blockwise(x, block_size=32, signed=True)
    assert torch.equal(dequantize_blockwise(codes, absmax, block_size=32, signed=True), x)
