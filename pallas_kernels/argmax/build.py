"""The argmax kernel's library (``cpu_kernel.cc``), built and registered by
:mod:`pallas_kernels.cpu_build`; it runs where the CPU has AVX-512."""

from pathlib import Path

from pallas_kernels.cpu_build import CpuKernel

TARGET = "encdec_argmax"
TARGET_NORMALIZER = "encdec_argmax_normalizer"
"""Also each row's maximum and sum of exp(x - max)."""
KERNEL = CpuKernel(
    name="argmax",
    source=Path(__file__).with_name("cpu_kernel.cc"),
    isa_flags=("-mavx512f",),
    cpu_flags=("avx512f",),
    targets=((TARGET, "EncdecArgmax"), (TARGET_NORMALIZER, "EncdecArgmaxNormalizer")),
    fallback="jnp.argmax",
)
cpu_missing, build, register = KERNEL.cpu_missing, KERNEL.build, KERNEL.register
