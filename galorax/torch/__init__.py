"""galorax for PyTorch: GaLore optimizers that resume, shard and accumulate correctly.

Needs ``torch`` (``pip install galorax[torch]``). Without it this package still imports (so
``pytest --doctest-modules`` can collect it) but exposes nothing, and ``galorax.torch.X``
raises an ImportError that says what to install.

Example:
    >>> from galorax.torch import GaLoreAdamW, layerwise  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

try:
    import torch as _torch  # noqa: F401
except ImportError:  # pragma: no cover - exercised only without torch
    _TORCH_ERROR: ImportError | None = ImportError(
        "galorax.torch needs PyTorch: pip install 'galorax[torch]' (or pip install torch)"
    )
else:
    _TORCH_ERROR = None

if _TORCH_ERROR is None:
    from galorax.torch.layerwise import LayerwiseGaLore
    from galorax.torch.optim import (
        GALORE_DEFAULTS,
        GaLoreAdafactor,
        GaLoreAdamW,
        GaLoreAdamW8bit,
    )
    from galorax.torch.projector import find_subspace, resolve_side

__all__ = [
    "GALORE_DEFAULTS",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "LayerwiseGaLore",
    "find_subspace",
    "resolve_side",
]


def __getattr__(name: str) -> Any:
    if _TORCH_ERROR is not None and name in __all__:
        raise _TORCH_ERROR
    raise AttributeError(f"module 'galorax.torch' has no attribute {name!r}")
