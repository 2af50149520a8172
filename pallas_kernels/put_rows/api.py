"""``put_rows``: decode's new K/V rows, in place through the CPU kernel, else XLA's scatter."""

import jax

from pallas_kernels.cpu_build import unpartitioned
from pallas_kernels.put_rows.build import TARGET, register
from pallas_kernels.put_rows.reference import put_rows_reference

IMPLEMENTATIONS = ("auto", "kernel", "xla")


def kernel_available() -> bool:
    """Whether the CPU kernel is built and registered (it is built on the first call)."""
    return register() is None


def put_rows(
    dst_ANCH: jax.Array, rows_BNH: jax.Array, a_B: jax.Array, c_B: jax.Array, *, implementation: str = "auto"
) -> jax.Array:
    """:func:`~pallas_kernels.put_rows.reference.put_rows_reference` (``dst`` ``[A, N, C..., H]``,
    ``c`` over its middle axes flattened; rows that miss ``dst`` dropped) through the CPU kernel
    (``"kernel"``), which writes into ``dst``'s buffer where XLA lets it (a donated or
    loop-carried cache that nothing reads between two writes), XLA's scatter (``"xla"``), or the
    kernel on a CPU backend outside a partitioned mesh (``"auto"``)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; known: {', '.join(IMPLEMENTATIONS)}")
    if dst_ANCH.ndim < 4:
        raise ValueError(f"put_rows: dst must be [A, N, C..., H], not {tuple(dst_ANCH.shape)}")
    N, H = dst_ANCH.shape[1], dst_ANCH.shape[-1]
    B = rows_BNH.shape[0] if rows_BNH.ndim else 0
    if rows_BNH.shape != (B, N, H) or a_B.shape != (B,) or c_B.shape != (B,):
        raise ValueError(
            f"put_rows: rows {tuple(rows_BNH.shape)}, a {tuple(a_B.shape)} and c {tuple(c_B.shape)} "
            f"do not fit dst [A, N, C..., H] = {tuple(dst_ANCH.shape)} (want [B, {N}, {H}], [B], [B])"
        )
    if implementation == "auto":
        on_cpu = jax.default_backend() == "cpu"
        implementation = "kernel" if on_cpu and unpartitioned() and kernel_available() else "xla"
    if implementation == "xla":
        return put_rows_reference(dst_ANCH, rows_BNH, a_B, c_B)
    why = register()
    if why is not None:
        raise RuntimeError(f"the row writer CPU kernel cannot run: {why}")
    call = jax.ffi.ffi_call(
        TARGET, jax.ShapeDtypeStruct(dst_ANCH.shape, dst_ANCH.dtype), input_output_aliases={0: 0},
        vmap_method="sequential",
    )
    return call(dst_ANCH, rows_BNH.astype(dst_ANCH.dtype), a_B.astype("int32"), c_B.astype("int32"))
