"""The planner behind ``galorax memory``: bytes of weights, gradients and optimizer state.

:func:`plan_memory` sizes weights, gradients and optimizer state of a model under AdamW,
8-bit AdamW, GaLore or 8-bit GaLore from ``jax.eval_shape`` of the real model init and the
optimizer's init as training builds it (:func:`galorax.app.optimizers.make_optimizer`; no
allocation: 7B takes under a second); :func:`compiled_step_memory` adds XLA's memory analysis
of the train step that training compiles (:mod:`galorax.app.step`) for models that compile
quickly. The command (``galorax memory`` / ``python -m galorax.app.planner``) prints the
table beside the paper's published estimates (:data:`PAPER_GB`), the assumptions that
explain the differences (:data:`ASSUMPTIONS`), and with ``--max-memory 24GB`` which ranks
and options fit.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from galorax.accounting import find_galore_states, tree_bytes
from galorax.app import model as model_lib
from galorax.app.config import DTYPES, GALORE_CHOICES, PLANNED_OPTIMIZERS, UsageError
from galorax.app.flags import positive_int
from galorax.app.optimizers import make_optimizer
from galorax.app.step import compile_step, step_memory

# --------------------------------------------------------------------------------------------
# The planner: bytes of weights, gradients and optimizer state, from abstract evaluation
# --------------------------------------------------------------------------------------------

#: Optimizers the planner sizes (:data:`galorax.app.config.PLANNED_OPTIMIZERS`).
OPTIONS = PLANNED_OPTIMIZERS

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
  or --projector-bits 8/4 narrow the gap.
"""


