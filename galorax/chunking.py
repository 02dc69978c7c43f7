"""How a leaf's update runs: in bounded chunks of its leading axis, in place, on dense
or quantized storage. The executor of galorax's per-leaf math.

A stacked leaf (scanned layers ``(layers, m, n)``, an embedding's rows) updated in one
piece materializes every full-size temporary of the update at once: f32 copies of a bf16
gradient, dequantized 8-bit moments. :func:`update_chunks` (the one chunk loop of the
package) runs the update on a few slices at a time, a ``fori_loop`` over chunks of the
leading axis writing each chunk's result into the buffer it replaces, so temporaries scale
with a chunk of at most :attr:`Chunking.max_bytes`, not with the stack. A leaf that fits is
updated whole. The function must act slice by slice (the same result for a slice whatever
chunk it sits in): elementwise math, batched matmuls, per-slice reductions.

Who runs through it: :func:`map_slices` (a GaLore leaf's batch axes: projection, refresh,
back-projection, :mod:`galorax.projector`) and :func:`map_stored` (any state stored
quantized: dequantize, compute, requantize a chunk at a time; the moments' rotation of
:mod:`galorax.moments` and 8-bit Adam). Reductions in bounded chunks (a global norm, a
finite check): :mod:`galorax.reductions`.

What steers XLA's memory lives here, named for what it guarantees (each with the figure it
protects in its docstring): :func:`loop_variant` (no whole-stack upcast outside a loop),
:func:`after` (an in-place write after the reads of what it overwrites),
:func:`buffer_after` (a buffer born after its input), ``update_chunks(isolate=True)`` (no
copy of every buffer per iteration), a loop of no iteration for a skipped step (no copy).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from galorax.quantization.blockwise import (
    QuantizedArray,
    dequantize_blockwise,
    is_quantized,
    lead_axes,
    quantize_like,
)


@dataclasses.dataclass(frozen=True)
class Chunking:
    """How large leaves are updated in bounded chunks: ``scale_by_galore(...,
    chunking=Chunking())``, ``scale_by_adam_8bit``, ``clip_by_global_norm``, ``per_layer``.

    Attributes:
        max_bytes: Largest f32 temporary (bytes) a chunk may need: 4 MiB. A leaf's chunk
            holds a few such temporaries at once (moments, update, codes), and XLA may run
            sibling leaves' loops as one, so the budget is small next to any leaf worth
            chunking (a 1B model's embedding runs in 64 chunks; one layer of a stack at
            least). 8 MiB put 60m's 8-bit AdamW above AdamW (``BENCHMARKS.md``).
        galore: Whether GaLore's update (projection, refresh, back-projection) of a stacked
            low-precision leaf (or one with a residual) runs in chunks. On: XLA's memory
            analysis on CPU puts the 1B GaLore step at 12.16 GB chunked against 14.42 whole
            (``BENCHMARKS.md``). 8-bit moments are always chunked.
        max_extra_iterations: A chunk is a divisor of the leading axis; when the largest
            divisor under the cap would cost more than this many times the iterations of
            an ideal split, the leaf is updated whole (a large prime-sized axis would
            otherwise run one slice per iteration).

    Example:
        >>> Chunking(max_bytes=2**20).max_bytes
        1048576
    """

    max_bytes: int = 4 * 2**20
    galore: bool = True
    max_extra_iterations: int = 4

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_extra_iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Chunking.{name} must be an int >= 1, got {value!r}.")
        if not isinstance(self.galore, bool):
            raise TypeError(f"Chunking.galore must be a bool, got {self.galore!r}.")


#: The default settings.
DEFAULT = Chunking()
#: No chunking: every leaf in one piece.
WHOLE = Chunking(max_bytes=2**62)


def resolve(value: Chunking | None, name: str = "chunking") -> Chunking:
    """``value``, or :data:`DEFAULT` for None; anything else is a ``TypeError`` naming ``name``.

    Example:
        >>> resolve(None) is DEFAULT
        True
    """
    if value is None:
        return DEFAULT
    if not isinstance(value, Chunking):
        raise TypeError(f"`{name}` must be a galorax.Chunking or None, got {value!r}.")
    return value


def chunk_size(n: int, slice_bytes: int, settings: Chunking = DEFAULT) -> int:
    """Slices per chunk of a leading axis of ``n`` slices of ``slice_bytes`` each.

    The largest divisor of ``n`` whose chunk fits ``settings.max_bytes``; ``n`` (no
    chunking) when everything fits, or when no divisor is close enough to the budget
    (:attr:`Chunking.max_extra_iterations`).

    Example:
        >>> chunk_size(24, 45 * 2**20), chunk_size(24, 2**20), chunk_size(32000, 8192)
        (1, 4, 500)
        >>> chunk_size(7919, 2**20, Chunking(max_bytes=2**24))  # prime: 7919 iterations
        7919
    """
    cap = max(1, settings.max_bytes // max(1, slice_bytes))
    if cap >= n:
        return n
    best = max(d for d in range(1, cap + 1) if n % d == 0)
    if n // best > settings.max_extra_iterations * math.ceil(n / cap):
        return n
    return best


def loop_variant(tree: Any, i: jax.Array) -> tuple[Any, jax.Array]:
    """``tree`` and the loop index ``i`` through one optimization barrier, for reads of
    ``tree`` inside a loop body.

    CPU XLA computes bf16 slices in f32 (its bf16 normalization upcasts the whole operand
    of a dynamic slice); for a loop-invariant stack it then hoists that upcast out of the
    loop: a whole-stack f32 copy. Tied to ``i``, the stack is no longer loop-invariant, the
    upcast stays in the slice's fusion and only the slice is read. Values are unchanged.

    Example:
        >>> import jax.numpy as jnp
        >>> stack, i = loop_variant(jnp.ones((3, 2), jnp.bfloat16), jnp.int32(1))
        >>> stack.dtype, int(i)
        (dtype(bfloat16), 1)
    """
    return jax.lax.optimization_barrier((tree, i))


def after(x: jax.Array, dep: jax.Array) -> jax.Array:
    """``x``, computed once ``dep`` exists (a data dependency on ``dep``'s first
    element, which XLA cannot drop): it orders an in-place write after the reads of
    what it overwrites. The same values where that element is finite.

    Example:
        >>> after(jnp.ones(2, jnp.bfloat16), jnp.zeros((3, 3))).tolist()
        [1.0, 1.0]
    """
    return x + jnp.zeros((), x.dtype) * _first(dep).astype(x.dtype)


def _first(x: jax.Array) -> jax.Array:
    """``x``'s first element as a scalar (a static slice: XLA keeps the dependency)."""
    return jax.lax.slice(x, (0,) * x.ndim, (1,) * x.ndim).reshape(())


