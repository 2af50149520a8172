"""The int8 kernel's library (``cpu_kernel.cc``), built and registered by
:mod:`pallas_kernels.cpu_build`; it runs where the CPU has AVX-512 VNNI."""

from pathlib import Path

from pallas_kernels.cpu_build import CpuKernel

TARGET = "encdec_int8_matmul"
KERNEL = CpuKernel(
    name="int8_matmul",
    source=Path(__file__).with_name("cpu_kernel.cc"),
    # No fused multiply-adds the source does not write: the stores round (acc * scales), then
    # add the bias, the bits of an add after the call (a one-ulp difference flips later rows'
    # int8 rounding, and int8 models then decode differently).
    isa_flags=("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-ffp-contract=off"),
    cpu_flags=("avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
    targets=((TARGET, "EncdecInt8Matmul"),),
    fallback="XLA's int8 dot",
)
cpu_missing, build, register = KERNEL.cpu_missing, KERNEL.build, KERNEL.register
