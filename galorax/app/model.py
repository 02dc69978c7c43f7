"""A LLaMA-style decoder in plain JAX: RMSNorm, rotary embeddings, SwiGLU, no biases.

The per-layer weights are *stacked* along a leading layer axis and applied with
``jax.lax.scan``, so one compiled layer body serves every depth and optimizers see
``(n_layers, d_in, d_out)`` matrices: GaLore must give each layer its own projector
(the layer axis is a batch axis). Parameters are a plain dict pytree::

    {"embed": (V, d), "layers": {"attn_norm": (L, d), "wq"/"wk"/"wv"/"wo": (L, d, d),
     "mlp_norm": (L, d), "w_gate"/"w_up": (L, d, f), "w_down": (L, f, d)},
     "final_norm": (d,), "head": (d, V)}

Example:
    >>> import jax, jax.numpy as jnp
    >>> cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, d_ff=64)
    >>> params = init_params(cfg, jax.random.key(0))
    >>> params["layers"]["wq"].shape
    (2, 32, 32)
    >>> tokens = jnp.zeros((2, 9), jnp.int32)
    >>> abs(float(loss_fn(params, tokens, cfg)) - 5.545) < 0.1  # ~log(256) at init
    True
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

import galorax
from galorax import chunking

Params = dict[str, Any]

#: Names of the stacked per-layer matrices (the leaves GaLore projects).
MATRIX_NAMES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of the decoder.

    Attributes:
        vocab_size: Number of token ids (256 for the byte-level tokenizer).
        d_model: Residual stream width.
        n_layers: Number of decoder blocks (the stacked axis).
        n_heads: Attention heads; ``d_model`` must be divisible by it.
        d_ff: Hidden width of the SwiGLU MLP.
        rope_theta: Base of the rotary frequencies.
        norm_eps: RMSNorm epsilon.
    """

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 688
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} not divisible by n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("head dimension must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


#: The paper's LLaMA configs (Zhao et al. 2024, table of model sizes) plus ``tiny``, sized so
#: that a run takes minutes on 2 CPU cores while the projected matrices still dominate the
#: parameter count (byte vocabulary: embeddings and head are only 2 x 256 x d).
PRESETS: dict[str, ModelConfig] = {
    "micro": ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=96),  # tests, smoke runs
    "tiny": ModelConfig(d_model=256, n_layers=4, n_heads=4, d_ff=688),
    "60m": ModelConfig(d_model=512, n_layers=8, n_heads=8, d_ff=1376),
    "130m": ModelConfig(d_model=768, n_layers=12, n_heads=12, d_ff=2048),
    "350m": ModelConfig(d_model=1024, n_layers=24, n_heads=16, d_ff=2736),
    "1b": ModelConfig(d_model=2048, n_layers=24, n_heads=32, d_ff=5461),
    "7b": ModelConfig(d_model=4096, n_layers=32, n_heads=32, d_ff=11008),
}

#: The paper's GaLore rank per preset (``micro``, ``tiny``: d_model / 4).
PAPER_RANKS = {"micro": 8, "tiny": 64, "60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}


def get_preset(name: str, vocab_size: int = 256) -> ModelConfig:
    """Returns the preset ``name`` with the given vocabulary size.

    Raises:
        KeyError: ``name`` is not a preset; the message lists the valid ones.
    """
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], vocab_size=vocab_size)


def _number(key: str, value: str) -> int | float:
    try:
        return float(value) if "." in value or "e" in value.lower() else int(value)
    except ValueError:
        raise ValueError(f"{key}={value!r} is not a number") from None


def _config_fields(text: str) -> dict[str, Any]:
    if text.startswith("{"):
        fields = json.loads(text)  # a JSONDecodeError is a ValueError
        if not isinstance(fields, dict):
            raise ValueError("expected a JSON object")
        return fields
    fields = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r}: expected key=value")
        fields[key.strip()] = _number(key.strip(), value.strip())
    return fields


def parse_model_config(text: str, vocab_size: int = 256) -> ModelConfig:
    """A :class:`ModelConfig` from a JSON object or a ``key=value,...`` list of its fields
    (``vocab_size`` defaults to ``vocab_size``).

    Raises:
        ValueError: bad JSON, an unknown field, a value that is not a number, or a config
            :class:`ModelConfig` refuses.

    Example:
        >>> parse_model_config("d_model=64,n_layers=2,n_heads=2,d_ff=128").d_model
        64
    """
    known = [f.name for f in dataclasses.fields(ModelConfig)]
    fields = _config_fields(text.strip())
    unknown = [k for k in fields if k not in known]
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}; fields: {', '.join(known)}")
    fields.setdefault("vocab_size", vocab_size)
    return ModelConfig(**fields)


