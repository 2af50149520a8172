"""Benchmark paged decode attention: Pallas kernel vs the XLA gather reference.

``python -m pallas_kernels.bench [--quick] [--out FILE.json]``. On a GPU it times T5-base
(N=12) and BART-large (N=16) decoder shapes, bf16, page size 16, for cross-attention (no bias)
and T5 self-attention (fused bias), then a few tilings of two shapes. ``--quick`` runs tiny
shapes with the kernel in interpret mode, so it finishes on CPU in seconds. A config that fails
is reported and skipped; rows print as they finish, so a cut-short run still reports.
"""

import argparse
import dataclasses
import json
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.paged_attention import PagedAttentionBlock, paged_attention
from pallas_kernels.paged_attention.api import default_block


@dataclasses.dataclass(frozen=True)
class BenchCase:
    """One timed shape; every slot holds ``length`` keys."""

    name: str
    """Model whose decoder shapes these are."""
    kind: str
    """``cross`` (no bias) or ``self`` (T5 bias fused)."""
    B: int
    """Slots."""
    N: int
    """Heads."""
    H: int
    """Head dim."""
    length: int
    """Keys per slot (also the page table's capacity)."""
    G: int = 16
    """Tokens per page."""
    block: PagedAttentionBlock | None = None
    """Tiling override; None = ``default_block``."""


def full_cases() -> list[BenchCase]:
    cases = []
    for name, N in (("t5-base", 12), ("bart-large", 16)):
        for B in (64, 256):
            for length in (128, 256, 512, 1024):
                cases.append(BenchCase(name, "cross", B, N, 64, length))
    for B in (64, 256):
        cases.append(BenchCase("t5-base", "self", B, 12, 64, 256))
    return cases


