"""The planner behind ``galorax memory``: bytes of weights, gradients and optimizer state.

:func:`plan_memory` sizes weights, gradients and optimizer state of a model under AdamW,
8-bit AdamW, GaLore (galorax's or optax's), 8-bit GaLore, APOLLO or APOLLO-Mini (and their
8-bit moments) from ``jax.eval_shape`` of the real model init and the optimizer's init as
training builds it
(:func:`galorax.app.optimizers.make_optimizer`; no allocation: 7B takes under a second);
:func:`compiled_step_memory` adds XLA's memory analysis of the train step that training
compiles (:mod:`galorax.app.step`) for models that compile quickly; :func:`format_table`
prints estimates beside the paper's published ones (:data:`PAPER_GB`), :data:`ASSUMPTIONS`
explains the differences. The command is :mod:`galorax.app.memory`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

import galorax
from galorax import tree_bytes
from galorax.app import model as model_lib
from galorax.app.config import (
    EIGHT_BIT,
    FIXED_RANK,
    LOW_RANK_SETTINGS,
    OPTIMIZERS,
    TrainConfig,
    resolve_config,
)
from galorax.app.optimizers import make_optimizer
from galorax.app.step import run_step_memory

#: Optimizers the planner sizes: all of them (by default
#: :data:`galorax.app.config.PLANNED_OPTIMIZERS`, the paper's).
OPTIONS = OPTIMIZERS

#: Zhao et al. 2024 (arXiv 2403.03507), Table 2: memory estimate of BF16 weights + optimizer
#: states, full-rank AdamW vs GaLore, in GB; and the 7B runs with 8-bit states.
PAPER_GB: dict[str, dict[str, float]] = {
    "60m": {"adamw": 0.36, "galore": 0.24},
    "130m": {"adamw": 0.76, "galore": 0.52},
    "350m": {"adamw": 2.06, "galore": 1.22},
    "1b": {"adamw": 7.80, "galore": 4.38},
    "7b": {"adamw8bit": 26.0, "galore8bit": 18.0},
}

#: What the planner counts and why its figures differ from the paper's (printed with the table).
ASSUMPTIONS = """\
Assumptions (ours vs the paper's estimates):
- Bytes are counted from jax.eval_shape of galorax.app.model.init_params and of the optimizer's
  real init (nothing allocated); GB = 1e9 bytes. LLaMA shapes with a 32000-token vocabulary
  (T5 tokenizer, as in the paper), untied embedding and head, no biases.
- 'paper' is weights + optimizer states (the paper's estimate excludes gradients and
  activations); our 'total' adds one gradient per weight (params dtype). The paper trains 7B
  with per-layer weight updates, so it never holds the full gradient (--per-layer-updates
  counts one layer's gradient, or the largest unstacked one, instead).
- AdamW: optax.adamw keeps mu and nu in the params dtype (BF16 -> 4 bytes/param).
  8-bit AdamW: uint8 codes + one f32 scale per 256 values (~2.03 bytes/param); tensors under
  4096 values stay f32.
- GaLore projects the stacked attention/MLP matrices only (per-layer projectors), the short
  side by default (side=auto); embeddings, norms and head keep full-rank Adam.
  galorax keeps low-rank moments in f32 even for BF16 params (BF16 moments stall: bf16(0.999)
  == 1) and projectors in --projector-dtype (default f32), plus a few per-layer refresh
  counters; the paper's estimate assumes BF16 for all of these. --projector-dtype bfloat16
  or --projector-bits 8/4 narrow the gap. optax-galore (optax.contrib.galore, as training
  builds it) folds the layer axis: one projector per matrix name, shared by all layers.
- APOLLO projects the same matrices, the short side (side=std), onto a random rank-r matrix
  that is regenerated from a key and never stored: its state is rank-r f32 moments per layer
  (8-bit with apollo8bit, the full-rank leaves' too), one f32 limiter norm per matrix and a
  count; full-rank Adam elsewhere. APOLLO-Mini is rank 1 (its rank column says 1).
"""


class MemoryEstimate(NamedTuple):
    """One training configuration of a preset and its bytes (:class:`galorax.MemoryPlan`:
    ``weights``, ``grads``, ``state``, ``projectors`` and ``total``, read through).

    Attributes:
        option: One of :data:`OPTIONS` (with a ``+int8P`` / ``+int4P`` suffix for quantized
            projectors).
        rank: GaLore or APOLLO rank (APOLLO-Mini: 1; 0 for full-rank optimizers).
        n_params: Number of parameters.
        plan: Its bytes.
    """

    option: str
    rank: int
    n_params: int
    plan: galorax.MemoryPlan

    @property
    def weights(self) -> int:
        return self.plan.weights

    @property
    def grads(self) -> int:
        return self.plan.grads

    @property
    def state(self) -> int:
        return self.plan.state

    @property
    def projectors(self) -> int:
        return self.plan.projectors

    @property
    def total(self) -> int:
        return self.plan.total


def parse_bytes(text: str) -> int:
    """Parses a size such as ``24GB``, ``24GiB``, ``512MB`` or ``1e9`` into bytes.

    Example:
        >>> parse_bytes("24GB"), parse_bytes("1GiB"), parse_bytes("1.5e3")
        (24000000000, 1073741824, 1500)
    """
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
    units |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not m or m.group(2) not in units:
        raise ValueError(f"not a size: {text!r} (use e.g. 24GB, 24GiB, 512MB)")
    return int(float(m.group(1)) * units[m.group(2)])


def plan_memory(
    cfg: Any,
    option: str,
    rank: int = 128,
    *,
    dtype: Any = jnp.bfloat16,
    side: Any = "auto",
    projector_dtype: Any = jnp.float32,
    projector_bits: int | None = None,
    per_layer_updates: bool = False,
) -> MemoryEstimate:
    """Sizes weights, gradients and optimizer state of ``cfg`` under ``option`` without
    allocating: ``jax.eval_shape`` of the model's init and of the optimizer's init.

    Args:
        cfg: A :class:`galorax.app.model.ModelConfig`.
        option: One of :data:`OPTIONS`.
        rank: GaLore or APOLLO rank (ignored for full-rank options and APOLLO-Mini).
        dtype: Parameter (and gradient) dtype.
        side: GaLore projection side.
        projector_dtype: GaLore projector storage dtype.
        projector_bits: 8 or 4: GaLore with quantized projectors (``galorax.galore(...,
            projector_bits=...)``; the state is sized as that optimizer really holds it).
        per_layer_updates: Count gradient memory as the paper's 7B run does: each layer's
            weights are updated as soon as its gradient exists, so only the largest of one
            layer's gradients or one unstacked leaf's (embedding, head) is held.

    Example:
        >>> from galorax.app.model import ModelConfig
        >>> cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=2, d_ff=128)
        >>> est = plan_memory(cfg, "adamw", dtype=jnp.float32)
        >>> est.state == 2 * est.weights + 4  # mu, nu and an int32 count
        True
    """
    params = model_lib.abstract_params(cfg, dtype)
    bits = projector_bits if option.startswith("galore") else None  # galorax's GaLore only
    opt = make_optimizer(
        option,
        params,
        rank=rank,
        side=side,
        projector_dtype=projector_dtype,
        projector_bits=bits or 32,
    )
    if bits:
        option = f"{option}+int{bits}P"
    grads = None
    if per_layer_updates:
        layer = sum(tree_bytes(x) // cfg.n_layers for x in jax.tree.leaves(params["layers"]))
        others = [tree_bytes(x) for k, x in params.items() if k != "layers"]
        grads = max([layer, *others])
    plan = galorax.plan_memory(params, opt, grads=grads)
    return MemoryEstimate(
        option=option,
        rank=rank_of(option, rank),
        n_params=model_lib.count_params(params),
        plan=plan,
    )


def _base(option: str) -> str:
    """The optimizer of ``option`` (an 8-bit name's, a ``+int8P`` suffix dropped)."""
    name = option.partition("+")[0]
    return EIGHT_BIT.get(name, name)


def takes_rank(option: str) -> bool:
    """Whether ``option``'s rank is a setting (GaLore, APOLLO; not APOLLO-Mini's, nor AdamW)."""
    return "rank" in LOW_RANK_SETTINGS[_base(option)]


def rank_of(option: str, rank: int) -> int:
    """``option``'s rank when asked for ``rank``: APOLLO-Mini's fixed 1, AdamW 0.

    Example:
        >>> rank_of("galore8bit+int8P", 128), rank_of("apollo-mini8bit", 128), rank_of("adamw", 1)
        (128, 1, 0)
    """
    return FIXED_RANK.get(_base(option), rank if takes_rank(option) else 0)


def compiled_step_memory(
    cfg: Any,
    option: str,
    rank: int = 128,
    *,
    dtype: Any = jnp.float32,
    batch_size: int = 4,
    seq_len: int = 256,
    remat: bool = False,
    per_layer_updates: bool = False,
    projector_bits: int | None = None,
    side: str = "auto",
    device: jax.Device | None = None,
    placement: Any = None,
) -> dict[str, int]:
    """XLA's memory analysis of the train step ``galorax train`` compiles with the same
    flags (:func:`galorax.app.step.run_step_memory`: the run's optimizer, clipping and
    schedule, the one step builder), on abstract inputs: nothing is allocated, any size
    compiles on CPU (compiling a 7b step takes minutes).

    ``device`` compiles for that device instead of the default one: a compile-only GPU of
    :func:`galorax.app.targets.target_device` gives XLA:GPU's analysis without a GPU. A
    ``placement`` (:class:`galorax.app.distributed.TrainPlacement`) compiles the step
    sharded on its mesh, as ``galorax train --mesh`` runs it: the bytes are per device.

    Returns:
        :meth:`galorax.app.step.StepMemory.as_dict`: ``argument``, ``output``, ``alias``,
        ``temp`` (activations, gradients, SVD workspace...) and
        ``peak = argument + output - alias + temp`` in bytes.

    Raises:
        RuntimeError: the backend reports no memory analysis.
        UsageError: flags ``galorax train`` refuses (e.g. float16, or ``side`` for AdamW).
    """
    galore = option.startswith("galore")
    train = TrainConfig(
        optimizer=option,
        rank=rank if takes_rank(option) else None,
        dtype="bfloat16" if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype).name,
        batch_size=batch_size,
        seq_len=seq_len,
        remat=remat,
        per_layer_updates=per_layer_updates,
        projector_bits=projector_bits if galore else None,
        side=side if galore and side != "auto" else None,
    )
    memory = run_step_memory(resolve_config(train), cfg, device, placement)
    if memory is None:  # some backends do not report
        raise RuntimeError("this backend reports no memory analysis")
    return memory.as_dict()


def divergence_note(estimate: MemoryEstimate, step_peak: int) -> str:
    """Why XLA's compiled peak and the planner's total differ, when by more than 15%.

    Example:
        >>> import galorax
        >>> e = MemoryEstimate("adamw", 0, 10, galorax.MemoryPlan(100, 100, 200, 0))
        >>> divergence_note(e, 420), divergence_note(e, 600)[:40]
        ('', 'XLA peak 50% above the planner: activati')
    """
    ratio = step_peak / estimate.total - 1
    if abs(ratio) <= 0.15:
        return ""
    if ratio > 0:
        return (
            f"XLA peak {ratio:.0%} above the planner: activations and f32 temporaries "
            "(of the backward pass, the update, the refresh), which the planner does not count"
        )
    return (
        f"XLA peak {-ratio:.0%} below the planner: XLA reuses gradient buffers for the "
        "update (and frees each layer's gradient with per-layer updates)"
    )


def gb(n: float) -> str:
    """``n`` bytes in GB (1e9 bytes), two decimals."""
    return f"{n / 1e9:.2f}"


#: The memory table's columns: (header with its unit, width).
_COLUMNS = (
    ("model", 8),
    ("params", 8),
    ("optimizer", 18),
    ("rank", 5),
    ("weights GB", 10),
    ("grads GB", 8),
    ("state GB", 8),
    ("(proj) GB", 9),
    ("w+state GB", 10),
    ("paper GB", 8),
    ("total GB", 8),
)


def _row(cells: Sequence[str]) -> str:
    """One table line: text columns left-aligned, numbers right-aligned."""
    out = []
    for (head, width), cell in zip(_COLUMNS, cells, strict=True):
        out.append(f"{cell:<{width}}" if head in ("model", "optimizer") else f"{cell:>{width}}")
    return " ".join(out)


def format_table(rows: Sequence[tuple[str, MemoryEstimate]], budget: int | None = None) -> str:
    """A text table: one row per (model, estimate), sizes in GB (1e9 bytes), parameters in
    millions, the paper's figure beside."""
    head = _row([h for h, _ in _COLUMNS])
    lines = [head, "-" * len(head)]
    for name, e in rows:
        paper = PAPER_GB.get(name, {}).get(e.option)
        if paper is not None and e.rank and e.rank != model_lib.PAPER_RANKS.get(name):
            paper = None  # the paper's figure is for its own rank
        fit = "" if budget is None else ("  fits" if e.total <= budget else "  over")
        cells = [name, f"{e.n_params / 1e6:.0f}M", e.option, str(e.rank or "-")]
        cells += [gb(e.weights), gb(e.grads), gb(e.state), gb(e.projectors)]
        cells += [gb(e.weights + e.state), "" if paper is None else f"{paper:.2f}", gb(e.total)]
        lines.append(_row(cells) + fit)
    return "\n".join(lines)
