"""float32 matmul for decode shapes (at most 16 rows): a C++ AVX-512 kernel called by XLA on CPU
(``cpu_kernel.cc``, built on first use by ``build.py``) beside its pure-JAX reference.

Not a Pallas kernel: Pallas has no CPU lowering, so this op's kernel is an XLA FFI custom call;
it keeps the folder's shape (reference, kernel, api).
"""

from pallas_kernels.decode_matmul.api import MAX_ROWS, decode_matmul, kernel_applies, kernel_available
from pallas_kernels.decode_matmul.reference import decode_matmul_reference, pack_panels, unpack_panels

__all__ = [
    "MAX_ROWS",
    "decode_matmul",
    "decode_matmul_reference",
    "kernel_applies",
    "kernel_available",
    "pack_panels",
    "unpack_panels",
]
