"""Checksums of (sharded) arrays that do not depend on how they are sharded, and the
checksum record a checkpoint carries (:func:`checksum_record`, :func:`mismatched`).

An array's checksum is the sum, modulo 2**64, of a mixed hash of every element's bit
pattern and global position. A sum can be taken shard by shard, on whichever process holds
a shard, and added up: a checkpoint saved on one mesh verifies when restored onto another.
One flipped bit changes its element's hash (the mix is a bijection of the pattern), so the
sum; unrelated changes cancel with probability about 2**-64.

Example:
    >>> import numpy as np
    >>> x = np.arange(12, dtype=np.float32).reshape(3, 4)
    >>> whole = array_sum(x)
    >>> halves = shard_sum(x[:2], (slice(0, 2), slice(None)), x.shape) + shard_sum(
    ...     x[2:], (slice(2, 3), slice(None)), x.shape)
    >>> whole == halves % 2**64
    True
    >>> y = x.copy(); y.view(np.uint32)[1, 2] ^= 1  # one flipped bit
    >>> array_sum(y) == whole
    False
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

_MASK = 2**64 - 1
_C1 = np.uint64(0x9E3779B97F4A7C15)
_C2 = np.uint64(0xBF58476D1CE4E5B9)
#: Elements hashed at once (bounds the uint64 temporaries to a few MB).
_BLOCK = 1 << 18


def _words(x: np.ndarray) -> np.ndarray:
    """``x``'s bit patterns as unsigned integers (bytes along a new axis for odd widths)."""
    x = np.ascontiguousarray(x)
    if x.dtype.itemsize in (1, 2, 4, 8):
        return x.view(np.dtype(f"u{x.dtype.itemsize}"))
    return x.view(np.uint8).reshape(*x.shape, x.dtype.itemsize)


def shard_sum(data: Any, index: tuple[slice, ...], global_shape: Sequence[int]) -> int:
    """The checksum terms of one shard: ``data`` at ``index`` of an array of ``global_shape``.

    Args:
        data: The shard's values (host-readable).
        index: The shard's slices of the global array (``jax.Shard.index``).
        global_shape: The global array's shape.
    """
    words = _words(np.asarray(data))
    shape = tuple(global_shape) + words.shape[len(global_shape) :]
    starts = [s.start or 0 for s in index] + [0] * (len(shape) - len(index))
    strides = np.cumprod((1, *shape[:0:-1]), dtype=np.uint64)[::-1]
    flat, total = words.reshape(-1), 0
    for a in range(0, flat.size, _BLOCK):
        local = np.arange(a, min(a + _BLOCK, flat.size), dtype=np.int64)
        pos = np.zeros(local.shape, np.uint64)  # the elements' global flat positions
        for m, start, stride in zip(
            np.unravel_index(local, words.shape), starts, strides, strict=True
        ):
            pos += (m.astype(np.uint64) + np.uint64(start)) * stride
        h = flat[a : a + _BLOCK].astype(np.uint64) * _C1 + pos
        h ^= h >> np.uint64(31)
        h *= _C2
        h ^= h >> np.uint64(29)
        total += int(h.sum(dtype=np.uint64))
    return total & _MASK


def array_sum(x: Any) -> int:
    """The checksum of a whole host array."""
    x = np.asarray(x)
    return shard_sum(x, tuple(slice(0, n) for n in x.shape), x.shape)


def local_sum(x: Any) -> int:
    """This process's share of ``x``'s checksum; the processes' shares add up to it.

    A global (not fully addressable) array contributes the first replica of each shard
    this process holds; anything a process holds whole counts on process 0 only.
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        parts = [
            shard_sum(s.data, s.index, x.shape) for s in x.addressable_shards if s.replica_id == 0
        ]
        return sum(parts) & _MASK
    if jax.process_index() != 0:
        return 0
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return array_sum(x)


def total_sums(local: Sequence[int], flags: Sequence[int] = ()) -> tuple[list[int], list[int]]:
    """Every process's ``local`` sums added up, and every process's ``flags`` (min over
    processes): one collective under ``jax.distributed``, none on one process."""
    if jax.process_count() == 1:
        return list(local), list(flags)
    from jax.experimental import multihost_utils

    # uint32 halves: without jax_enable_x64 a uint64 would not survive the collective.
    words = np.array([[v >> 32, v & 0xFFFFFFFF] for v in local] + [[f, 0] for f in flags])
    gathered = np.asarray(multihost_utils.process_allgather(words.astype(np.uint32)))
    parts = gathered.astype(np.uint64)
    n = len(local)
    sums = [int(sum(int(p[i, 0]) << 32 | int(p[i, 1]) for p in parts)) & _MASK for i in range(n)]
    return sums, [int(parts[:, n + j, 0].min()) for j in range(len(flags))]


def named(items: dict[str, Any]) -> dict[str, Any]:
    """The arrays of ``{"params": tree, "opt_state": flat dict}`` by name, e.g.
    ``params['layers']['wq']`` and ``opt_state['000003']`` (flattening order)."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(items)[0]:
        out[f"{path[0].key}{jax.tree_util.keystr(path[1:])}"] = x
    return out


def meta_hash(meta: dict[str, Any]) -> str:
    """A short hash of a checkpoint's JSON metadata."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def checksum_record(params: Any, flat: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's checksums (the same on every process: one collective)."""
    arrays = named({"params": params, "opt_state": flat})
    sums = total_sums([local_sum(x) for x in arrays.values()])[0]
    return {
        "version": 1,
        "arrays": {
            name: {"shape": list(np.shape(x)), "dtype": str(x.dtype), "sum": f"{s:016x}"}
            for (name, x), s in zip(arrays.items(), sums, strict=True)
        },
        "meta": meta_hash(meta),
    }


def as_recorded(tree: Any, record: dict[str, Any], prefix: str) -> Any:
    """Abstract ``tree`` in the dtypes its arrays were saved in (verified before a cast)."""

    def saved(path: Any, x: Any) -> Any:
        entry = record["arrays"].get(f"{prefix}{jax.tree_util.keystr(path)}", {})
        dtype = np.dtype(entry["dtype"]) if "dtype" in entry else x.dtype
        return jax.ShapeDtypeStruct(x.shape, dtype, sharding=getattr(x, "sharding", None))

    return jax.tree_util.tree_map_with_path(saved, tree)


def verify_sums(arrays: Sequence[Any], ok: bool) -> tuple[list[int], bool]:
    """The checksums of restored ``arrays`` (None: not restored) and whether every process
    restored them (``ok`` everywhere): one collective, so that all agree."""
    sums, (flag,) = total_sums([0 if x is None else local_sum(x) for x in arrays], [int(ok)])
    return sums, bool(flag)


def mismatched(
    record: dict[str, Any] | None, names: Sequence[str], sums: Sequence[int]
) -> list[str]:
    """The names whose sums differ from ``record``'s (none without a record)."""
    if record is None:
        return []
    entries = [record["arrays"].get(n) for n in names]
    got = [e.get("sum") if isinstance(e, dict) else None for e in entries]
    return [n for n, g, s in zip(names, got, sums, strict=True) if g != f"{s:016x}"]
