"""Decode attention over the engine's slot window on CPU: a C++ AVX-512 kernel called by XLA
(``cpu_kernel.cc``, built on first use by ``build.py``) beside its pure-JAX reference.

Not a Pallas kernel: Pallas has no CPU lowering, so this op's kernel is an XLA FFI custom call;
it keeps the folder's shape (reference, kernel, api).
"""

from pallas_kernels.window_attention.api import kernel_applies, kernel_available, window_attention
from pallas_kernels.window_attention.reference import distance_bias_NK, window_attention_reference

__all__ = [
    "distance_bias_NK",
    "kernel_applies",
    "kernel_available",
    "window_attention",
    "window_attention_reference",
]