class MemoryEstimate(NamedTuple):
    """Bytes of one training configuration (all sizes in bytes).

    Attributes:
        option: One of :data:`OPTIONS` (with a ``+int8P`` / ``+int4P`` suffix for quantized
            projectors).
        rank: GaLore rank (0 for full-rank optimizers).
        n_params: Number of parameters.
        weights: Parameter bytes.
        grads: Gradient bytes (one per parameter, in the params dtype).
        state: Optimizer state bytes (for GaLore: moments, projectors, refresh schedules).
        projectors: The part of ``state`` held by GaLore projectors.
    """

    option: str
    rank: int
    n_params: int
    weights: int
    grads: int
    state: int
    projectors: int

    @property
    def total(self) -> int:
        """Weights + gradients + optimizer state."""
        return self.weights + self.grads + self.state


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
        rank: GaLore rank (ignored for full-rank options).
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
    galore = option.startswith("galore")
    bits = projector_bits if galore else None
    opt = make_optimizer(
        option,
        params,
        rank=rank,
        side=side,
        projector_dtype=projector_dtype,
        projector_bits=bits or 32,
    )
    state = jax.eval_shape(opt.init, params)
    state_bytes = tree_bytes(state)
    proj = sum(tree_bytes(s.projector) for s in find_galore_states(state)) if galore else 0
    if bits:
        option = f"{option}+int{bits}P"
    weights = tree_bytes(params)
    grads = weights
    if per_layer_updates:
        layer = sum(tree_bytes(x) // cfg.n_layers for x in jax.tree.leaves(params["layers"]))
        others = [tree_bytes(x) for k, x in params.items() if k != "layers"]
        grads = max([layer, *others])
    return MemoryEstimate(
        option=option,
        rank=rank if galore else 0,
        n_params=model_lib.count_params(params),
        weights=weights,
        grads=grads,
        state=state_bytes,
        projectors=proj,
    )


def compiled_step_memory(
    cfg: Any,
    option: str,
    rank: int = 128,
    *,
    dtype: Any = jnp.float32,
    batch_size: int = 4,
    seq_len: int = 256,
    remat: bool = False,
) -> dict[str, int]:
    """XLA's memory analysis of the compiled train step (grad + optimizer update + apply).

    Lowers and compiles on abstract inputs (nothing allocated, but compiling takes seconds to
    minutes: use it for small models). Params and optimizer state are donated, so their
    input buffers are reused for the outputs (``alias``).

    Returns:
        :meth:`galorax.app.step.StepMemory.as_dict`: ``argument``, ``output``, ``alias``,
        ``temp`` (activations, gradients, SVD workspace...) and
        ``peak = argument + output - alias + temp`` in bytes.

    Raises:
        RuntimeError: the backend reports no memory analysis.
    """
    params = model_lib.abstract_params(cfg, dtype)
    opt = make_optimizer(option, params, rank=rank)
    state = jax.eval_shape(opt.init, params)
    tokens = jax.ShapeDtypeStruct((batch_size, seq_len + 1), jnp.int32)
    memory = step_memory(compile_step(cfg, opt, params, state, tokens, remat))
    if memory is None:  # some backends do not report
        raise RuntimeError("this backend reports no memory analysis")
    return memory.as_dict()


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def format_table(rows: Sequence[tuple[str, MemoryEstimate]], budget: int | None = None) -> str:
    """A text table: one row per (model, estimate), sizes in GB, the paper's figure beside."""
    head = (
        f"{'model':<8} {'params':>8} {'optimizer':<18} {'rank':>5} {'weights':>8} {'grads':>7}"
        f" {'state':>7} {'(proj)':>7} {'w+state':>8} {'paper':>6} {'total':>7}"
    )
    lines = [head, "-" * len(head)]
    for name, e in rows:
        paper = PAPER_GB.get(name, {}).get(e.option)
        if paper is not None and e.rank and e.rank != model_lib.PAPER_RANKS.get(name):
            paper = None  # the paper's figure is for its own rank
        fit = "" if budget is None else ("  fits" if e.total <= budget else "  over")
        lines.append(
            f"{name:<8} {e.n_params / 1e6:>7.0f}M {e.option:<18} {e.rank or '-':>5}"
            f" {_gb(e.weights):>8} {_gb(e.grads):>7} {_gb(e.state):>7} {_gb(e.projectors):>7}"
            f" {_gb(e.weights + e.state):>8} {'' if paper is None else f'{paper:.2f}':>6}"
            f" {_gb(e.total):>7}{fit}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line: ``galorax memory`` (and ``python -m galorax.app.planner``)
# --------------------------------------------------------------------------------------------


def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``galorax memory`` flags to ``parser``."""
    parser.add_argument(
        "--preset", nargs="+", help="model presets (tiny 60m 130m 350m 1b 7b; default: 60m..7b)"
    )
    parser.add_argument(
        "--config",
        help="a model of your own: JSON object or key=value list of galorax.app.model.ModelConfig "
        "fields, e.g. 'd_model=2560,n_layers=32,n_heads=32,d_ff=6912'",
    )
    parser.add_argument("--vocab-size", type=positive_int, default=32000, help="(default: 32000)")
    parser.add_argument(
        "--optimizer", nargs="+", default=list(OPTIONS), choices=OPTIONS, help="(default: all)"
    )
    parser.add_argument(
        "--rank",
        nargs="+",
        type=positive_int,
        default=None,
        help="GaLore ranks (default: the paper's)",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    sides = GALORE_CHOICES["side"]
    parser.add_argument("--side", default="auto", choices=sides, help="GaLore side (default auto)")
    parser.add_argument("--projector-dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument(
        "--projector-bits",
        type=int,
        choices=(8, 4),
        help="also size GaLore with int8/int4 projectors (galorax.quantization.quantize_projector)",
    )
    parser.add_argument(
        "--per-layer-updates",
        action="store_true",
        help="count only one layer's gradient (the paper's 7B setting: weights updated "
        "during the backward pass)",
    )
    parser.add_argument(
        "--max-memory",
        help="a budget such as 24GB: sweep ranks and options and say which totals fit",
    )
    parser.add_argument(
        "--xla",
        action="store_true",
        help="also compile the train step and print XLA's memory analysis (models <= "
        "--xla-max-params only)",
    )
    parser.add_argument("--xla-max-params", type=float, default=1.5e8)
    parser.add_argument("--batch-size", type=positive_int, default=4, help="for --xla (default: 4)")
    parser.add_argument("--seq-len", type=positive_int, default=256, help="for --xla (default 256)")


def _parse_config(text: str, vocab_size: int) -> model_lib.ModelConfig:
    try:
        return model_lib.parse_model_config(text, vocab_size)
    except ValueError as e:
        raise UsageError(
            f"--config {text.strip()!r}: {e} (e.g. 'd_model=2560,n_layers=32,n_heads=32,d_ff=6912')"
        ) from None


def _models(args: argparse.Namespace) -> list[tuple[str, model_lib.ModelConfig]]:
    models: list[tuple[str, model_lib.ModelConfig]] = []
    if args.config:
        models.append(("custom", _parse_config(args.config, args.vocab_size)))
    presets = args.preset or ([] if args.config else ["60m", "130m", "350m", "1b", "7b"])
    for p in presets:
        if p not in model_lib.PRESETS:
            raise UsageError(
                f"--preset {p!r} is unknown; choose from {', '.join(model_lib.PRESETS)}"
            )
        models.append((p, model_lib.get_preset(p, vocab_size=args.vocab_size)))
    return models


def _default_rank(name: str, cfg: model_lib.ModelConfig) -> int:
    return model_lib.PAPER_RANKS.get(name, max(cfg.d_model // 4, 1))


def _plan_rows(
    args: argparse.Namespace, models: list[tuple[str, model_lib.ModelConfig]], sweep: bool
) -> list[tuple[str, MemoryEstimate]]:
    """One estimate per model, option and rank (``sweep``: every sensible rank)."""
    kw: dict[str, Any] = dict(
        dtype=DTYPES[args.dtype],
        side=args.side,
        projector_dtype=DTYPES[args.projector_dtype],
        per_layer_updates=args.per_layer_updates,
    )
    rows: list[tuple[str, MemoryEstimate]] = []
    for name, cfg in models:
        default_rank = _default_rank(name, cfg)
        ranks = args.rank or [default_rank]
        if sweep and not args.rank:  # smallest to largest sensible rank
            ranks = sorted({r for r in (64, 128, 256, 512, 1024, default_rank) if r <= cfg.d_model})
        for option in args.optimizer:
            for rank in ranks if option.startswith("galore") else [0]:
                rows.append((name, plan_memory(cfg, option, rank or default_rank, **kw)))
                if option.startswith("galore") and args.projector_bits:
                    bits = args.projector_bits
                    rows.append((name, plan_memory(cfg, option, rank, projector_bits=bits, **kw)))
    return rows


def _print_fits(
    rows: list[tuple[str, MemoryEstimate]], names: list[str], budget: int, text: str
) -> None:
    print(f"Fits in {text} (weights + gradients + optimizer state; activations")
    print("not counted: add them from --xla or your own batch):")
    for name in names:
        fit = [e for n, e in rows if n == name and e.total <= budget]
        if not fit:
            print(f"  {name}: nothing fits")
            continue
        listed = ", ".join(f"{e.option}" + (f" r{e.rank}" if e.rank else "") for e in fit)
        best = max(fit, key=lambda e: (e.option.startswith("galore"), e.rank, -e.total))
        print(f"  {name}: {listed}")
        if best.rank:
            print(f"    -> largest GaLore rank that fits: {best.rank} ({best.option})")


def _print_xla(args: argparse.Namespace, models: list[tuple[str, model_lib.ModelConfig]]) -> None:
    print("XLA memory analysis of the compiled train step (f32 params, donated state), GB:")
    print(f"  batch {args.batch_size} x seq {args.seq_len}")
    for name, cfg in models:
        if model_lib.count_params(model_lib.abstract_params(cfg)) > args.xla_max_params:
            continue
        for option in args.optimizer:
            rank = (args.rank or [_default_rank(name, cfg)])[0]
            m = compiled_step_memory(
                cfg, option, rank, batch_size=args.batch_size, seq_len=args.seq_len
            )
            print(
                f"  {name:<8} {option:<11} args {_gb(m['argument'])}  temp {_gb(m['temp'])}"
                f"  alias {_gb(m['alias'])}  peak {_gb(m['peak'])}"
            )


def run_memory(args: argparse.Namespace) -> int:
    """Runs ``galorax memory``: prints the table (and fits / XLA figures); returns 0."""
    models = _models(args)
    try:
        budget = parse_bytes(args.max_memory) if args.max_memory else None
    except ValueError as e:
        raise UsageError(f"--max-memory: {e}") from None
    rows = _plan_rows(args, models, sweep=budget is not None)
    print(format_table(rows, budget))
    print()
    print(ASSUMPTIONS)
    if budget is not None:
        _print_fits(rows, [name for name, _ in models], budget, args.max_memory)
    if args.xla:
        _print_xla(args, models)
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m galorax.app.planner")
    add_memory_arguments(_parser)
    sys.exit(run_memory(_parser.parse_args()))
