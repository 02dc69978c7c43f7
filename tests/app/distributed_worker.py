"""One process of ``tests/app/test_distributed.py``: ``galorax train``'s loop on the micro model.

``python tests/app/distributed_worker.py PROCESS_ID NUM_PROCESSES PORT DATA OUT``. With one
process it trains 4 steps on one device (the reference). With several it joins
``jax.distributed`` on localhost and trains on the mesh ``data=1,fsdp=N`` (params and
optimizer state FSDP-sharded, each process feeding its devices' rows of the batch,
sharded checkpoints every 2 steps), then restores the last checkpoint onto the mesh.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

from galorax.app import distributed

t0 = time.perf_counter()
pid, nproc, port, data, out = sys.argv[1:6]
if int(nproc) > 1:  # before anything else touches a device
    distributed.initialize_distributed(f"localhost:{port}", int(nproc), int(pid))

import jax  # noqa: E402

from galorax.app import build as B  # noqa: E402
from galorax.app import config as C  # noqa: E402
from galorax.app import train as T  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - t0:.1f}s] {msg}", flush=True)


cfg = C.TrainConfig(
    preset="micro",
    steps=4,
    batch_size=8,
    seq_len=32,
    eval_batches=1,
    eval_every=2,
    checkpoint_every=2,
    update_proj_gap=2,
    lr=1e-2,
    data=data,
    mesh="data=1,fsdp=-1" if int(nproc) > 1 else None,
)
log(f"devices {jax.device_count()} processes {jax.process_count()}")
quiet = dict(progress=False, adamw_ref=False, log=log)
T.train(cfg, out, **quiet)
if int(nproc) > 1:
    # The step-4 checkpoint restored onto the run's shardings by both processes (each
    # reading its shards): its validation loss is the run's last one, to the bit.
    import json

    from galorax.app import checkpoint, model
    from galorax.app import data as data_lib

    setup = B.build(C.resolve_config(cfg))
    run, mcfg, targets = setup.run, setup.model, setup.targets
    assert setup.placement is not None and targets is not None
    ckpt = checkpoint.Checkpointer(pathlib.Path(out) / "checkpoints")
    params, _ = ckpt.restore(4, targets.params, targets.state)
    ckpt.close()
    for a, t in zip(jax.tree.leaves(params), jax.tree.leaves(targets.params), strict=True):
        assert a.sharding == t.sharding, (a.sharding, t.sharding)
    batch = data_lib.eval_batches(setup.corpus.val, run.batch_size, run.seq_len, 1)[0]
    batch = setup.placement.put_batch(batch)
    loss = jax.jit(lambda p, b: model.loss_fn(p, b, mcfg))(params, batch)
    lines = (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines()
    log(f"restored val_loss {float(loss)!r} run {json.loads(lines[-1])['val_loss']!r}")
log("done")
sys.stdout.flush()
# Skip interpreter teardown: the gloo/coordination-service shutdown can wait on a peer
# that already left, and the results are written.
os._exit(0)
