"""The training loop behind ``galorax train``: optimizer, schedule, metrics, summary.

Everything a run needs is in :class:`TrainConfig`; :func:`train` runs it into an output
directory (``config.json``, ``metrics.jsonl``, ``loss_curve.png``, ``summary.json`` and
``checkpoints/``) and returns the summary. ``galorax compare`` calls :func:`train` once per
optimizer and learning rate.

Example:
    >>> cfg = TrainConfig(optimizer="adamw", steps=10)
    >>> resolve_config(cfg).warmup  # 10% of the steps by default, as in the paper
    1
    >>> sched = make_schedule(1e-2, warmup=10, steps=100)
    >>> round(float(sched(10)), 6), round(float(sched(100)), 6)  # peak, then 10% at the end
    (0.01, 0.001)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from galorax.accounting import tree_bytes
from galorax.app import data as data_lib
from galorax.app import model as model_lib

OPTIMIZERS = ("galore", "adamw", "optax-galore", "galore8bit", "adamw8bit")
#: Names (as in ``galorax memory``) for an optimizer with 8-bit Adam moments.
EIGHT_BIT = {"galore8bit": "galore", "adamw8bit": "adamw"}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
#: Files a run writes into ``--out``; ``--overwrite`` removes these and nothing else.
RUN_FILES = ("config.json", "metrics.jsonl", "loss_curve.png", "summary.json", "checkpoints")
#: Per-optimizer default peak learning rates (the paper tuned GaLore higher, scale 0.25).
DEFAULT_LR = {"adamw": 1e-3, "galore": 1e-2, "optax-galore": 1e-2}


class UsageError(ValueError):
    """A bad flag or output directory; the message names the flag and the fix."""


@dataclasses.dataclass
class TrainConfig:
    """Settings of one training run (``None`` means: pick the documented default).

    Attributes:
        preset: Model size, a key of :data:`galorax.app.model.PRESETS`.
        optimizer: ``galore``, ``adamw`` or ``optax-galore``.
        rank: GaLore rank (default: the paper's rank for the preset; d_model / 4 for tiny).
        update_proj_gap: Steps between projector refreshes.
        scale: GaLore update scale (the paper's 0.25).
        lr: Peak learning rate (default per optimizer: :data:`DEFAULT_LR`).
        warmup: Linear warmup steps (default 10% of ``steps``), then cosine decay to 10%.
        steps: Total optimizer steps.
        batch_size: Sequences per step.
        seq_len: Tokens per sequence.
        dtype: Parameter dtype, ``float32`` or ``bfloat16``.
        seed: Seed of the initialization and the data order.
        weight_decay: Decoupled weight decay (all optimizers; the paper used 0).
        grad_clip: Global-norm gradient clipping (0 disables).
        data: ``None`` (embedded stdlib corpus), a path, ``c4`` or ``hf:NAME[:CONFIG]``.
        checkpoint_every: Save a checkpoint every this many steps (0: only at the end).
        eval_every: Validation every this many steps (default: 10 times per run).
        eval_batches: Number of validation batches.
        subspace: galore only: ``randomized`` or ``svd`` refresh.
        moments: galore only: ``keep``, ``align`` or ``rotate`` at a refresh.
        stagger: galore only: spread the refreshes of the layers over the gap.
        side: galore only: ``auto``, ``std``, ``reverse_std``, ``left`` or ``right``.
        residual: galore only: residual compensation, ``channel`` or ``matrix``
            (:class:`galorax.Residual`); None: off.
        adaptive: galore only: adaptive refresh gaps (:class:`galorax.AdaptiveRefresh`).
        state_bits: 32, or 8 for 8-bit Adam moments (adamw: :func:`galorax.adamw_8bit`;
            galore: :func:`galorax.scale_by_adam_8bit` as the base optimizer).
        projector_bits: galore only: store projectors in 8 or 4 bits (None: f32).
        remat: Recompute activations in the backward pass (less memory, more compute).
        mesh: Shard the run over a device mesh, e.g. ``data=2,fsdp=4`` (all processes'
            devices): params and optimizer state FSDP over ``fsdp``, the batch's rows over
            ``data`` and ``fsdp`` (:class:`galorax.app.distributed.TrainPlacement`); GaLore's
            refreshes split the layers over ``data`` (``refresh_axes``). None: one device.
    """

    preset: str = "tiny"
    optimizer: str = "galore"
    rank: int | None = None
    update_proj_gap: int = 200
    scale: float = 0.25
    lr: float | None = None
    warmup: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    dtype: str = "float32"
    seed: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    data: str | None = None
    checkpoint_every: int | None = None
    eval_every: int | None = None
    eval_batches: int = 8
    subspace: str | None = None
    moments: str | None = None
    stagger: bool | None = None
    side: str | None = None
    residual: str | None = None
    adaptive: bool | None = None
    state_bits: int = 32
    projector_bits: int | None = None
    remat: bool = False
    mesh: str | None = None


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fills the ``None`` defaults that depend on the preset and optimizer; validates.

    Raises:
        UsageError: an unknown preset, optimizer or dtype, or a non-positive size.
    """
    if cfg.preset not in model_lib.PRESETS:
        raise UsageError(
            f"--preset {cfg.preset!r} is unknown; choose one of: {', '.join(model_lib.PRESETS)}"
        )
    if cfg.optimizer not in OPTIMIZERS:
        raise UsageError(f"--optimizer {cfg.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    if cfg.dtype not in DTYPES:
        raise UsageError(f"--dtype {cfg.dtype!r}: choose one of {', '.join(DTYPES)}")
    if cfg.optimizer in EIGHT_BIT:  # galore8bit = galore with --state-bits 8
        cfg = dataclasses.replace(cfg, optimizer=EIGHT_BIT[cfg.optimizer], state_bits=8)
    _check_optimizer_options(cfg)
    tiny = cfg.preset == "tiny"
    c = dataclasses.replace(cfg)
    c.steps = c.steps if c.steps is not None else (300 if tiny else 1000)
    c.batch_size = c.batch_size or 16
    c.seq_len = c.seq_len or (128 if tiny else 256)
    c.lr = c.lr if c.lr is not None else DEFAULT_LR[c.optimizer]
    c.rank = c.rank or model_lib.PAPER_RANKS[c.preset]
    c.warmup = c.warmup if c.warmup is not None else max(1, c.steps // 10)
    c.eval_every = c.eval_every or max(1, c.steps // 10)
    c.checkpoint_every = c.checkpoint_every if c.checkpoint_every is not None else 100
    for name in ("steps", "batch_size", "seq_len", "rank", "update_proj_gap", "eval_batches"):
        if getattr(c, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(c, name)}")
    if c.warmup < 0 or c.warmup > c.steps:
        raise UsageError(f"--warmup {c.warmup} must be between 0 and --steps {c.steps}")
    if c.lr <= 0 or not math.isfinite(c.lr):
        raise UsageError(f"--lr must be a positive number, got {c.lr}")
    if c.mesh is not None:
        from galorax.sharding import parse_mesh

        try:
            parse_mesh(c.mesh)
        except ValueError as e:
            raise UsageError(f"--mesh: {e}") from None
    return c


#: Settings that only GaLore (galorax's) takes, as flags.
_GALORE_ONLY = ("subspace", "moments", "stagger", "side", "residual", "adaptive", "projector_bits")


def _check_optimizer_options(cfg: TrainConfig) -> None:
    if cfg.residual not in (None, "channel", "matrix"):
        raise UsageError(f"--residual {cfg.residual!r}: choose channel or matrix")
    if cfg.state_bits not in (32, 8):
        raise UsageError(f"--state-bits {cfg.state_bits}: choose 32 or 8")
    if cfg.projector_bits not in (None, 8, 4):
        raise UsageError(f"--projector-bits {cfg.projector_bits}: choose 8 or 4 (or leave out)")
    if cfg.optimizer == "galore":
        return
    given = [k for k in _GALORE_ONLY if getattr(cfg, k) not in (None, False)]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise UsageError(f"{flags}: only --optimizer galore takes these (got {cfg.optimizer})")
    if cfg.optimizer == "optax-galore" and cfg.state_bits != 32:
        raise UsageError("--state-bits 8: use --optimizer galore or adamw (not optax-galore)")


def make_schedule(lr: float, warmup: int, steps: int, min_ratio: float = 0.1) -> optax.Schedule:
    """The paper's schedule: linear warmup from 0, cosine decay to ``min_ratio * lr``."""
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=warmup, decay_steps=max(steps, warmup + 1), end_value=lr * min_ratio
    )


def _is_matrix(path: tuple[Any, ...]) -> bool:
    names = [getattr(k, "key", None) for k in path]
    return len(names) == 2 and names[0] == "layers" and names[1] in model_lib.MATRIX_NAMES


def galore_dimension_numbers(params: Any, folded: bool = False) -> Any:
    """Which leaves GaLore projects: the stacked layer matrices, not embeddings/norms/head.

    Args:
        params: The (real or abstract) parameter tree of :mod:`galorax.app.model`.
        folded: Fold the layer axis into the input axis (one projector shared by all
            layers), the only way ``optax.contrib.galore`` can take stacked weights.

    Returns:
        A tree of dimension numbers (``None`` for unprojected leaves).
    """
    if folded:
        from optax.contrib import GaLoreDimensionNumbers as OptaxDN

        fold = OptaxDN(reduction_axis=(0, 1), output_axis=2)
        return jax.tree_util.tree_map_with_path(
            lambda p, _: fold if _is_matrix(p) else None, params
        )
    from galorax import GaLoreDimensionNumbers

    per_layer = GaLoreDimensionNumbers(reduction_axis=1, output_axis=2)  # axis 0: batch
    return jax.tree_util.tree_map_with_path(
        lambda p, _: per_layer if _is_matrix(p) else None, params
    )


def max_rank(params: Any) -> int:
    """The largest rank every projected matrix can take (its smaller side)."""
    sides = [
        min(x.shape[-2:])
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
        if _is_matrix(p)
    ]
    return min(sides)


def clip_rank(cfg: TrainConfig, params: Any) -> TrainConfig:
    """``cfg`` with ``rank`` clipped to the smallest projected matrix side (with a warning).

    Example:
        >>> from galorax.app import model
        >>> import warnings
        >>> params = model.abstract_params(model.get_preset("micro"))
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always")
        ...     clip_rank(TrainConfig(rank=1000), params).rank, str(w[0].message)[:24]
        (32, '--rank 1000 exceeds the ')
    """
    limit = max_rank(params)
    if cfg.optimizer == "adamw" or cfg.rank is None or cfg.rank <= limit:
        return cfg
    warnings.warn(
        f"--rank {cfg.rank} exceeds the smallest projected matrix side ({limit}); "
        f"clipped to {limit}",
        stacklevel=3,
    )
    return dataclasses.replace(cfg, rank=limit)


def make_optimizer(cfg: TrainConfig, params: Any) -> optax.GradientTransformation:
    """The optimizer of a resolved config (gradient clipping, then the optimizer)."""
    assert cfg.lr is not None and cfg.warmup is not None and cfg.steps is not None
    assert cfg.rank is not None
    sched = make_schedule(cfg.lr, cfg.warmup, cfg.steps)
    if cfg.optimizer == "adamw" and cfg.state_bits == 8:
        from galorax.adam8bit import adamw_8bit

        opt = adamw_8bit(sched, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        opt = optax.adamw(sched, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "optax-galore":
        from optax.contrib import galore as optax_galore

        opt = optax_galore(
            sched,
            rank=cfg.rank,
            update_proj_gap=cfg.update_proj_gap,
            scale=cfg.scale,
            weight_decay=cfg.weight_decay,
            weight_dimension_numbers=galore_dimension_numbers(params, folded=True),
        )
    else:
        import galorax
        from galorax.sharding import parse_mesh

        ext: dict[str, Any] = {
            k: getattr(cfg, k)
            for k in ("subspace", "moments", "stagger", "side")
            if getattr(cfg, k) is not None
        }
        if ext.get("subspace", "randomized") == "randomized":
            ext["subspace"] = galorax.Randomized(seed=cfg.seed)  # the range finder's sketches
        if cfg.residual is not None:
            ext["residual"] = galorax.Residual(granularity=cfg.residual)  # type: ignore[arg-type]
        if cfg.adaptive:
            ext["adaptive"] = galorax.AdaptiveRefresh()
        if cfg.projector_bits is not None:
            ext["projector_bits"] = cfg.projector_bits
        if cfg.state_bits == 8:
            ext["base_optimizer"] = galorax.scale_by_adam_8bit()
        if cfg.mesh is not None and "data" in parse_mesh(cfg.mesh):
            # Weights are replicated over `data`: its devices share each refresh's layers.
            ext["refresh_axes"] = "data"
        opt = galorax.galore(
            sched,
            rank=cfg.rank,
            update_proj_gap=cfg.update_proj_gap,
            scale=cfg.scale,
            weight_decay=cfg.weight_decay,
            weight_dimension_numbers=galore_dimension_numbers(params),
            **ext,
        )
    if cfg.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
    return opt


def make_train_step(
    mcfg: model_lib.ModelConfig,
    opt: optax.GradientTransformation,
    remat: bool = False,
    out_shardings: Any = None,
) -> Any:
    """A jitted ``(params, opt_state, batch) -> (params, opt_state, loss)``; donates the state.

    On a mesh, ``out_shardings`` (params', state's, loss's) pins the outputs to the inputs'
    shardings, so every step runs the same compiled program.
    """

    def step(params: Any, opt_state: Any, batch: jax.Array) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(model_lib.loss_fn)(params, batch, mcfg, remat)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    if out_shardings is not None:
        return jax.jit(step, donate_argnums=(0, 1), out_shardings=out_shardings)
    return jax.jit(step, donate_argnums=(0, 1))


def compiled_memory(compiled: Any) -> dict[str, int] | None:
    """XLA's memory analysis of a compiled program: argument/output/temp/peak bytes.

    ``peak`` is arguments + outputs + temporaries - aliased (donated) buffers, the bytes
    the step needs live at once. None if the backend does not report it.
    """
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    arg, out = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
    alias, temp = int(m.alias_size_in_bytes), int(m.temp_size_in_bytes)
    return {
        "argument": arg,
        "output": out,
        "alias": alias,
        "temp": temp,
        "peak": arg + out - alias + temp,
    }


def adamw_reference(
    cfg: TrainConfig, mcfg: model_lib.ModelConfig, abstract: Any, placement: Any = None
) -> dict[str, Any]:
    """AdamW's optimizer-state bytes and compiled step memory, computed without running it.

    With a ``placement`` (a :class:`galorax.app.distributed.TrainPlacement`), AdamW's step is
    compiled sharded the same way (its memory is then per device).
    """
    plain: dict[str, Any] = {k: None for k in _GALORE_ONLY}  # AdamW takes none of GaLore's settings
    ref = resolve_config(
        dataclasses.replace(cfg, optimizer="adamw", lr=cfg.lr, state_bits=32, **plain)
    )
    opt = make_optimizer(ref, abstract)
    state = jax.eval_shape(opt.init, abstract)
    assert cfg.batch_size is not None and cfg.seq_len is not None
    shape = (cfg.batch_size, cfg.seq_len + 1)
    batch = jax.ShapeDtypeStruct(shape, jnp.int32)
    shardings = None
    if placement is not None:
        from galorax.app.checkpoint import with_shardings

        state_sh = placement.state(opt, abstract)
        shardings = (placement.params, state_sh, placement.replicated)
        abstract, state = with_shardings((abstract, state), shardings[:2])
        batch = placement.abstract_batch(shape, jnp.int32)
    step = make_train_step(mcfg, opt, cfg.remat, shardings)
    compiled = step.lower(abstract, state, batch).compile()
    return {"opt_state_bytes": tree_bytes(state), "step_memory": compiled_memory(compiled)}


# ----------------------------------------------------------------------------- output dir

#: Settings a resumed run may change: they decide what is logged and saved, not the weights.
#: ``mesh`` decides where arrays live, not the maths (the sums' rounding may differ): a
#: resumed run may move to another mesh or number of processes.
RESUME_FREE = ("eval_every", "eval_batches", "checkpoint_every", "mesh")


def _resume_config(saved: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """The saved run's settings, checked against (and updated by) the user's flags."""
    if flags.get("optimizer") in EIGHT_BIT:
        flags = {**flags, "optimizer": EIGHT_BIT[flags["optimizer"]], "state_bits": 8}
    clash = {
        k: v for k, v in flags.items() if k not in RESUME_FREE and k in saved and saved[k] != v
    }
    if clash:
        said = ", ".join(
            f"--{k.replace('_', '-')} {v} (saved: {saved[k]})" for k, v in clash.items()
        )
        raise UsageError(
            f"--resume continues the saved run as it was configured, but {said} differ; drop "
            "those flags, or start a new run (--init-from to start from its weights)"
        )
    return {**saved, **{k: v for k, v in flags.items() if k in RESUME_FREE}}


def _holds_run(out: pathlib.Path) -> bool:
    return any((out / f).exists() for f in RUN_FILES)


def prepare_out_dir(out: pathlib.Path, resume: bool, overwrite: bool) -> None:
    """Checks ``--out`` against ``--resume``/``--overwrite``; clears old run files if told.

    Raises:
        UsageError: ``out`` holds another run and neither flag was given, or ``--resume``
            has nothing to resume, or both flags were given.
    """
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pass one of them")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory; choose another --out")
    if resume:
        if not (out / "checkpoints").is_dir() or not (out / "config.json").exists():
            raise UsageError(
                f"--resume: {out} holds no run to resume (no config.json/checkpoints); "
                "drop --resume to start a new run there"
            )
        return
    if _holds_run(out):
        if not overwrite:
            raise UsageError(
                f"--out {out} already holds a run; pass --resume to continue it, "
                "--overwrite to replace it, or choose another --out"
            )
        for name in RUN_FILES:  # only our own files: anything else the user put there stays
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_metrics(path: pathlib.Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: pathlib.Path, title: str = "") -> None:
    """Train loss (smoothed) and validation loss per step for each run, to one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (label, recs) in enumerate(runs.items()):
        color = f"C{i}"
        tr = [(r["step"], r["loss"]) for r in recs if "loss" in r and math.isfinite(r["loss"])]
        if tr:
            s, loss = np.array(tr).T
            ema, out = loss[0], []
            for v in loss:  # exponential smoothing: per-step losses are noisy
                ema = 0.9 * ema + 0.1 * v
                out.append(ema)
            ax.plot(s, out, color=color, alpha=0.6, lw=1, label=f"{label} train (EMA)")
        va = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
        if va:
            s, v = np.array(va).T
            ax.plot(s, v, "o-", color=color, lw=2, ms=4, label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- the run


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _ratio(a: float | None, b: float | None) -> str:
    return f" ({a / b:.0%} of AdamW)" if a is not None and b else ""


def format_summary(s: dict[str, Any]) -> str:
    """The end-of-run table: each figure next to AdamW's where one exists."""
    ref = s.get("adamw") or {}
    mem = (s.get("step_memory") or {}).get("peak")
    ref_mem = (ref.get("step_memory") or {}).get("peak")
    rows = [
        ("val loss (start -> end)", f"{s['val_loss_start']:.4f} -> {s['val_loss']:.4f}", ""),
        ("val perplexity (per byte)", f"{s['val_ppl']:.3f}", ""),
        ("tokens/s (refreshes incl.)", f"{s['tokens_per_s']:.0f}", ""),
        ("parameters", f"{s['n_params']:,} ({_fmt_bytes(s['param_bytes'])})", ""),
        (
            "optimizer state",
            _fmt_bytes(s["opt_state_bytes"])
            + _ratio(s["opt_state_bytes"], ref.get("opt_state_bytes")),
            _fmt_bytes(ref.get("opt_state_bytes")),
        ),
        ("train step memory (XLA)", _fmt_bytes(mem) + _ratio(mem, ref_mem), _fmt_bytes(ref_mem)),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows + [("", s["optimizer"], "")])
    lines = [f"{'':<{w0}}  {s['optimizer']:<{w1}}  adamw", f"{'-' * w0}  {'-' * w1}  {'-' * 10}"]
    lines += [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def _batches(corpus: data_lib.Corpus, cfg: TrainConfig, start: int) -> Iterator[np.ndarray]:
    assert cfg.steps is not None and cfg.batch_size is not None and cfg.seq_len is not None
    for step in range(start, cfg.steps):
        yield data_lib.sample_batch(corpus.train, cfg.batch_size, cfg.seq_len, cfg.seed, step)


def _placement(cfg: TrainConfig, abstract: Any, opt: optax.GradientTransformation):
    """``cfg.mesh``'s placement and restore targets ``(params, state, state shardings)``.

    ``(None, None)`` without a mesh.
    """
    if cfg.mesh is None:
        return None, None
    from galorax.app.checkpoint import with_shardings
    from galorax.app.distributed import TrainPlacement

    try:
        placement = TrainPlacement.create(cfg.mesh, abstract)
    except ValueError as e:
        raise UsageError(f"--mesh {cfg.mesh}: {e}") from None
    assert cfg.batch_size is not None
    ways = placement.batch_ways()
    if cfg.batch_size % ways:
        raise UsageError(
            f"--batch-size {cfg.batch_size} does not split over the {ways} data-parallel "
            f"devices of --mesh {cfg.mesh}; use a multiple of {ways}"
        )
    state_sh = placement.state(opt, abstract)
    state = with_shardings(jax.eval_shape(opt.init, abstract), state_sh)
    return placement, (with_shardings(abstract, placement.params), state, state_sh)


def train(
    cfg: TrainConfig,
    out: str | os.PathLike[str],
    *,
    resume: bool = False,
    overwrite: bool = False,
    init_from: str | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    adamw_ref: bool = True,
    log: Callable[[str], None] = print,
    flags: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) one training run into ``out`` and returns its summary.

    Args:
        cfg: The run's settings (``None`` fields take their defaults).
        out: Output directory.
        resume: Continue the run in ``out`` from its latest checkpoint (its saved config
            wins; bit-identical to an uninterrupted run).
        overwrite: Replace the run files in ``out``.
        init_from: A run (or checkpoints) directory whose latest weights initialize the
            model; the optimizer starts fresh (fine-tuning).
        stop_after: Stop (with a checkpoint) once this many steps are done, e.g. to split a
            run over job time limits; ``--resume`` continues it.
        progress: Show a tqdm progress bar.
        adamw_ref: Also compute AdamW's state bytes and step memory for the summary.
        log: Where messages go.
        flags: The config fields the user set explicitly. With ``resume`` they must agree
            with the saved run's (else :class:`UsageError`), except the ones that do not
            change the trajectory (:data:`RESUME_FREE`), which override the saved values.

    Raises:
        UsageError: bad flags or output directory (nothing is modified then).
        data_lib.DataError: missing or empty data.
        FloatingPointError: the loss became NaN/inf (lower ``--lr``).
    """
    from galorax.app import checkpoint as ckpt_lib
    from galorax.app import distributed as sharding_lib

    out = pathlib.Path(out)
    if init_from is not None and resume:
        raise UsageError("--init-from starts a new run; it cannot be combined with --resume")
    # Under jax.distributed every process trains, process 0 alone writes the run's files
    # (checkpoints: every process its own shards).
    primary = sharding_lib.is_primary()
    if primary:
        prepare_out_dir(out, resume, overwrite)
    else:
        log, progress = (lambda msg: None), False
    sharding_lib.sync_processes("galorax train: out dir ready")
    if resume:
        saved = json.loads((out / "config.json").read_text())["train"]
        cfg = TrainConfig(**_resume_config(saved, flags or {}))
    cfg = resolve_config(cfg)
    assert cfg.steps is not None and cfg.batch_size is not None and cfg.seq_len is not None
    assert cfg.rank is not None and cfg.eval_every is not None

    corpus = data_lib.load_corpus(cfg.data)
    data_lib.check_fits(corpus, cfg.seq_len)
    dtype = DTYPES[cfg.dtype]

    init_meta: dict[str, Any] = {}
    if init_from is not None:
        mcfg = ckpt_lib.model_config_of(init_from)
        if mcfg.vocab_size != corpus.vocab_size:
            raise UsageError(f"--init-from {init_from}: vocabulary {mcfg.vocab_size} != data's")
        if cfg.preset != "tiny" and mcfg != model_lib.get_preset(cfg.preset, mcfg.vocab_size):
            log(f"note: --init-from {init_from} fixes the architecture; --preset is ignored")
    else:
        mcfg = model_lib.get_preset(cfg.preset, corpus.vocab_size)
    abstract = model_lib.abstract_params(mcfg, dtype)
    cfg = clip_rank(cfg, abstract)
    assert cfg.steps is not None and cfg.batch_size is not None and cfg.seq_len is not None
    assert cfg.eval_every is not None

    opt = make_optimizer(cfg, abstract)
    placement, targets = _placement(cfg, abstract, opt)
    ckpt = ckpt_lib.Checkpointer(out / "checkpoints")
    start = 0
    if resume:
        latest = ckpt.latest_step()
        if latest is None:
            raise UsageError(f"--resume: {out}/checkpoints holds no finished checkpoint")
        if targets is None:
            targets = (abstract, jax.eval_shape(opt.init, abstract))
        params, opt_state = ckpt.restore(latest, *targets[:2])  # onto the mesh, if any
        start = latest
        # Metrics past the checkpoint are re-run: drop them so the log has no duplicates.
        recs = [r for r in _read_metrics(out / "metrics.jsonl") if r.get("step", 0) <= start]
        if primary:
            text = "".join(json.dumps(r) + "\n" for r in recs)
            _atomic_write_text(out / "metrics.jsonl", text)
        log(f"resumed {out} at step {start}/{cfg.steps}")
    else:
        if init_from is not None:
            params = ckpt_lib.load_params(init_from, abstract if targets is None else targets[0])
            init_meta = {"init_from": str(init_from)}
        elif placement is not None:  # born sharded: no process holds the whole model
            init = functools.partial(model_lib.init_params, mcfg, dtype=dtype)
            params = jax.jit(init, out_shardings=placement.params)(jax.random.key(cfg.seed))
        else:
            params = model_lib.init_params(mcfg, jax.random.key(cfg.seed), dtype)
        if targets is not None:
            opt_state = jax.jit(opt.init, out_shardings=targets[2])(params)
        else:
            opt_state = opt.init(params)
        config_json = {
            "train": dataclasses.asdict(cfg),
            "model": dataclasses.asdict(mcfg),
            "data_source": corpus.source,
            "jax": jax.__version__,
            "optax": optax.__version__,
            **init_meta,
        }
        if primary:
            _atomic_write_text(out / "config.json", json.dumps(config_json, indent=2) + "\n")
            (out / "metrics.jsonl").touch()
    sharding_lib.sync_processes("galorax train: metrics ready")  # all read the same log

    # One compile serves both the memory analysis and the loop.
    batch_shape = (cfg.batch_size, cfg.seq_len + 1)
    batch0: Any = np.zeros(batch_shape, np.int32)
    out_shardings = None
    if placement is not None:
        assert targets is not None
        batch0 = placement.abstract_batch(batch_shape, jnp.int32)
        out_shardings = (placement.params, targets[2], placement.replicated)
    t0 = time.perf_counter()
    step_fn = make_train_step(mcfg, opt, cfg.remat, out_shardings)
    step_fn = step_fn.lower(params, opt_state, batch0).compile()
    compile_s = time.perf_counter() - t0
    step_memory = compiled_memory(step_fn)
    opt_state_bytes = tree_bytes(opt_state)
    ref = (
        adamw_reference(cfg, mcfg, abstract, placement)
        if adamw_ref and (cfg.optimizer != "adamw" or cfg.state_bits != 32)
        else None
    )

    val: list[Any] = data_lib.eval_batches(
        corpus.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches
    )
    if placement is not None:
        val = [placement.put_batch(b) for b in val]
    eval_fn = jax.jit(lambda p, b: model_lib.loss_fn(p, b, mcfg))

    def evaluate(p: Any) -> float:
        return float(np.mean([float(eval_fn(p, b)) for b in val]))

    metrics_f = open(out / "metrics.jsonl" if primary else os.devnull, "a")  # noqa: SIM115

    def record(rec: dict[str, Any]) -> None:
        metrics_f.write(json.dumps(rec) + "\n")
        metrics_f.flush()

    prior = _read_metrics(out / "metrics.jsonl")
    val_start = next((r["val_loss"] for r in prior if r.get("step") == 0 and "val_loss" in r), None)
    if val_start is None:
        val_start = evaluate(params)
        record({"step": 0, "val_loss": val_start})
    stop = min(cfg.steps, stop_after) if stop_after is not None else cfg.steps
    tokens_per_step = cfg.batch_size * cfg.seq_len
    sched = make_schedule(cfg.lr or 0.0, cfg.warmup or 0, cfg.steps)
    timed_s, timed_cpu_s, timed_tokens = 0.0, 0.0, 0
    val_loss = val_start
    pbar = None
    if progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=stop, initial=start, desc=f"{cfg.optimizer} {cfg.preset}", unit="step")
    step = start
    try:
        batches = _batches(corpus, cfg, start)
        while step < stop:
            t, c = time.perf_counter(), time.process_time()
            batch = next(batches)
            if placement is not None:  # every process keeps the rows of its devices
                batch = placement.put_batch(batch)
            params, opt_state, loss_arr = step_fn(params, opt_state, batch)
            loss = float(loss_arr)  # syncs: the time below is the real step time
            dt, dc = time.perf_counter() - t, time.process_time() - c
            step += 1
            if step > start + 1:  # the first call warms caches; refresh steps all count
                timed_s += dt
                timed_cpu_s += dc
                timed_tokens += tokens_per_step
            tps = timed_tokens / timed_s if timed_s else tokens_per_step / dt
            rec: dict[str, Any] = {
                "step": step,
                "loss": loss,
                "lr": float(sched(step - 1)),
                "step_s": round(dt, 5),
                "cpu_s": round(dc, 5),
                "tokens_per_s": round(tps, 1),
            }
            if not math.isfinite(loss):
                record(rec)
                raise FloatingPointError(
                    f"the loss became {loss} at step {step}; lower --lr (now {cfg.lr})"
                )
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val_loss = evaluate(params)
                rec["val_loss"] = val_loss
            record(rec)
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:.0f}")
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == stop:
                ckpt.save(
                    step, params, opt_state, {"step": step, "model": dataclasses.asdict(mcfg)}
                )
    except KeyboardInterrupt:
        if step > start:  # keep the work done so far: --resume continues from here
            ckpt.save(step, params, opt_state, {"step": step, "model": dataclasses.asdict(mcfg)})
            log(f"\ninterrupted: checkpoint saved at step {step}; continue with --resume")
        raise
    finally:
        if pbar is not None:
            pbar.close()
        metrics_f.close()
        ckpt.close()
        recs = _read_metrics(out / "metrics.jsonl")
        try:
            if primary:
                plot_curves(
                    {cfg.optimizer: recs},
                    out / "loss_curve.png",
                    f"{cfg.preset} ({corpus.source})",
                )
        except Exception as e:  # a plotting failure must not lose the run
            log(f"warning: could not plot the loss curve: {e}")

    all_recs = _read_metrics(out / "metrics.jsonl")
    step_times = [r["step_s"] for r in all_recs if "step_s" in r]
    # Over a resumed run, rate over all logged steps but the first of each process.
    if timed_s == 0.0 and step_times:
        timed_s, timed_tokens = sum(step_times), tokens_per_step * len(step_times)
    summary: dict[str, Any] = {
        "optimizer": cfg.optimizer + ("8bit" if cfg.state_bits == 8 else ""),
        "preset": cfg.preset,
        "lr": cfg.lr,
        "rank": cfg.rank if cfg.optimizer != "adamw" else None,
        "steps_done": step,
        "steps": cfg.steps,
        "val_loss_start": val_start,
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        "tokens_per_s": timed_tokens / timed_s if timed_s else float("nan"),
        # CPU time of all this process's threads: the work itself, robust to other jobs
        # sharing the machine (wall-clock tokens/s is not).
        "tokens_per_cpu_s": timed_tokens / timed_cpu_s if timed_cpu_s else float("nan"),
        "n_params": model_lib.count_params(abstract),
        "param_bytes": tree_bytes(abstract),
        "opt_state_bytes": opt_state_bytes,
        "refreshes": _refreshes(cfg, opt_state, abstract, step),
        "step_memory": step_memory,
        "compile_s": compile_s,
        "adamw": ref
        or (
            {"opt_state_bytes": opt_state_bytes, "step_memory": step_memory}
            if cfg.optimizer == "adamw" and cfg.state_bits == 32
            else None
        ),
        "data_source": corpus.source,
        **init_meta,
    }
    if primary:
        _atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    if step < cfg.steps:
        log(f"stopped after step {step}/{cfg.steps}; continue with --resume --out {out}")
    return summary


def _refreshes(cfg: TrainConfig, opt_state: Any, params: Any, steps: int) -> int | None:
    """Projectors computed over the run (per layer slice for galore, per leaf for optax)."""
    if cfg.optimizer == "galore":
        from galorax.schedule import count_refreshes

        return count_refreshes(opt_state)
    if cfg.optimizer == "optax-galore":  # every projected leaf at each multiple of the gap
        leaves = jax.tree.leaves(galore_dimension_numbers(params, folded=True))
        return len(leaves) * -(-steps // cfg.update_proj_gap)
    return None


def main_error(msg: str) -> None:
    """Prints ``msg`` as a CLI error to stderr."""
    print(f"galorax: error: {msg}", file=sys.stderr)
