"""int8 x int8 matmul for decode shapes: a C++ AVX-512 VNNI kernel called by XLA on CPU
(``cpu_kernel.cc``, built on first use by ``build.py``) beside its pure-JAX reference.

Not a Pallas kernel: Pallas has no CPU lowering that reaches VNNI, so this op's kernel is an
XLA FFI custom call; it keeps the folder's shape (reference, kernel, api).
"""

from pallas_kernels.int8_matmul.api import int8_matmul, kernel_available, uses_amx
from pallas_kernels.int8_matmul.reference import (
    int8_matmul_reference,
    pack_tiles,
    quantize_rows,
    unpack_tiles,
)

__all__ = [
    "int8_matmul",
    "int8_matmul_reference",
    "kernel_available",
    "pack_tiles",
    "quantize_rows",
    "unpack_tiles",
    "uses_amx",
]
