"""The window attention kernel's library (``cpu_kernel.cc``), built and registered by
:mod:`pallas_kernels.cpu_build`; it runs where the CPU has AVX-512."""

from pathlib import Path

from pallas_kernels.cpu_build import CpuKernel

TARGET = "encdec_window_attention"
TARGET_BF16 = "encdec_window_attention_bf16"
"""The same kernel over bfloat16 K and V."""
KERNEL = CpuKernel(
    name="window_attention",
    source=Path(__file__).with_name("cpu_kernel.cc"),
    isa_flags=("-mavx512f", "-mavx512bw", "-mavx512vl"),
    cpu_flags=("avx512f", "avx512bw", "avx512vl"),
    targets=((TARGET, "EncdecWindowAttention"), (TARGET_BF16, "EncdecWindowAttentionBf16")),
    fallback="XLA's per-slot loop",
)
cpu_missing, build, register = KERNEL.cpu_missing, KERNEL.build, KERNEL.register
