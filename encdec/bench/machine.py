"""The machine a benchmark ran on: CPU, cores, JAX device and library versions."""

from __future__ import annotations

import os
import platform
from typing import Any


def machine_info() -> dict[str, Any]:
    """CPU model, cores, the JAX device kind and library versions."""
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    devices = jax.devices()
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax_backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "versions": {"jax": jax.__version__},
        "int8_products": int8_products(),
    }
    for mod in ("torch", "transformers", "ctranslate2"):
        try:
            info["versions"][mod] = __import__(mod).__version__
        except ImportError:
            pass
    try:
        import torch

        if torch.cuda.is_available():
            info["torch_cuda_device"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def int8_products() -> str:
    """What an int8 decode product multiplies with here: ``AMX`` tiles, ``VPDPBUSD`` (AVX-512
    VNNI; at 8 rows it is compute-bound near the read bandwidth, so an int8 step sits further from
    its floor than with AMX), or ``XLA`` (no CPU kernel). Virtual machines of one CPU model differ:
    some hide AMX from /proc/cpuinfo, and the kernel then takes VPDPBUSD."""
    import jax

    from pallas_kernels.int8_matmul import kernel_available, uses_amx

    if jax.default_backend() != "cpu" or not kernel_available():
        return "XLA"
    return "AMX" if uses_amx() else "VPDPBUSD"


def cpu_threads(n: int) -> int:
    """``n`` threads, or every core for 0."""
    return n or os.cpu_count() or 1
