"""One process of ``tests/test_distributed.py``: trains the micro model a few steps.

``python tests/distributed_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.json``. With one
process it runs on one device (the reference); with several it joins
``jax.distributed`` on localhost and shards params (FSDP) and batch over all devices.
It saves a sharded checkpoint after step 2 and, after step 4, resumes from it.
"""

from __future__ import annotations

import json
import os
import sys
import time

from galorax import sharding

t0 = time.perf_counter()
pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if nproc > 1:
    sharding.initialize_distributed(f"localhost:{port}", nproc, pid)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import galorax  # noqa: E402
from galorax import model  # noqa: E402
from galorax.checkpoint import Checkpointer, with_shardings  # noqa: E402
from galorax.dimension_numbers import dimension_numbers_from_rules  # noqa: E402

cfg = model.get_preset("micro")
# Automatic axes: the model (gathers, scans) needs no sharding annotations.
mesh = sharding.make_mesh("data=1,fsdp=-1", explicit=False)
host_params = jax.device_get(model.init_params(cfg, jax.random.key(0)))
specs = sharding.fsdp_partition_specs(host_params, mesh, min_size=256)
shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
params = jax.tree.map(
    lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx, x=x: x[idx]),
    host_params,
    shardings,
)
tx = galorax.galore(
    learning_rate=1e-2,
    rank=4,
    update_proj_gap=2,
    weight_dimension_numbers=dimension_numbers_from_rules(host_params),
    subspace=galorax.Randomized(qr="gram", power_iters=0),  # same maths on 1 and N devices
)
state_shardings = sharding.state_shardings(tx, params)
opt_state = jax.jit(tx.init, out_shardings=state_shardings)(params)
batch_sharding = NamedSharding(mesh, sharding.batch_partition_spec(mesh))


def step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(model.loss_fn)(params, tokens, cfg)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


# Outputs pinned to the inputs' shardings: without them the compiler picks its own for
# the new params and state, and the second step compiles the whole program again.
step = jax.jit(
    step,
    out_shardings=(shardings, state_shardings, NamedSharding(mesh, PartitionSpec())),
    donate_argnums=(0, 1),
)

rng = np.random.default_rng(0)
global_batches = [rng.integers(0, cfg.vocab_size, (8, 17), dtype=np.int32) for _ in range(4)]


def run(params, opt_state, start):
    losses = []
    for tokens in global_batches[start:]:
        batch = sharding.process_local_batch(tokens, batch_sharding)  # each process: its rows
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
        print("step", start + len(losses), losses[-1], f"{time.perf_counter() - t0:.1f}s")
        if start + len(losses) == 2:  # a sharded checkpoint, every process writing its shards
            ckpt.save(2, params, opt_state, {"step": 2})
    return losses


ckpt = Checkpointer(out + ".ckpt")
losses = run(params, opt_state, 0)
# Resume from step 2 onto the same shardings (abstract targets: nothing else is live).
abstract = jax.eval_shape(lambda: (params, opt_state))
params, opt_state = ckpt.restore(2, *with_shardings(abstract, (shardings, state_shardings)))
resumed = run(params, opt_state, 2)
ckpt.close()
if jax.process_index() == 0:
    with open(out, "w") as f:
        json.dump({"losses": losses, "resumed": resumed, "devices": jax.device_count()}, f)
sys.stdout.flush()
# Skip interpreter teardown: the gloo/coordination-service shutdown can wait on a peer
# that already left, and the result is written.
os._exit(0)
