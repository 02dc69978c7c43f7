"""galorax for PyTorch: GaLore optimizers that resume, shard and accumulate correctly.

Needs ``torch`` (``pip install galorax[torch]``). Names load on first use, so ``import
galorax.torch`` imports neither torch nor JAX nor the training application; without torch it
still imports (so ``pytest --doctest-modules`` can collect it) and ``galorax.torch.X`` raises an
ImportError that says what to install.

The modules, bottom up:

* :mod:`~galorax.torch.projector`: subspace finding (SVD, randomized), projection, rotations;
  :mod:`~galorax.torch.sketch`: the randomized finder's Gaussian sketch (a counter-based hash).
* :mod:`~galorax.torch.dtensor`: parameters as local tensors (FSDP2 ``Shard(0)`` DTensors).
* :mod:`~galorax.torch.groups`: the GaLore param-group keys, defaults and checks.
* :mod:`~galorax.torch.base`: :class:`~galorax.torch.base.GaLoreOptimizer`, the refresh and
  state machinery every optimizer shares; :mod:`~galorax.torch.nonfinite`: its
  ``skip_nonfinite`` option.
* :mod:`~galorax.torch.adamw` (:class:`GaLoreAdamW`, :class:`GaLoreAdamW8bit`, whose moments
  :mod:`~galorax.torch.blockwise` quantizes) and :mod:`~galorax.torch.adafactor`
  (:class:`GaLoreAdafactor`); :mod:`~galorax.torch.apollo` (:class:`ApolloAdamW`,
  :class:`ApolloAdamW8bit`: APOLLO, apollo-torch's param groups, on the same machinery).
* :mod:`~galorax.torch.layerwise`: :class:`LayerwiseGaLore`, updates from gradient hooks, and
  :mod:`~galorax.torch.trainer`: :class:`LayerwiseOptimizer`, the same as a
  ``torch.optim.Optimizer`` (for the Hugging Face Trainer).
* :mod:`~galorax.torch.migrate`: galore-torch 1.0 state dicts, loaded by ``load_state_dict``.
* :mod:`~galorax.torch.targets`: :func:`param_groups` from module names (the Trainer's
  ``optim_target_modules``).

Example:
    >>> from galorax.torch import GaLoreAdamW, LayerwiseGaLore  # loads adamw, layerwise
    >>> GaLoreAdamW.__module__, LayerwiseGaLore.__module__
    ('galorax.torch.adamw', 'galorax.torch.layerwise')
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from galorax.lazy import lazy_exports

_EXPORTS = {
    "APOLLO_DEFAULTS": "galorax.torch.apollo",
    "ApolloAdamW": "galorax.torch.apollo",
    "ApolloAdamW8bit": "galorax.torch.apollo",
    "GALORE_DEFAULTS": "galorax.torch.groups",
    "GaLoreAdafactor": "galorax.torch.adafactor",
    "GaLoreAdamW": "galorax.torch.adamw",
    "GaLoreAdamW8bit": "galorax.torch.adamw",
    "LayerwiseGaLore": "galorax.torch.layerwise",
    "LayerwiseOptimizer": "galorax.torch.trainer",
    "apollo_param_groups": "galorax.torch.targets",
    "find_subspace": "galorax.torch.projector",
    "param_groups": "galorax.torch.targets",
    "resolve_side": "galorax.torch.projector",
}
_SUBMODULES = (
    "adafactor",
    "adamw",
    "apollo",
    "base",
    "blockwise",
    "dtensor",
    "groups",
    "layerwise",
    "migrate",
    "nonfinite",
    "projector",
    "sketch",
    "targets",
    "trainer",
)

__all__ = sorted(_EXPORTS)
_load, __dir__ = lazy_exports(__name__, _EXPORTS, submodules=_SUBMODULES)


def __getattr__(name: str) -> Any:
    try:
        return _load(name)
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        raise ImportError(
            "galorax.torch needs PyTorch: pip install 'galorax[torch]' (or pip install torch)"
        ) from e


if TYPE_CHECKING:
    from galorax.torch.adafactor import GaLoreAdafactor
    from galorax.torch.adamw import GaLoreAdamW, GaLoreAdamW8bit
    from galorax.torch.apollo import APOLLO_DEFAULTS, ApolloAdamW, ApolloAdamW8bit
    from galorax.torch.groups import GALORE_DEFAULTS
    from galorax.torch.layerwise import LayerwiseGaLore
    from galorax.torch.projector import find_subspace, resolve_side
    from galorax.torch.targets import apollo_param_groups, param_groups
    from galorax.torch.trainer import LayerwiseOptimizer
