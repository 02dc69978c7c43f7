"""One process of ``tests/app/test_distributed_interrupt.py``: a Ctrl-C reaches one process only.

``python tests/app/interrupt_worker.py PROCESS_ID NUM_PROCESSES PORT DATA OUT``: joins
``jax.distributed`` on localhost and trains AdamW on the micro model over the mesh
``fsdp=N``; process 1 sends itself a SIGINT before step 2 (from the loop's ``on_point``, no timer),
process 0 gets none. Prints ``interrupted at step S saved B`` (or ``finished``).
"""

from __future__ import annotations

import os
import signal
import sys
import time

from galorax.app import distributed

t0 = time.perf_counter()
pid, nproc, port, data, out = sys.argv[1:6]
distributed.initialize_distributed(f"localhost:{port}", int(nproc), int(pid))

from galorax.app import config as C  # noqa: E402
from galorax.app import interrupt as I  # noqa: E402
from galorax.app import train as T  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - t0:.1f}s] {msg}", flush=True)


def hook(point: str, step: int) -> None:
    if pid == "1" and (point, step) == ("start", 1):
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs before this returns


cfg = C.TrainConfig(
    preset="micro",
    optimizer="adamw",
    steps=6,
    batch_size=8,
    seq_len=32,
    eval_batches=1,
    eval_every=6,
    checkpoint_every=0,
    lr=1e-2,
    data=data,
    mesh="fsdp=-1",
)
try:
    T.train(cfg, out, progress=False, adamw_ref=False, log=log, on_point=hook)
    log("finished")
except I.Interrupted as e:
    log(f"interrupted at step {e.step} saved {e.saved}")
sys.stdout.flush()
os._exit(0)  # as distributed_worker.py: no teardown waiting on a peer that left
