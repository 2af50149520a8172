"""How fast the float32 decode kernel reads a weight, by activation rows, beside the bandwidth probe.

    python scripts/stream_rows.py [--rows 1 4 8] [--repeats 9] [--sizes 16 64 128 256]

Two tables:

- ``stream``: one ``512 x N`` weight of 256 MiB, packed as panels and read once per call, so
  every byte comes from memory; beside it the probe (:func:`encdec.bench.bandwidth.measure_bandwidth`)
  over the same bytes. The rows are the decode slots: every weight is multiplied by each row.
- ``probe``: the probe's rate by read size: below the L3 share a process gets, reads run faster
  than the floor's (the bench probes 256 MiB).

All rates are weight bytes (or probe bytes) per second, 1e9 bytes, fastest of ``--repeats``.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from encdec.bench.bandwidth import fastest_s, measure_bandwidth
from encdec.models.huge_pages import to_huge_pages
from pallas_kernels.decode_matmul import decode_matmul, kernel_available
from pallas_kernels.decode_matmul.reference import pack_panels

K = 512


def stream_GBps(rows: int, w, N: int, repeats: int) -> float:
    x = jnp.asarray(np.random.default_rng(rows).standard_normal((rows, K)), jnp.float32)
    f = jax.jit(lambda x, w: decode_matmul(x, w, w_layout="panels", n=N, implementation="kernel"))
    return K * N * 4 / fastest_s(lambda: f(x, w).block_until_ready(), repeats) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 128, 256], help="probe reads, MiB")
    args = ap.parse_args()
    if not kernel_available():
        raise SystemExit("the float32 decode kernel does not run here (it needs AVX-512 and a C++ compiler)")
    N = (256 << 20) // (4 * K)
    w_KN = jax.random.normal(jax.random.key(0), (K, N), jnp.float32)
    (w,) = to_huge_pages([pack_panels(w_KN)])
    del w_KN
    print("| rows | stream GB/s | probe GB/s | stream / probe |")
    print("|---|---|---|---|")
    for rows in args.rows:
        got = stream_GBps(rows, w, N, args.repeats)
        probe = measure_bandwidth(256 << 20, args.repeats, numpy_copy=False)["jax_read_GBps"]
        print(f"| {rows} | {got:.1f} | {probe:.1f} | {got / probe:.2f} |")
    print("\n| probe MiB | GB/s |\n|---|---|")
    for mib in args.sizes:
        probe = measure_bandwidth(mib << 20, args.repeats, numpy_copy=False)["jax_read_GBps"]
        print(f"| {mib} | {probe:.1f} |")


if __name__ == "__main__":
    main()
