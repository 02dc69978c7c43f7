"""Checkpoints with orbax: atomic, resumable to the bit, nothing pickled.

Each checkpoint is a step directory with three items: ``params`` (the parameter dict),
``opt_state`` and ``meta`` (JSON). orbax writes a step into a temporary directory and renames
it when complete, so a process killed mid-write leaves only a temporary directory, which
:class:`Checkpointer` ignores: the previous checkpoint stays the latest one.

The optimizer state is stored as its flat list of leaves, keyed by position, and rebuilt from
the structure of a freshly initialized state (:mod:`galorax.app.flat_state`): no pytree node
type in the files, no zero-size placeholder stored, typed PRNG keys as their raw key data.

Sharded arrays (``NamedSharding`` over a mesh, one process or several under
``jax.distributed``) are written shard by shard, each process writing its own. A restore
places every array on its template's ``.sharding`` when it has one: pass the live state, or
abstract trees such as ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` (see
:func:`with_shardings`); the target shardings need not be those of the save. Templates
without shardings (``jax.eval_shape`` on one device) restore as before.

Each checkpoint carries a fourth item, ``checksums`` (JSON, written in the same atomic
step as the arrays): every array's shape, dtype and layout-independent checksum
(:mod:`galorax.app.checksums`, summed over what each process holds) and a hash of
``meta``. A restore verifies them: flipped bits, truncated or missing files and tampered
metadata raise :class:`CheckpointError`, one line naming the checkpoint;
:meth:`Checkpointer.restore_latest` falls back to the newest intact one. Checkpoints
written before checksums existed restore unverified.

Example:
    >>> import tempfile, jax.numpy as jnp, optax
    >>> params = {"w": jnp.arange(6.0).reshape(2, 3)}
    >>> opt = optax.adam(1e-3)
    >>> ck = Checkpointer(tempfile.mkdtemp())
    >>> ck.save(5, params, opt.init(params), {"step": 5})
    >>> ck.latest_step()
    5
    >>> p, s = ck.restore(5, params, opt.init(params))
    >>> bool((p["w"] == params["w"]).all())
    True
    >>> ck.close()
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from galorax.app import model as model_lib
from galorax.app.checksums import (
    as_recorded,
    checksum_record,
    meta_hash,
    mismatched,
    named,
    verify_sums,
)
from galorax.app.flat_state import abstract_leaf, flatten_state, unflatten_state, with_shardings

__all__ = ["CheckpointError", "Checkpointer", "load_params", "model_config_of", "with_shardings"]

# orbax logs every save at INFO through absl; keep the progress bar readable.
logging.getLogger("absl").setLevel(logging.WARNING)


class CheckpointError(ValueError):
    """A checkpoint that does not read back intact; the message names it, on one line."""


def _one_line(e: BaseException) -> str:
    """``e`` in one short line (TensorStore's spec dumps cut off)."""
    text = " ".join(str(e).split()).split(" See full TensorStore")[0].split(" [tensorstore_spec")[0]
    return f"{type(e).__name__}: {text[:200]}"


class Checkpointer:
    """Saves and restores ``(params, opt_state)`` under ``directory``/<step>/.

    Args:
        directory: Where step directories live (created on the first save).
        max_to_keep: Number of most recent checkpoints kept.
    """

    def __init__(self, directory: str | os.PathLike[str], max_to_keep: int = 2) -> None:
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = pathlib.Path(directory).absolute()
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=False,  # save() returns once the step is final
                create=True,
            ),
            item_names=("params", "opt_state", "meta", "checksums"),
        )

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step (temporary directories are not steps)."""
        self._mgr.reload()
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        """The finished checkpoints' steps, oldest first."""
        self._mgr.reload()
        return sorted(self._mgr.all_steps())

    def clean_tmp(self) -> list[str]:
        """Removes the temporary directories of unfinished writes; returns their names."""
        stale = sorted(p for p in self.directory.glob("*.orbax-checkpoint-tmp*") if p.is_dir())
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        return [p.name for p in stale]

    def set_aside(self, step: int) -> pathlib.Path:
        """Renames checkpoint ``step`` to ``<step>.corrupt`` (no longer a step; replaces an
        earlier one of that name); call it on one process, then :meth:`all_steps` on all."""
        dest = self.directory / f"{step}.corrupt"
        shutil.rmtree(dest, ignore_errors=True)
        (self.directory / str(step)).rename(dest)
        return dest

    def save(self, step: int, params: Any, opt_state: Any, meta: dict[str, Any]) -> None:
        """Writes step ``step`` atomically (a no-op if that step is already saved)."""
        if step in self._mgr.all_steps():
            return
        args = self._ocp.args
        flat = flatten_state(opt_state)
        self._mgr.save(
            step,
            args=args.Composite(
                params=args.StandardSave(params),
                opt_state=args.StandardSave(flat),
                meta=args.JsonSave(meta),
                checksums=args.JsonSave(checksum_record(params, flat, meta)),
            ),
            force=True,
        )
        self._mgr.wait_until_finished()

    def _where(self, step: int) -> str:
        return f"checkpoint {step} ({self.directory / str(step)})"

    def _checksums(self, step: int) -> dict[str, Any] | None:
        """Step ``step``'s ``checksums`` item; None for a checkpoint from before them."""
        if not (self.directory / str(step) / "checksums").is_dir():
            return None
        got = self._mgr.restore(
            step, args=self._ocp.args.Composite(checksums=self._ocp.args.JsonRestore())
        )
        record = dict(got.checksums)
        if not isinstance(record.get("arrays"), dict):
            raise ValueError("its checksums file is not galorax's")
        return record

    def _read(self, step: int, items: dict[str, Any]) -> tuple[Any, dict[str, Any] | None]:
        """orbax's restore of ``items`` (name: abstract tree) and the step's checksums."""
        args = self._ocp.args
        record = self._checksums(step)
        if record is not None:
            items = {k: as_recorded(v, record, k) for k, v in items.items()}
        composite = args.Composite(**{k: args.StandardRestore(v) for k, v in items.items()})
        return self._mgr.restore(step, args=composite), record

    def _verified(self, step: int, items: dict[str, Any]) -> Any:
        """:meth:`_read`, verified against the checksums (on every process together).

        Raises:
            CheckpointError: unreadable, or an array differs from its checksum.
        """
        names = list(named(items))
        restored, record, error = None, None, None
        try:
            restored, record = self._read(step, items)
        except Exception as e:  # orbax/TensorStore/JSON errors of damaged files
            error = e
        arrays = {} if restored is None else named(dict(restored.items()))
        sums, ok = verify_sums([arrays.get(n) for n in names], error is None)
        if error is not None:
            raise CheckpointError(f"{self._where(step)} is unreadable: {_one_line(error)}")
        if not ok:
            raise CheckpointError(f"{self._where(step)} is unreadable on another process")
        bad = mismatched(record, names, sums)
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise CheckpointError(
                f"{self._where(step)} is corrupt: {bad[0]}{more} does not match its checksum"
            )
        return restored

    def restore(self, step: int, params_template: Any, opt_state_template: Any) -> tuple[Any, Any]:
        """Restores ``(params, opt_state)`` with the structure, shapes and dtypes of the templates.

        Templates may be real or abstract (``jax.eval_shape``) trees; leaves with a
        ``.sharding`` are restored onto it (see :func:`with_shardings`).

        Raises:
            CheckpointError: the checkpoint is damaged (see :meth:`restore_latest`).
        """
        leaves = jax.tree.leaves(opt_state_template)
        abstract_flat = {
            f"{i:06d}": abstract_leaf(leaf)
            for i, leaf in enumerate(leaves)
            if np.prod(abstract_leaf(leaf).shape) != 0
        }
        abstract_flat["n_leaves"] = jax.ShapeDtypeStruct((), jnp.int32)
        abstract_params = jax.tree.map(abstract_leaf, params_template)
        restored = self._verified(step, {"params": abstract_params, "opt_state": abstract_flat})
        params = jax.tree.map(
            lambda x, t: x if x.dtype == t.dtype else x.astype(t.dtype),
            restored.params,
            params_template,
        )
        flat = dict(restored.opt_state)
        if int(flat.pop("n_leaves")) != len(leaves):
            raise ValueError(
                f"checkpoint {step} in {self.directory} holds another optimizer's state; "
                "resume with the run's own settings"
            )
        return params, unflatten_state(flat, opt_state_template)

    def restore_latest(
        self, params_template: Any, opt_state_template: Any, log: Callable[[str], None] = print
    ) -> tuple[int, Any, Any, list[int]] | None:
        """The newest intact checkpoint: ``(step, params, opt_state, damaged newer steps)``.

        Each damaged checkpoint is logged (one line) and skipped; the caller sets it aside
        (:meth:`set_aside`) so that the run can write that step again.

        Returns:
            None: there is no finished checkpoint.

        Raises:
            CheckpointError: no checkpoint is intact (the newest one's error).
        """
        damaged: list[CheckpointError] = []
        steps = self.all_steps()
        for step in reversed(steps):
            try:
                params, opt_state = self.restore(step, params_template, opt_state_template)
            except CheckpointError as e:
                log(f"warning: {e}")
                damaged.append(e)
                continue
            return step, params, opt_state, steps[len(steps) - len(damaged) :]
        if damaged:
            raise CheckpointError(
                f"{damaged[0]}; no older checkpoint is intact: restore the files, or start the "
                "run over with --overwrite"
            )
        return None

    def restore_params(self, step: int, params_template: Any) -> Any:
        """Restores the parameters only (for fine-tuning with a fresh optimizer), verified.

        Raises:
            CheckpointError: the checkpoint is damaged.
        """
        items = {"params": jax.tree.map(abstract_leaf, params_template)}
        return self._verified(step, items).params

    def restore_meta(self, step: int) -> dict[str, Any]:
        """The JSON metadata saved with step ``step``.

        Raises:
            CheckpointError: it is unreadable or differs from its hash.
        """
        try:
            record = self._checksums(step)
            restored = self._mgr.restore(
                step, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore())
            )
            meta = dict(restored.meta)
        except Exception as e:
            raise CheckpointError(f"{self._where(step)} is unreadable: {_one_line(e)}") from None
        if record is not None and record.get("meta") != meta_hash(meta):
            raise CheckpointError(f"{self._where(step)} is corrupt: its meta differs from its hash")
        return meta

    def close(self) -> None:
        self._mgr.close()