def buffer_after(shape: tuple[int, ...], dtype: Any, after: jax.Array) -> jax.Array:
    """A buffer for :func:`update_chunks` to write whole, computed from ``after``'s first
    element: XLA can neither merge it with other buffers of its shape (which costs a copy
    per loop, allocated early) nor make it before ``after`` exists (a gradient: during the
    backward pass, where every gradient is alive). Zeros, or NaN where that element is not
    finite: every element must be written before it is read.

    Example:
        >>> buffer_after((2, 3), jnp.float32, jnp.ones((4, 4), jnp.bfloat16)).tolist()
        [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    """
    return jnp.zeros(shape, dtype) + jnp.zeros((), dtype) * _first(after).astype(dtype)


def update_chunks(
    fn: Callable[[Any, Any], Any],
    bufs: Any,
    reads: Any,
    chunk: int,
    keep: Any = None,
    *,
    isolate: bool = False,
) -> Any:
    """``fn(bufs, reads)`` computed ``chunk`` slices of the leading axis at a time, in place.

    A ``fori_loop`` over the chunks reads chunk ``i`` of ``bufs`` and ``reads`` and writes
    ``fn``'s result into chunk ``i`` of ``bufs``: the outputs take the buffers of the inputs
    they replace (a gradient becomes its update, 8-bit codes their successors), so no
    second full-size buffer is needed, only one chunk's temporaries.

    Args:
        fn: ``(bufs chunk, reads chunk) -> new bufs chunk`` (same structure; each leaf
            cast to its buffer's dtype). It must act on each slice independently.
        bufs: A tree of arrays with the same leading size ``n`` (a multiple of ``chunk``),
            replaced by the result.
        reads: A tree of arrays with the leading size ``n``, only read.
        chunk: Slices per iteration (:func:`chunk_size`); ``fn(bufs, reads)`` once when
            it covers the axis.
        keep: Optional scalar bool: when False the loop runs no iteration and every
            buffer comes back as it was (a skipped step, :mod:`galorax.step_gate`; a
            moment rotation when no projector changed). Unlike a select or a cond after
            the loop, the old buffers need no copy; when ``chunk`` covers the axis, a select.
        isolate: Compute each new chunk apart from the writes (a conditional whose two
            branches are ``fn``), for an ``fn`` whose every output reads several buffers
            (8-bit Adam: the update and both moments read the gradient and both moments).
            Fused into the in-place writes, each write would re-read chunks another one
            has overwritten, and XLA copies every buffer whole, every iteration.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.arange(12.0).reshape(6, 2)
        >>> out = update_chunks(lambda b, r: b * 2 + r, x, jnp.ones((6, 2)), 2)
        >>> bool((out == x * 2 + 1).all())
        True
    """

    n = jax.tree.leaves(bufs)[0].shape[0]
    if chunk >= n:
        new = fn(bufs, reads)
        return new if keep is None else optax.tree_utils.tree_where(keep, new, bufs)
    if n % chunk:
        raise ValueError(f"chunk {chunk} does not divide the leading axis {n}")

    def body(i: jax.Array, bufs: Any) -> Any:
        # Tied to i, a bf16 read is not upcast whole outside the loop (see loop_variant).
        rs, i = loop_variant(reads, i)
        start = i * chunk
        cut = lambda x: jax.lax.dynamic_slice_in_dim(x, start, chunk)  # noqa: E731
        args = jax.tree.map(cut, bufs), jax.tree.map(cut, rs)
        # Both branches are fn: the conditional only has XLA materialize the new chunk.
        new = jax.lax.cond(i % 2 == 0, fn, fn, *args) if isolate else fn(*args)
        return jax.tree.map(
            lambda b, x: jax.lax.dynamic_update_slice_in_dim(b, x.astype(b.dtype), start, 0),
            bufs,
            new,
        )

    steps = n // chunk if keep is None else jnp.where(keep, n // chunk, 0)
    return jax.lax.fori_loop(0, steps, body, bufs)