def init_params(cfg: ModelConfig, key: jax.Array, dtype: Any = jnp.float32) -> Params:
    """Initializes parameters (normal std 0.02; residual outputs scaled by 1/sqrt(2L))."""
    d, f, n, v = cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.vocab_size
    keys = iter(jax.random.split(key, 9))
    std, out_std = 0.02, 0.02 / math.sqrt(2 * n)

    def normal(shape: tuple[int, ...], s: float) -> jax.Array:
        return (s * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    return {
        "embed": normal((v, d), std),
        "layers": {
            "attn_norm": jnp.ones((n, d), dtype),
            "wq": normal((n, d, d), std),
            "wk": normal((n, d, d), std),
            "wv": normal((n, d, d), std),
            "wo": normal((n, d, d), out_std),
            "mlp_norm": jnp.ones((n, d), dtype),
            "w_gate": normal((n, d, f), std),
            "w_up": normal((n, d, f), std),
            "w_down": normal((n, f, d), out_std),
        },
        "final_norm": jnp.ones((d,), dtype),
        "head": normal((d, v), std),
    }


def abstract_params(cfg: ModelConfig, dtype: Any = jnp.float32) -> Params:
    """Shapes and dtypes of the parameters without allocating them (works for ``7b``)."""
    return jax.eval_shape(lambda k: init_params(cfg, k, dtype), jax.random.key(0))


def count_params(params: Params) -> int:
    """Number of scalar parameters in a (real or abstract) parameter tree."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def _rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    # Normalize in f32: bf16 mean-of-squares loses too much precision.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def _rope(x: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding on ``x`` of shape (batch, time, heads, head_dim), half-split layout."""
    t, hd = x.shape[1], x.shape[-1]
    freqs = theta ** (-jnp.arange(0, hd // 2, dtype=jnp.float32) / (hd // 2))
    angles = jnp.arange(t, dtype=jnp.float32)[:, None] * freqs[None, :]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.astype(x.dtype)


def _block(cfg: ModelConfig, x: jax.Array, lp: Params) -> jax.Array:
    b, t, d = x.shape
    h = _rms_norm(x, lp["attn_norm"], cfg.norm_eps)
    q = (h @ lp["wq"]).reshape(b, t, cfg.n_heads, cfg.head_dim)
    k = (h @ lp["wk"]).reshape(b, t, cfg.n_heads, cfg.head_dim)
    v = (h @ lp["wv"]).reshape(b, t, cfg.n_heads, cfg.head_dim)
    q, k = _rope(q, cfg.rope_theta), _rope(k, cfg.rope_theta)
    att = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, d)
    x = x + att @ lp["wo"]
    h = _rms_norm(x, lp["mlp_norm"], cfg.norm_eps)
    return x + (jax.nn.silu(h @ lp["w_gate"]) * (h @ lp["w_up"])) @ lp["w_down"]


@jax.custom_vjp
def _lookup(table: jax.Array, tokens: jax.Array) -> jax.Array:
    # ``table[tokens]`` with the gather's own gradient, but its zero table is born after
    # the cotangent: CPU XLA scheduled the transpose's f32 [vocab, d] zeros at the start
    # of the step, alive through the whole forward pass.
    return table[tokens]


def _lookup_fwd(table: jax.Array, tokens: jax.Array) -> tuple[jax.Array, Any]:
    return table[tokens], (jax.ShapeDtypeStruct(table.shape, table.dtype), tokens)


def _lookup_bwd(res: Any, dx: jax.Array) -> tuple[jax.Array, None]:
    spec, tokens = res
    zeros = chunking.buffer_after(spec.shape, spec.dtype, dx)
    return zeros.at[tokens].add(dx), None


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


def embed_tokens(outer: Params, tokens: jax.Array) -> jax.Array:
    """The residual stream's input: the embeddings of ``tokens`` (batch, time)."""
    return _lookup(outer["embed"], tokens)


def block(cfg: ModelConfig, lp: Params, x: jax.Array) -> jax.Array:
    """One decoder layer (``lp``: one layer's slice of ``params["layers"]``)."""
    return _block(cfg, x, lp)


def head_logits(outer: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Logits (f32) of the last layer's output ``x``: final norm, then the head."""
    x = _rms_norm(x, outer["final_norm"], cfg.norm_eps)
    return (x @ outer["head"]).astype(jnp.float32)


def head_loss(outer: Params, x: jax.Array, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Mean next-token cross-entropy of the last layer's output ``x`` for ``tokens``
    (batch, time + 1)."""
    logits = head_logits(outer, x, cfg)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def forward(params: Params, tokens: jax.Array, cfg: ModelConfig, remat: bool = False) -> jax.Array:
    """Logits (f32) of shape ``tokens.shape + (vocab,)`` for integer ``tokens`` (batch, time).

    Args:
        params: Parameter tree from :func:`init_params`.
        tokens: Integer token ids, shape (batch, time).
        cfg: The architecture.
        remat: Recompute each layer's activations in the backward pass (less memory).
    """

    x = embed_tokens(params, tokens)
    if remat:
        # One layer read at a time, no whole-stack copies (galorax.layer_stack).
        x = galorax.scan_layers(functools.partial(block, cfg), x, params["layers"])
    else:
        x, _ = jax.lax.scan(lambda h, lp: (block(cfg, lp, h), None), x, params["layers"])
    return head_logits(params, x, cfg)


def loss_fn(params: Params, tokens: jax.Array, cfg: ModelConfig, remat: bool = False) -> jax.Array:
    """Mean next-token cross-entropy (nats) of ``tokens`` (batch, time + 1)."""
    logits = forward(params, tokens[:, :-1], cfg, remat)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
