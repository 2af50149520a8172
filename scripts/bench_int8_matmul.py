"""Decode-shape matmul candidates on this machine: which one the int8 path should use.

    python scripts/bench_int8_matmul.py [--rows 8 16 32] [--repeats 20] [--shapes t5-small bart-base]

For each decoder weight of a shape (attention ``D x D``, FFN in and out, the LM head) and each
row count, times ``x [M, K] @ w [K, N]`` jitted, best of ``--repeats``:

- ``float32``: XLA's float32 dot;
- ``bfloat16``: bfloat16 weights and activations, float32 accumulation;
- ``int8-weight-only``: int8 weights converted inside the jitted dot, times per-column scales;
- ``int8-dynamic``: activations quantized per row on the fly, int8 x int8 -> int32 dot;
- ``int8-kernel``: the same arithmetic in encdec's AVX-512 VNNI kernel (an XLA custom call,
  :mod:`pallas_kernels.int8_matmul`), the CPU default where it runs;
- ``torch-fbgemm-int8`` (with ``--torch``): PyTorch's dynamic int8 linear (FBGEMM, VNNI
  kernels, prepacked weights), not an encdec path: what a oneDNN/FBGEMM-class kernel behind an
  XLA custom call could reach at these shapes.

Prints microseconds and the weight bytes read per second (GB/s), then the sum over one decode
step's weights (every decoder layer's self q/k/v/o, cross q/o, FFN, and the LM head), beside
the memory floor from :func:`encdec.bench.bandwidth.measure_bandwidth`.
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from encdec.bench.bandwidth import measure_bandwidth
from encdec.models.quant import int8_matmul, quantize_array

SHAPES = {
    # name: (d_model, ffn, vocab, decoder layers, gated FFN)
    "t5-small": (512, 2048, 32128, 6, False),
    "bart-base": (768, 3072, 50265, 6, False),
}


def step_matrices(shape: str) -> list[tuple[str, int, int, int]]:
    """``(name, K, N, count per step)`` of one decode step's weights."""
    D, F, V, L, gated = SHAPES[shape]
    return [
        ("attn D x D (self q,k,v,o; cross q,o)", D, D, 6 * L),
        ("ffn in D x F", D, F, (2 if gated else 1) * L),
        ("ffn out F x D", F, D, L),
        ("lm head D x V", D, V, 1),
    ]


def candidates(K: int, N: int, rng: np.random.Generator):
    w = rng.standard_normal((K, N), np.float32) * 0.05
    q, s = quantize_array(w, 1)
    w32, wbf = jnp.asarray(w), jnp.asarray(w, jnp.bfloat16)
    return {
        "float32": (jax.jit(lambda x, w: jnp.dot(x, w)), w32, 4),
        "bfloat16": (
            jax.jit(lambda x, w: jnp.dot(x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)),
            wbf,
            2,
        ),
        "int8-weight-only": (
            jax.jit(lambda x, w: int8_matmul(x, w[0], w[1], method="weight_only")),
            (q, s),
            1,
        ),
        "int8-dynamic": (jax.jit(lambda x, w: int8_matmul(x, w[0], w[1], method="dynamic")), (q, s), 1),
        "int8-kernel": (jax.jit(lambda x, w: int8_matmul(x, w[0], w[1], method="kernel")), (q, s), 1),
    }


def torch_fbgemm(K: int, N: int, rng: np.random.Generator):
    """PyTorch's dynamic-quantized int8 linear on a ``[K, N]`` weight (timed on torch tensors)."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores this process may use, as XLA
    w = torch.from_numpy(rng.standard_normal((N, K), np.float32) * 0.05)
    q = torch.ao.nn.quantized.dynamic.Linear(K, N, bias_=False, dtype=torch.qint8)
    scale = w.abs().amax(1) / 127
    q.set_weight_bias(
        torch.quantize_per_channel(w, scale, torch.zeros(N, dtype=torch.long), 0, torch.qint8), None
    )

    def fn(x, _w):
        with torch.no_grad():
            return _Done(q(x))

    return fn, None, 1


def torch_input(x: np.ndarray):
    import torch

    return torch.from_numpy(x)


class _Done:
    """A torch result passed through :func:`best_time`'s ``block_until_ready`` (torch is eager)."""

    def __init__(self, value):
        self.value = value

    def block_until_ready(self):
        return self.value


def best_time(fn, x, w, repeats: int) -> float:
    fn(x, w).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x, w).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--torch", action="store_true", help="add PyTorch's FBGEMM int8 linear")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    bw = measure_bandwidth()
    print(
        f"bandwidth: jitted JAX read {bw['jax_read_GBps']:.1f} GB/s, "
        f"numpy copy {bw['numpy_copy_GBps']:.1f} GB/s"
    )
    names = ["float32", "bfloat16", "int8-weight-only", "int8-dynamic", "int8-kernel"] + (
        ["torch-fbgemm-int8"] if args.torch else []
    )
    for shape in args.shapes:
        step = {(m, n): 0.0 for m in args.rows for n in names}
        step_bytes = dict.fromkeys(names, 0)
        print(f"\n{shape}: microseconds per matmul (weight GB/s)")
        print(f"{'matrix':40s} {'M':>3s} " + " ".join(f"{n:>22s}" for n in names))
        for label, K, N, count in step_matrices(shape):
            cands = candidates(K, N, rng)
            if args.torch:
                cands["torch-fbgemm-int8"] = torch_fbgemm(K, N, rng)
            for n in names:
                step_bytes[n] += K * N * cands[n][2] * count
            for M in args.rows:
                x_np = rng.standard_normal((M, K), np.float32)
                x = jnp.asarray(x_np)
                cells = []
                for n in names:
                    fn, w, itemsize = cands[n]
                    x_in = torch_input(x_np) if n == "torch-fbgemm-int8" else x
                    t = best_time(fn, x_in, w, args.repeats)
                    step[(M, n)] += t * count
                    cells.append(f"{t * 1e6:9.0f} ({K * N * itemsize / t / 1e9:5.1f} GB/s)")
                print(f"{label:40s} {M:3d} " + " ".join(f"{c:>22s}" for c in cells))
        print(
            f"{shape}: one decode step's weight matmuls, ms "
            f"(floor = weight bytes / {bw['jax_read_GBps']:.1f} GB/s)"
        )
        for M in args.rows:
            cells = [
                f"{n} {step[(M, n)] * 1e3:.2f} (floor {step_bytes[n] / bw['jax_read_GBps'] / 1e6:.2f})"
                for n in names
            ]
            print(f"  M={M:3d}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