def can_split(q: QuantizedArray) -> bool:
    """Whether ``q``'s blocks never span two slices of its leading axis (so its codes and
    scales can be cut along it).

    Example:
        >>> from galorax.quantization.blockwise import quantized_zeros
        >>> can_split(quantized_zeros((4, 512))), can_split(quantized_zeros((4, 8)))
        (True, False)
    """
    return lead_axes(q.shape, q.block_size) >= 1


def quantized_chunk(like: QuantizedArray, codes: jax.Array, scales: jax.Array) -> QuantizedArray:
    """A chunk (or the whole) of a split :class:`QuantizedArray` ``like``: its codes and
    scales with ``like``'s settings, shaped by the leading axis of ``codes``.

    Example:
        >>> from galorax.quantization.blockwise import quantized_zeros
        >>> q = quantized_zeros((4, 512))
        >>> quantized_chunk(q, q.codes[:2], q.scales[:2]).shape
        (2, 512)
    """
    return dataclasses.replace(
        like, codes=codes, scales=scales, shape=(codes.shape[0], *like.shape[1:])
    )


def map_stored(
    fn: Callable[[Any, Any], Any],
    bufs: Any,
    reads: Any,
    keep: Any = None,
    *,
    split: bool = True,
    isolate: bool = False,
    skip_by: Literal["cond", "select"] = "cond",
    settings: Chunking = DEFAULT,
) -> Any:
    """``fn(bufs, reads)`` on dense values, for ``bufs`` that may be stored quantized.

    Each :class:`~galorax.quantization.QuantizedArray` of ``bufs`` is dequantized before
    ``fn`` and its result quantized back like it; the leading axis runs in chunks of at
    most ``settings.max_bytes`` of f32 per chunk (:func:`update_chunks`: codes and scales
    are written in place, a chunk's f32 values are the only full-precision copy), whole
    when ``split`` is False, when it fits, or when a quantized buffer's blocks span two
    slices. With ``keep`` (a scalar bool) the buffers change only where it holds: in chunks
    a loop of no iteration (no copy); a whole leaf by ``skip_by``, measured per caller:
    ``"cond"`` skips the computation too (the moments' rotation: 1b 8-bit per-layer GaLore
    5.29 GB, 5.71 with a select), ``"select"`` computes and selects, fused into the in-place
    write (8-bit Adam, whose update is read either way: 1b 8-bit AdamW 8.95 GB, 9.15 with a
    cond).

    Args:
        fn: ``(dense bufs, reads) -> new dense bufs`` (same structure), slice by slice.
        bufs: A tree of arrays and ``QuantizedArray``s with the same leading size.
        reads: A tree of arrays with that leading size, only read.
        keep: Optional scalar bool.
        split: Whether the leading axis may be split (False: a single matrix).
        isolate: See :func:`update_chunks`.
        skip_by: How a whole leaf skips (see above).
        settings: The chunk budget.

    Example:
        >>> import jax.numpy as jnp
        >>> from galorax.quantization.blockwise import dequantize_blockwise, quantized_zeros
        >>> m = quantized_zeros((4, 256))
        >>> new = map_stored(lambda m, g: m + g, m, jnp.ones((4, 256)), settings=Chunking(2048))
        >>> float(dequantize_blockwise(new).sum()), new.shape
        (1024.0, (4, 256))
    """
    leaves = jax.tree.leaves(bufs, is_leaf=is_quantized)
    treedef: Any = jax.tree.structure(bufs, is_leaf=is_quantized)
    stored = [q for q in leaves if is_quantized(q)]
    first = leaves[0]
    n = first.shape[0] if first.shape else 1
    splits = split and bool(first.shape) and all(can_split(q) for q in stored)
    chunk = chunk_size(n, 4 * math.prod(first.shape[1:]), settings) if splits else n

    def dense(parts: list[Any]) -> Any:
        return treedef.unflatten([dequantize_blockwise(p) if is_quantized(p) else p for p in parts])

    def encode(new: Any, like: list[Any]) -> list[Any]:
        out = treedef.flatten_up_to(new)
        return [  # each result stored as its buffer is (a dtype, or quantized)
            quantize_like(x, q) if is_quantized(q) else x.astype(q.dtype)
            for x, q in zip(out, like, strict=True)
        ]

    if chunk >= n:  # whole: scalars, small leaves, blocks across slices
        run = lambda: treedef.unflatten(encode(fn(dense(leaves), reads), leaves))  # noqa: E731
        if keep is None:
            return run()
        if skip_by == "select":
            return optax.tree_utils.tree_where(keep, run(), bufs)
        return jax.lax.cond(keep, run, lambda: bufs)

    def body(raw: list[Any], reads: Any) -> list[Any]:
        parts = [
            quantized_chunk(q, *r) if is_quantized(q) else r
            for q, r in zip(leaves, raw, strict=True)
        ]
        new = encode(fn(dense(parts), reads), parts)
        return [(x.codes, x.scales) if is_quantized(x) else x for x in new]

    raw = [(q.codes, q.scales) if is_quantized(q) else q for q in leaves]
    raw = update_chunks(body, raw, reads, chunk, keep, isolate=isolate)
    return treedef.unflatten(
        [quantized_chunk(q, *r) if is_quantized(q) else r for q, r in zip(leaves, raw, strict=True)]
    )


