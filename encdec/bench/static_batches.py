"""Static batching of a trace, as the baselines (HF ``generate``, CTranslate2) serve it."""

from __future__ import annotations

import time
from collections.abc import Callable

from encdec.bench.metrics import SystemRun
from encdec.bench.workloads import Trace

GenerateBatch = Callable[[list[list[int]], int], list[list[int]]]
"""(inputs, length) -> ``length`` greedy tokens per input, EOS banned."""


def run_static_batches(system: str, trace: Trace, num_slots: int, generate_batch: GenerateBatch) -> SystemRun:
    """Static batching: batches of ``num_slots`` in trace order, one at a time.

    A batch starts when its last request has arrived and the previous batch is done; it is
    generated to its longest output length (EOS banned) and every row keeps its own prefix.
    """
    n = len(trace)
    tokens: list[list[int]] = [[] for _ in range(n)]
    latency = [0.0] * n
    t0 = time.perf_counter()
    t_end = t0
    for start in range(0, n, num_slots):
        chunk = trace.requests[start : start + num_slots]
        delay = t0 + max(r.arrival_s for r in chunk) - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        L = max(r.output_len for r in chunk)
        outs = generate_batch([list(r.input_ids) for r in chunk], L)
        t_end = time.perf_counter()
        for k, (r, out) in enumerate(zip(chunk, outs, strict=True)):
            tokens[start + k] = [int(t) for t in out[: r.output_len]]
            latency[start + k] = t_end - (t0 + r.arrival_s)
    return SystemRun(system=system, token_ids=tokens, latency_s=latency, wall_s=t_end - t0)
