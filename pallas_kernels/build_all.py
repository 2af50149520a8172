"""Build every CPU kernel's library now rather than on first use, and say which are ready.

    python -m pallas_kernels.build_all   (scripts/setup.sh runs it)

Two compilers run at a time: on a fresh 2-core machine one after the other took 41 s (the window
attention's many template instances alone 24 s).
"""

import importlib
from concurrent.futures import ThreadPoolExecutor

from pallas_kernels.cpu_build import CpuKernel

# The longest build first: the others take the second compiler meanwhile.
NAMES = ("window_attention", "int8_matmul", "decode_matmul", "argmax", "put_rows")


def _build(kernel: CpuKernel) -> None:
    if kernel.cpu_missing():
        return
    try:
        kernel.build()
    except RuntimeError:
        pass  # register() says why


def main() -> None:
    kernels = [importlib.import_module(f"pallas_kernels.{name}.build").KERNEL for name in NAMES]
    with ThreadPoolExecutor(2) as pool:  # each build is a compiler process
        list(pool.map(_build, kernels))
    for kernel in kernels:
        print(kernel.name, kernel.register() or "CPU kernel ready")


if __name__ == "__main__":
    main()
