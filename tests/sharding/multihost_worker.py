"""One of the two processes of ``test_multihost``: ``jax.distributed`` over 127.0.0.1, 4 CPU devices each.

Both processes run this same program (multi-controller SPMD): join the cluster, load the model
straight onto the (2, 4) mesh (data across the processes, model inside each), serve the batch,
and process 0 writes the outputs. Usage: ``python -m tests.sharding.multihost_worker ID PORT
MODEL_DIR OUT_JSON``.
"""

import json
import os
import sys


def main(process_id: int, port: int, model_dir: str, out_path: str) -> None:
    import jax

    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)

    import encdec
    from encdec.engine import Engine
    from encdec.sharding import make_mesh
    from tests.sharding.batch import engine_config, requests

    mesh = make_mesh((2, 4))
    assert [{d.process_index for d in row} for row in mesh.devices] == [{0}, {1}]  # a data shard each
    model = encdec.load_pretrained(model_dir, mesh=mesh)
    engine = Engine(model, engine_config("t5", (2, 4)), mesh=mesh)
    outputs = engine.generate([r for r in requests("t5") if r.adapter_id is None])
    if process_id == 0:
        rows = [[(s.token_ids, s.finish_reason) for s in out.sequences] for out in outputs]
        with open(out_path, "w") as f:
            json.dump(rows, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    flags = os.environ.get("XLA_FLAGS", "")
    assert "device_count=4" in flags, f"needs --xla_force_host_platform_device_count=4, got {flags!r}"
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
