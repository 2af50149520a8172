"""Eight CPU devices for this folder's pytest process (``scripts/test.sh`` runs it alone).

The device count is fixed when JAX's backend starts, so the flag is set here, before any test
module touches a device; a process whose backend already started cannot run these tests.
"""

import os

# LLVM at -O0: compiling a decode step takes a third less time, and every engine compared here
# (single device or mesh) is compiled alike in this process.
_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0")
for _flag in _FLAGS:
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from tests.whisper.fixtures import tiny_ct2_dir, tiny_hf_model  # noqa: E402,F401 (fixtures)

MESH_SHAPES = [(1, 8), (2, 4), (8, 1), (1, 1)]
FAMILY_SHAPES = {"t5": MESH_SHAPES, "bart": [(2, 4), (8, 1)], "whisper": [(1, 8), (2, 4)]}
"""Engine runs per family (each compiles its steps; CI time): T5 on every shape, BART and Whisper
on two each, so every shape also runs a second family."""


def pytest_collection_modifyitems(config, items):
    if jax.device_count() < 8:
        reason = f"needs 8 devices, JAX started with {jax.device_count()}: run this folder alone"
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def models(tmp_path_factory, tiny_ct2_dir):  # noqa: F811 (the imported fixture)
    from tests.sharding.runs import models

    return models(tmp_path_factory.mktemp("models"), tiny_ct2_dir)