def sweep_cases() -> list[BenchCase]:
    """Tilings of one many-slot and one few-slot long-context shape, the default first."""
    cases = []
    for name, B, N in (("bart-large", 64, 16), ("t5-base", 8, 12)):
        base = default_block(B, N, 64, 1024 // 16, 16)
        blocks = [base]
        for ppb, splits, warps in ((4, None, 4), (8, None, 8), (16, None, 8), (8, 1, 4), (8, 8, 4)):
            splits = base.num_splits if splits is None else splits
            block = PagedAttentionBlock(pages_per_block=ppb, num_splits=splits, num_warps=warps)
            if block not in blocks:
                blocks.append(block)
        cases += [BenchCase(name, "cross", B, N, 64, 1024, block=block) for block in blocks]
    return cases


def quick_cases() -> list[BenchCase]:
    return [
        BenchCase("tiny", "cross", 2, 2, 16, 32, G=8),
        BenchCase("tiny", "cross", 4, 2, 16, 64, G=8),
        BenchCase("tiny", "self", 4, 2, 16, 64, G=8),
    ]


def make_inputs(case: BenchCase, dtype, seed: int = 0):
    """Pool with one spare sentinel page, shuffled page table, all slots at ``case.length``."""
    M = -(-case.length // case.G)
    P = case.B * M + 1
    key_q, key_k, key_v, key_b = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(key_q, (case.B, case.N, case.H), dtype)
    k_pool = jax.random.normal(key_k, (case.N, P, case.G, case.H), dtype)
    v_pool = jax.random.normal(key_v, (case.N, P, case.G, case.H), dtype)
    ids = np.random.default_rng(seed).permutation(np.arange(1, P)).reshape(case.B, M)
    table = jnp.asarray(ids, jnp.int32)
    lengths = jnp.full((case.B,), case.length, jnp.int32)
    bias = jax.random.normal(key_b, (case.N, 32), jnp.float32) if case.kind == "self" else None
    return q, k_pool, v_pool, table, lengths, bias


def time_call(fn, args, iters: int) -> float:
    """Median seconds per call after a compile and two warm-up calls."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_case(case: BenchCase, *, dtype, interpret: bool, iters: int) -> dict:
    q, k_pool, v_pool, table, lengths, bias = make_inputs(case, dtype)
    scale = 1.0 if case.kind == "self" else case.H**-0.5

    def attend(implementation):
        return jax.jit(
            lambda *a: paged_attention(
                *a[:5],
                bias_NR=a[5],
                scale=scale,
                implementation=implementation,
                block=case.block,
                interpret=interpret and implementation == "pallas",
            )
        )

    args = (q, k_pool, v_pool, table, lengths, bias)
    block = case.block or default_block(case.B, case.N, case.H, table.shape[1], case.G)
    row = {**dataclasses.asdict(case), "block": dataclasses.asdict(block), "dtype": jnp.dtype(dtype).name}
    kv_bytes = int(np.sum(np.asarray(lengths))) * case.N * case.H * 2 * jnp.dtype(dtype).itemsize
    row["kv_bytes"] = kv_bytes
    xla, pallas = attend("xla"), attend("pallas")
    out_xla = np.asarray(xla(*args), np.float32)
    out_pallas = np.asarray(pallas(*args), np.float32)
    row["max_abs_err"] = float(np.max(np.abs(out_pallas - out_xla)))
    for label, fn in (("xla", xla), ("pallas", pallas)):
        seconds = time_call(fn, args, iters)
        row[f"{label}_us"] = seconds * 1e6
        row[f"{label}_gbps"] = kv_bytes / seconds / 1e9
    row["speedup"] = row["xla_us"] / row["pallas_us"]
    return row


HEADER = (
    "| model | attn | B | N | len | block_k | splits | warps | xla µs | pallas µs | xla GB/s "
    "| pallas GB/s | xla/pallas | max abs err |"
)


def format_row(row: dict) -> str:
    if "error" in row:
        head = f"| {row['name']} | {row['kind']} | {row['B']} | {row['N']} | {row['length']} "
        return head + f"| ERROR: {row['error']} |"
    blk = row["block"]
    return (
        f"| {row['name']} | {row['kind']} | {row['B']} | {row['N']} | {row['length']} "
        f"| {blk['pages_per_block'] * row['G']} | {blk['num_splits']} | {blk['num_warps']} "
        f"| {row['xla_us']:.1f} | {row['pallas_us']:.1f} | {row['xla_gbps']:.3g} | {row['pallas_gbps']:.3g} "
        f"| {row['speedup']:.2f} | {row['max_abs_err']:.2e} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, kernel in interpret mode (CPU)")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--no-sweep", action="store_true", help="skip the tiling sweep")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per config")
    parser.add_argument("--max-seconds", type=float, default=150.0, help="skip configs after this long")
    args = parser.parse_args(argv)

    on_gpu = jax.default_backend() == "gpu"
    if not args.quick and not on_gpu:
        print("no GPU: running --quick instead", file=sys.stderr)
        args.quick = True
    if args.quick:
        cases, dtype, interpret, iters = quick_cases(), jnp.float32, True, args.iters or 3
    else:
        cases = full_cases() + ([] if args.no_sweep else sweep_cases())
        dtype, interpret, iters = jnp.bfloat16, False, args.iters or 20
    device = jax.devices()[0]
    print(
        f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, {jnp.dtype(dtype)}"
    )
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    rows, start = [], time.perf_counter()
    for case in cases:
        if time.perf_counter() - start > args.max_seconds:
            print(f"stopped after {args.max_seconds:.0f} s; {len(cases) - len(rows)} configs skipped")
            break
        try:
            row = bench_case(case, dtype=dtype, interpret=interpret, iters=iters)
        except Exception as e:  # noqa: BLE001 - report every failing config, keep going
            row = {**dataclasses.asdict(case), "error": f"{type(e).__name__}: {str(e)[:300]}"}
            traceback.print_exc(limit=3)
        rows.append(row)
        print(format_row(row), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"device": device.device_kind, "jax": jax.__version__, "rows": rows}, f, indent=1)
    print(f"total {time.perf_counter() - start:.1f} s")
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
