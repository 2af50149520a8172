"""``python -m pallas_kernels.build_all`` (run by scripts/setup.sh) covers every CPU kernel."""

from pathlib import Path

from pallas_kernels import build_all


def test_every_kernel_with_a_cpu_library_is_built_by_setup():
    root = Path(build_all.__file__).parent
    have = {p.parent.name for p in root.glob("*/build.py")}
    assert set(build_all.NAMES) == have and len(build_all.NAMES) == len(have)
