"""The float32 decode matmul's library (``cpu_kernel.cc``), built and registered by
:mod:`pallas_kernels.cpu_build`; it runs where the CPU has AVX-512."""

from pathlib import Path

from pallas_kernels.cpu_build import CpuKernel

TARGET = "encdec_decode_matmul"
KERNEL = CpuKernel(
    name="decode_matmul",
    source=Path(__file__).with_name("cpu_kernel.cc"),
    isa_flags=("-mavx512f", "-mavx512dq"),
    cpu_flags=("avx512f", "avx512dq"),
    targets=((TARGET, "EncdecDecodeMatmul"),),
    fallback="XLA's dot",
)
cpu_missing, build, register = KERNEL.cpu_missing, KERNEL.build, KERNEL.register
