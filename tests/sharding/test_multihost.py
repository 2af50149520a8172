"""Two processes on 127.0.0.1 form one 8-device cluster with ``jax.distributed.initialize()``.

JAX's CPU backend runs cross-process collectives over Gloo, so the (2, 4) mesh spans both
processes (a data shard each, the model axis inside each): the multi-host path end to end,
loading included, gives the single-device engine's tokens.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.sharding.runs import run

ROOT = Path(__file__).parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_serve_like_one_device(models, tmp_path):
    _, expected = run(models["t5"], "t5", None)
    expected = [[(s.token_ids, s.finish_reason) for s in out.sequences] for out in expected[:5]]
    flags = os.environ.get("XLA_FLAGS", "").replace("device_count=8", "device_count=4")
    env = {**os.environ, "XLA_FLAGS": flags, "PYTHONPATH": str(ROOT)}
    port, out = _free_port(), tmp_path / "out.json"
    model_dir = str(models["t5"].path)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.sharding.multihost_worker", str(i), str(port), model_dir, str(out)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        finally:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    got = [[(tokens, reason) for tokens, reason in row] for row in json.loads(out.read_text())]
    assert got == expected
