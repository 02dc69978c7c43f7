"""Trees as orbax items: an optimizer state as its flat leaves, and abstract restore targets.

:class:`~galorax.app.checkpoint.Checkpointer` stores the optimizer state as its flat list of
leaves, keyed by position (:func:`flatten_state`), and rebuilds it from the structure of a
freshly initialized state (:func:`unflatten_state`). That keeps any pytree node type
(NamedTuples, ``optax.MaskedNode``) out of the files and sidesteps leaves orbax cannot
write: zero-size placeholders (``optax.contrib.galore`` keeps ``zeros((0, 0))`` for
unprojected leaves) are not stored at all, and typed PRNG keys are stored as their raw key
data. A restore target is a tree of ``jax.ShapeDtypeStruct`` (:func:`abstract_leaf`,
:func:`with_shardings`): each array lands on its template's sharding when it has one.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> state = optax.adam(1e-3).init({"w": jnp.zeros(3)})
    >>> flat = flatten_state(state)
    >>> sorted(flat)
    ['000000', '000001', '000002', 'n_leaves']
    >>> back = unflatten_state(flat, state)
    >>> jax.tree.structure(back) == jax.tree.structure(state)
    True
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

__all__ = ["abstract_leaf", "flatten_state", "is_key", "unflatten_state", "with_shardings"]


def is_key(x: Any) -> bool:
    """Whether ``x`` is (or describes) a typed PRNG key array."""
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def flatten_state(state: Any) -> dict[str, Any]:
    """Non-empty leaves of ``state`` keyed by zero-padded position (keys as raw data).

    Args:
        state: Any pytree (an optimizer state).

    Returns:
        ``{"n_leaves": count, "000000": leaf, ...}``: the leaf count doubles as a structure
        check and keeps an empty state a valid item; zero-size leaves are left out.
    """
    # Host values are numpy: a jax array made by one process alone lives on that process's
    # device only, and orbax refuses such arrays under jax.distributed.
    flat: dict[str, Any] = {"n_leaves": np.asarray(len(jax.tree.leaves(state)), np.int32)}
    for i, leaf in enumerate(jax.tree.leaves(state)):
        if is_key(leaf):
            leaf = jax.random.key_data(leaf)
        if np.size(leaf) == 0:
            continue
        flat[f"{i:06d}"] = leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)
    return flat


def _key_data_sharding(sharding: Any) -> Any:
    """The sharding of a key array's raw data (one trailing, unsharded axis more)."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec))
    if isinstance(sharding, SingleDeviceSharding):
        return sharding
    return None  # let orbax choose (the sharding the array was saved with)


def abstract_leaf(x: Any) -> Any:
    """``x``'s shape, dtype and sharding (if any) as a ``ShapeDtypeStruct`` (keys: raw data).

    Example:
        >>> import jax.numpy as jnp
        >>> abstract_leaf(jnp.zeros((2, 3))).shape
        (2, 3)
    """
    sharding = getattr(x, "sharding", None)
    if is_key(x):
        sharding = _key_data_sharding(sharding)
        x = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def with_shardings(tree: Any, shardings: Any) -> Any:
    """``tree``'s leaves as ``jax.ShapeDtypeStruct``s placed on ``shardings``: a restore target.

    Args:
        tree: Arrays or ``ShapeDtypeStruct``s (e.g. from ``jax.eval_shape``).
        shardings: A tree like ``tree`` of ``jax.sharding.Sharding`` (e.g. from
            :func:`galorax.sharding.state_shardings`), or one sharding for every leaf.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        >>> with_shardings({"w": jnp.zeros(3)}, one)["w"].sharding == one
        True
    """
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree
        )
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def unflatten_state(flat: dict[str, Any], template: Any) -> Any:
    """The tree of ``template`` rebuilt from :func:`flatten_state`'s ``flat`` (restored).

    Args:
        flat: Leaves keyed by position, ``n_leaves`` already removed or ignored.
        template: A tree with the state's structure (real or abstract leaves); left-out
            zero-size leaves are rebuilt from it, raw key data is wrapped back into keys.

    Returns:
        A tree with ``template``'s structure.
    """
    leaves, treedef = jax.tree.flatten(template)
    out = []
    for i, t in enumerate(leaves):
        key = f"{i:06d}"
        if key not in flat:  # an empty placeholder: rebuild it from the template
            out.append(jnp.zeros(t.shape, t.dtype, device=getattr(t, "sharding", None)))
        elif is_key(t):
            # Abstract templates carry the impl only on the dtype (jax has no public getter).
            impl = getattr(t.dtype, "_impl", None)
            out.append(jax.random.wrap_key_data(flat[key], impl=impl))
        else:
            out.append(flat[key])
    return jax.tree.unflatten(treedef, out)
