"""The row writer's library (``cpu_kernel.cc``), built and registered by
:mod:`pallas_kernels.cpu_build`; plain C++ (no vector intrinsics), it builds wherever a C++ compiler does."""

from pathlib import Path

from pallas_kernels.cpu_build import CpuKernel

TARGET = "encdec_put_rows"
KERNEL = CpuKernel(
    name="put_rows",
    source=Path(__file__).with_name("cpu_kernel.cc"),
    isa_flags=(),
    cpu_flags=(),
    targets=((TARGET, "EncdecPutRows"),),
    fallback="XLA's scatter",
)
cpu_missing, build, register = KERNEL.cpu_missing, KERNEL.build, KERNEL.register
