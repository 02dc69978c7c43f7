"""A run's settings: :class:`TrainConfig` (what the command line fills, ``None`` = default)
resolved into a frozen :class:`RunConfig` whose fields are all concrete; the vocabularies
(:data:`OPTIMIZERS`, :data:`DTYPES`) and defaults every command shares; :class:`UsageError`.

Example:
    >>> run = resolve_config(TrainConfig(optimizer="adamw", steps=10))
    >>> run.warmup, run.lr, run.name  # 10% of the steps by default, as in the paper
    (1, 0.001, 'adamw')
    >>> resolve_config(TrainConfig(optimizer="galore8bit")).name  # = galore --state-bits 8
    'galore8bit'
    >>> run = resolve_config(TrainConfig(optimizer="apollo-mini", preset="60m"))
    >>> run.rank, run.scale  # APOLLO-Mini: rank 1, the paper's scale
    (1, 128.0)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from galorax.app import model as model_lib
from galorax.options import OPTION


class UsageError(ValueError):
    """A bad flag or output directory; the message names the flag and the fix."""


#: Every optimizer the application builds (``galorax train --optimizer``): GaLore
#: (:func:`galorax.galore`), AdamW, optax's GaLore, APOLLO and APOLLO-Mini
#: (:func:`galorax.apollo`, :func:`galorax.apollo_mini`) and their 8-bit names.
OPTIMIZERS = (
    "galore",
    "adamw",
    "optax-galore",
    "apollo",
    "apollo-mini",
    "galore8bit",
    "adamw8bit",
    "apollo8bit",
    "apollo-mini8bit",
)
#: Names for an optimizer with 8-bit Adam moments: the optimizer with ``--state-bits 8``.
EIGHT_BIT = {
    "galore8bit": "galore",
    "adamw8bit": "adamw",
    "apollo8bit": "apollo",
    "apollo-mini8bit": "apollo-mini",
}
#: The optimizers ``galorax memory`` sizes by default (it sizes every one of
#: :data:`OPTIMIZERS`; ``optax-galore``, which shares one projector across the layers, on
#: request). ``galore8bit``: GaLore with 8-bit Adam as base optimizer (the embeddings,
#: norms and head, which GaLore leaves full-rank, get 8-bit moments too, as in the paper's
#: ``GaLoreAdamW8bit``); ``apollo8bit``, ``apollo-mini8bit``: APOLLO's moments in 8 bits
#: (``moment_bits=8``), the full-rank leaves' too.
PLANNED_OPTIMIZERS = (
    "adamw",
    "adamw8bit",
    "galore",
    "galore8bit",
    "apollo",
    "apollo8bit",
    "apollo-mini",
    "apollo-mini8bit",
)
#: Which of the run settings ``rank``, ``update_proj_gap`` and ``scale`` each optimizer
#: takes (flags ``--rank``, ``--update-proj-gap``, ``--scale``; the others are refused):
#: APOLLO-Mini's rank is fixed (:data:`FIXED_RANK`), AdamW has none of them.
LOW_RANK_SETTINGS: dict[str, tuple[str, ...]] = {
    "galore": ("rank", "update_proj_gap", "scale"),
    "optax-galore": ("rank", "update_proj_gap", "scale"),
    "apollo": ("rank", "update_proj_gap", "scale"),
    "apollo-mini": ("update_proj_gap", "scale"),
    "adamw": (),
}
#: Optimizers whose rank is not a setting: APOLLO-Mini projects to rank 1.
FIXED_RANK = {"apollo-mini": 1}
#: Dtypes by name (the flags' values; the short names are :data:`DTYPE_ALIASES`').
DTYPES: dict[str, Any] = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "f32": jnp.float32,
    "bf16": jnp.bfloat16,
    "float16": jnp.float16,
}
#: Short spellings of dtype names that the flags accept.
DTYPE_ALIASES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}
#: Parameter dtypes (``--dtype`` of ``galorax train``, ``compare`` and ``memory``).
TRAIN_DTYPES = ("float32", "bfloat16")
#: GaLore projector storage dtypes (``galorax memory --projector-dtype``).
PROJECTOR_DTYPES = ("float32", "bfloat16", "float16")
#: Per-optimizer default peak learning rates (the paper tuned GaLore higher, scale 0.25;
#: APOLLO's paper trains APOLLO and APOLLO-Mini at GaLore's 1e-2).
DEFAULT_LR = {
    "adamw": 1e-3,
    "galore": 1e-2,
    "optax-galore": 1e-2,
    "apollo": 1e-2,
    "apollo-mini": 1e-2,
}
#: Per-optimizer default ``--scale``: GaLore's paper 0.25; APOLLO 1 and APOLLO-Mini 128,
#: the APOLLO paper's (:func:`galorax.apollo`, :func:`galorax.apollo_mini`). AdamW takes none.
DEFAULT_SCALE = {
    "galore": 0.25,
    "optax-galore": 0.25,
    "apollo": 1.0,
    "apollo-mini": 128.0,
    "adamw": 0.25,
}
#: The options of :func:`galorax.galore` that ``--optimizer galore`` takes as flags of their
#: own name (``--subspace`` ...), in the order of the help. Their meaning, choices and defaults
#: are the library's declarations (:data:`galorax.options.OPTIONS`); ``rank``,
#: ``update_proj_gap`` and ``scale`` are run settings with the application's own defaults.
GALORE_FLAGS = ("subspace", "moments", "stagger", "side", "residual", "adaptive", "projector_bits")
#: How a run says "off" for the flags whose library default is None (a :class:`RunConfig`
#: field is never None); the library is given None for these (:func:`galorax.galore`'s
#: default).
GALORE_OFF: dict[str, Any] = {"residual": "off", "adaptive": False, "projector_bits": 32}
#: GaLore-only settings (flags only ``--optimizer galore`` takes) and their resolved defaults:
#: the library's, "off" spelled as :data:`GALORE_OFF` says.
GALORE_DEFAULTS: dict[str, Any] = {k: GALORE_OFF.get(k, OPTION[k].default) for k in GALORE_FLAGS}
#: The values of GaLore's string settings (``galorax train --subspace`` etc.): the names the
#: library declares, and ``--residual``'s :class:`galorax.Residual` granularities.
GALORE_CHOICES: dict[str, tuple[str, ...]] = {
    **{k: OPTION[k].choices for k in GALORE_FLAGS if isinstance(GALORE_DEFAULTS[k], str)},
    "residual": ("channel", "matrix"),
}
#: The largest ``--steps`` and ``--seed`` (int32 step counters; uint32 seeds).
MAX_STEPS = 2**31 - 1
MAX_SEED = 2**32 - 1
#: Settings a resumed run may change: they decide what is logged and saved, not the weights.
#: ``mesh`` decides where arrays live, not the maths (the sums' rounding may differ): a
#: resumed run may move to another mesh or number of processes.
RESUME_FREE = ("eval_every", "eval_batches", "checkpoint_every", "mesh")


@dataclasses.dataclass
class TrainConfig:
    """Settings of one training run as given (``None`` means: pick the documented default).

    Attributes:
        preset: Model size, a key of :data:`galorax.app.model.PRESETS`.
        optimizer: One of :data:`OPTIMIZERS`.
        rank: GaLore or APOLLO rank (default: GaLore's paper's rank for the preset; d_model
            / 4 for tiny); APOLLO-Mini's is 1 (:data:`FIXED_RANK`: not a setting).
        update_proj_gap: Steps between projector refreshes (APOLLO: between draws of its
            random projection).
        scale: Update scale (default per optimizer: :data:`DEFAULT_SCALE`, GaLore's paper's
            0.25, APOLLO 1, APOLLO-Mini 128).
        lr: Peak learning rate (default per optimizer: :data:`DEFAULT_LR`).
        warmup: Linear warmup steps (default 10% of ``steps``), then cosine decay to 10%.
        steps: Total optimizer steps.
        batch_size: Sequences per step.
        seq_len: Tokens per sequence.
        dtype: Parameter dtype, ``float32`` or ``bfloat16``.
        seed: Seed of the initialization and the data order (and of GaLore's randomized
            refreshes' sketches, APOLLO's random projections).
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
            galore: :func:`galorax.scale_by_adam_8bit` as the base optimizer; apollo and
            apollo-mini: ``moment_bits=8``).
        projector_bits: galore only: store projectors in 8 or 4 bits (None: f32).
        remat: Recompute activations in the backward pass (less memory, more compute).
        per_layer_updates: Update each layer as its gradient is ready, one layer's gradient
            alive at a time (:func:`galorax.per_layer_step`; implies remat of the layers;
            ``grad_clip`` then clips by the previous step's global norm).
        mesh: Shard the run over a device mesh, e.g. ``data=2,fsdp=4`` (all processes'
            devices): params and optimizer state FSDP over ``fsdp``, the batch's rows over
            ``data`` and ``fsdp`` (:class:`galorax.app.distributed.TrainPlacement`); GaLore's
            refreshes split the layers over ``data`` (``refresh_axes``). None: one device.
    """

    preset: str = "tiny"
    optimizer: str = "galore"
    rank: int | None = None
    update_proj_gap: int = 200
    scale: float | None = None
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
    per_layer_updates: bool = False
    mesh: str | None = None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A resolved, validated :class:`TrainConfig`: every field concrete.

    ``optimizer`` is ``galore``, ``adamw``, ``optax-galore``, ``apollo`` or ``apollo-mini``
    (8-bit names become ``state_bits=8``); the GaLore-only fields hold
    :data:`GALORE_DEFAULTS` unless given (and are unused by the other optimizers); ``rank``
    is APOLLO-Mini's fixed 1 for it; ``data`` ``""`` is the embedded stdlib corpus, ``mesh``
    ``""`` one device.
    """

    preset: str
    optimizer: str
    rank: int
    update_proj_gap: int
    scale: float
    lr: float
    warmup: int
    steps: int
    batch_size: int
    seq_len: int
    dtype: str
    seed: int
    weight_decay: float
    grad_clip: float
    data: str
    checkpoint_every: int
    eval_every: int
    eval_batches: int
    subspace: str
    moments: str
    stagger: bool
    side: str
    residual: str
    adaptive: bool
    state_bits: int
    projector_bits: int
    remat: bool
    per_layer_updates: bool
    mesh: str

    @property
    def name(self) -> str:
        """The optimizer's name in :data:`OPTIMIZERS` (``galore8bit`` for 8-bit GaLore)."""
        return self.optimizer + ("8bit" if self.state_bits == 8 else "")

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step trains on."""
        return self.batch_size * self.seq_len

    def as_train_config(self) -> TrainConfig:
        """The explicit :class:`TrainConfig` of this run (saved in ``config.json``): GaLore
        options at their defaults, and unused ones, are ``None`` again (so is a fixed rank,
        which is not a setting)."""
        fields = dataclasses.asdict(self)
        for k, default in GALORE_DEFAULTS.items():
            if self.optimizer != "galore" or fields[k] == default:
                fields[k] = None
        if self.optimizer in FIXED_RANK:
            fields["rank"] = None
        fields["data"] = self.data or None
        fields["mesh"] = self.mesh or None
        return TrainConfig(**fields)


def _check_choices(cfg: TrainConfig) -> None:
    if cfg.preset not in model_lib.PRESETS:
        raise UsageError(
            f"--preset {cfg.preset!r} is unknown; choose one of: {', '.join(model_lib.PRESETS)}"
        )
    if cfg.optimizer not in OPTIMIZERS:
        raise UsageError(f"--optimizer {cfg.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    if cfg.dtype not in TRAIN_DTYPES:
        raise UsageError(f"--dtype {cfg.dtype!r}: choose one of {', '.join(TRAIN_DTYPES)}")
    for name, choices in GALORE_CHOICES.items():
        value = getattr(cfg, name)
        if value not in (None, *choices):
            listed = f"{', '.join(choices[:-1])} or {choices[-1]}"
            raise UsageError(f"--{name.replace('_', '-')} {value!r}: choose {listed}")
    if cfg.state_bits not in (32, 8):
        raise UsageError(f"--state-bits {cfg.state_bits}: choose 32 or 8")
    if cfg.projector_bits not in (None, 8, 4):
        raise UsageError(f"--projector-bits {cfg.projector_bits}: choose 8 or 4 (or leave out)")
    if cfg.per_layer_updates and cfg.optimizer == "optax-galore":
        raise UsageError(
            "--per-layer-updates: optax-galore shares one projector across the layers; "
            "use --optimizer galore"
        )
    if cfg.optimizer == "galore":
        return
    given = [k for k in GALORE_DEFAULTS if getattr(cfg, k) not in (None, False)]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise UsageError(f"{flags}: only --optimizer galore takes these (got {cfg.optimizer})")
    if cfg.optimizer in FIXED_RANK and cfg.rank is not None:
        fixed = FIXED_RANK[cfg.optimizer]
        raise UsageError(
            f"--rank: {cfg.optimizer} has rank {fixed}; drop it or use --optimizer apollo"
        )
    if cfg.optimizer == "optax-galore" and cfg.state_bits != 32:
        raise UsageError(
            "--state-bits 8: use --optimizer galore, adamw or apollo (not optax-galore)"
        )


def _check_sizes(run: RunConfig) -> None:
    for name in (
        "steps",
        "batch_size",
        "seq_len",
        "rank",
        "update_proj_gap",
        "eval_batches",
        "eval_every",
    ):
        if getattr(run, name) <= 0:
            raise UsageError(
                f"--{name.replace('_', '-')} must be positive, got {getattr(run, name)}"
            )
    if run.steps > MAX_STEPS:
        raise UsageError(f"--steps {run.steps} is too many; use at most {MAX_STEPS}")
    if not 0 <= run.seed <= MAX_SEED:
        raise UsageError(f"--seed must be between 0 and {MAX_SEED}, got {run.seed}")
    if run.warmup < 0 or run.warmup > run.steps:
        raise UsageError(f"--warmup {run.warmup} must be between 0 and --steps {run.steps}")
    if run.checkpoint_every < 0:
        raise UsageError(
            f"--checkpoint-every must be >= 0 (0: at the end), got {run.checkpoint_every}"
        )
    _check_numbers(run)


#: The range the step computes these numbers in (float32): 1e308 is finite in Python, inf
#: there, and 1e-50 is 0.
_F32 = jnp.finfo(jnp.float32)


def _fits_f32(value: float, positive: bool) -> bool:
    """Finite and in float32's range; positive ones at least float32's smallest normal."""
    if not math.isfinite(value) or abs(value) > float(_F32.max):
        return False
    return value >= float(_F32.tiny) if positive else value >= 0


def _check_numbers(run: RunConfig) -> None:
    if not _fits_f32(run.lr, positive=True):
        raise UsageError(f"--lr must be a positive number float32 holds, got {run.lr}")
    if not _fits_f32(run.scale, positive=True):
        raise UsageError(f"--scale must be a positive number float32 holds, got {run.scale}")
    if not _fits_f32(run.weight_decay, positive=False):
        raise UsageError(
            f"--weight-decay must be a number >= 0 float32 holds, got {run.weight_decay}"
        )
    if not _fits_f32(run.grad_clip, positive=False):
        raise UsageError(
            f"--grad-clip must be a number >= 0 float32 holds (0: no clipping), got {run.grad_clip}"
        )


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value


def resolve_config(cfg: TrainConfig) -> RunConfig:
    """Fills the ``None`` defaults that depend on the preset and optimizer; validates.

    Raises:
        UsageError: an unknown preset, optimizer, dtype or GaLore choice, a flag the
            optimizer does not take, a non-positive size, a non-finite or out-of-range number.
    """
    if cfg.optimizer in EIGHT_BIT:  # galore8bit = galore with --state-bits 8
        cfg = dataclasses.replace(cfg, optimizer=EIGHT_BIT[cfg.optimizer], state_bits=8)
    _check_choices(cfg)
    tiny = cfg.preset == "tiny"
    steps = _given(cfg.steps, 300 if tiny else 1000)
    fields = dataclasses.asdict(cfg) | {
        k: _given(getattr(cfg, k), v) for k, v in GALORE_DEFAULTS.items()
    }
    rank = FIXED_RANK.get(cfg.optimizer) or _given(cfg.rank, model_lib.PAPER_RANKS[cfg.preset])
    fields |= {
        "steps": steps,
        "batch_size": _given(cfg.batch_size, 16),
        "seq_len": _given(cfg.seq_len, 128 if tiny else 256),
        "lr": _given(cfg.lr, DEFAULT_LR[cfg.optimizer]),
        "scale": _given(cfg.scale, DEFAULT_SCALE[cfg.optimizer]),
        "rank": rank,
        "warmup": _given(cfg.warmup, max(1, steps // 10)),
        "eval_every": _given(cfg.eval_every, max(1, steps // 10)),
        "checkpoint_every": _given(cfg.checkpoint_every, 100),
        "data": cfg.data or "",
        "mesh": cfg.mesh or "",
    }
    run = RunConfig(**fields)
    _check_sizes(run)
    return run


def resume_config(saved: dict[str, Any], flags: dict[str, Any]) -> TrainConfig:
    """The saved run's settings, checked against (and updated by) the user's flags.

    Raises:
        UsageError: a flag that would change the trajectory differs from the saved value.
    """
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
    return TrainConfig(**{**saved, **{k: v for k, v in flags.items() if k in RESUME_FREE}})
