"""A Ctrl-C under ``jax.distributed`` that reaches one process only (issue 14): the
processes agree on the stop at a step boundary, so both stop after the same step and
write one checkpoint together, instead of one saving while the other waits in the next
step's collective. Two processes on localhost (CPU, gloo), as ``test_distributed.py``."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest
from test_distributed import XLA_FLAGS, _gloo_available  # noqa: F401 - the same settings
from test_train import make_text_dir

from galorax.app import distributed
from galorax.app import interrupt as I

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKER = pathlib.Path(__file__).resolve().with_name("interrupt_worker.py")
#: Hard limit for both processes (a hang, the bug, fails instead of blocking CI).
DEADLINE_S = 150


def test_any_process_alone_is_the_flag():
    assert distributed.any_process(True) is True and distributed.any_process(False) is False


def test_agree_follows_any_process_and_stays():
    stop, calls = I.StopRequest(), []

    def peers(mine):  # a peer process asked to stop at the second boundary
        calls.append(mine)
        return len(calls) >= 2

    assert [stop.agree(peers) for _ in range(3)] == [False, True, True]
    assert calls == [False, False]  # once agreed, no more collectives
    assert not stop.requested  # this process's own first Ctrl-C still only stops


def _port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not _gloo_available(), reason="jax.distributed with gloo is unavailable")
def test_a_ctrl_c_in_one_process_stops_both_at_the_same_step(tmp_path):
    data, out, port = make_text_dir(tmp_path / "data"), tmp_path / "run", _port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS=XLA_FLAGS)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    procs = []
    for i in range(2):
        log = tmp_path / f"worker{i}.log"
        args = [sys.executable, str(WORKER), str(i), "2", str(port), str(data), str(out)]
        stdout = log.open("w")
        procs.append((subprocess.Popen(args, env=env, cwd=ROOT, stdout=stdout, stderr=stdout), log))
    start = time.monotonic()
    try:
        for proc, log in procs:
            try:
                proc.wait(timeout=max(DEADLINE_S - (time.monotonic() - start), 1))
            except subprocess.TimeoutExpired:
                pytest.fail(f"hung (no agreed stop):\n{log.read_text()[-3000:]}")
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, log in procs:
        assert proc.returncode == 0, log.read_text()[-4000:]
        assert "interrupted at step 2 saved True" in log.read_text(), log.read_text()[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1, 2]