def slices_chunk(batch: tuple[int, ...], slice_bytes: int, settings: Chunking = DEFAULT) -> int:
    """Slices per iteration of :func:`map_slices` over the batch axes ``batch`` (their
    product when it runs ``fn`` whole).

    Example:
        >>> slices_chunk((24,), 45 * 2**20), slices_chunk((24,), 0), slices_chunk((), 2**30)
        (1, 24, 1)
    """
    b = math.prod(batch)
    return chunk_size(b, slice_bytes, settings) if batch and slice_bytes else b


def map_slices(
    fn: Callable[[Any, Any], Any],
    bufs: Any,
    reads: Any,
    n_batch: int,
    slice_bytes: int,
    keep: Any = None,
    settings: Chunking = DEFAULT,
) -> Any:
    """:func:`update_chunks` over the matrices of arrays shaped ``(*batch, ...)``
    (``n_batch`` batch axes), a chunk of at most ``settings.max_bytes`` (``slice_bytes``
    per matrix) at a time.

    The batch axes are flattened into one (a free reshape); without batch axes, with
    ``slice_bytes=0`` or when the stack fits, ``fn(bufs, reads)`` as it is. With ``keep``
    (a scalar bool) ``fn`` runs only when it holds, else ``bufs`` come back as they were:
    a loop of no iteration (the buffers need no copy, unlike a loop inside a ``cond``),
    or a ``cond`` around the whole ``fn``.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.ones((2, 3, 4, 5))
        >>> map_slices(lambda b, r: b + r, x, x, 2, slice_bytes=DEFAULT.max_bytes).shape
        (2, 3, 4, 5)
    """
    batch = jax.tree.leaves(bufs)[0].shape[:n_batch]
    b = math.prod(batch)
    chunk = slices_chunk(batch, slice_bytes, settings)
    if chunk >= b:
        if keep is None:
            return fn(bufs, reads)
        return jax.lax.cond(keep, fn, lambda b, _: b, bufs, reads)
    flat = lambda x: x.reshape((b, *x.shape[n_batch:]))  # noqa: E731
    out = update_chunks(fn, jax.tree.map(flat, bufs), jax.tree.map(flat, reads), chunk, keep)
    return jax.tree.map(lambda y: y.reshape((*batch, *y.shape[1:])), out)