def _checkpoint_dir(path: str | os.PathLike[str]) -> pathlib.Path:
    """A run directory's ``checkpoints/``, or ``path`` itself if it is a checkpoints dir."""
    p = pathlib.Path(path)
    if (p / "checkpoints").is_dir():
        return p / "checkpoints"
    if p.is_dir():
        return p
    raise FileNotFoundError(f"--init-from {path}: no such directory; pass a run's --out directory")


def model_config_of(path: str | os.PathLike[str]) -> model_lib.ModelConfig:
    """The architecture saved with the latest checkpoint in ``path`` (a run dir).

    Raises:
        FileNotFoundError: no finished checkpoint under ``path``.
    """
    d = _checkpoint_dir(path)
    ck = Checkpointer(d)
    try:
        step = ck.latest_step()
        if step is None:
            raise FileNotFoundError(
                f"--init-from {path}: no finished checkpoint in {d}; pass a run's --out directory"
            )
        meta = ck.restore_meta(step)
    finally:
        ck.close()
    return model_lib.ModelConfig(**meta["model"])


def load_params(path: str | os.PathLike[str], template: Any) -> Any:
    """The latest checkpoint's parameters under ``path``, cast to ``template``'s dtypes."""
    d = _checkpoint_dir(path)
    ck = Checkpointer(d)
    try:
        step = ck.latest_step()
        if step is None:
            raise FileNotFoundError(f"--init-from {path}: no finished checkpoint in {d}")
        params = ck.restore_params(step, template)
    finally:
        ck.close()
    return jax.tree.map(lambda x, t: jnp.asarray(x, t.dtype), params, template)
