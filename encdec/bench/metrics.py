"""What a run is scored on: throughput, latency percentiles, KV memory, parity with the reference.

The reference is :func:`encdec.reference_generate` on the same inputs and exact lengths,
computed once per model x workload and held against every system's greedy tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from encdec.bench.workloads import Trace


@dataclasses.dataclass
class SystemRun:
    """What a system returns for one trace; lists are in trace order."""

    system: str
    token_ids: list[list[int]]
    latency_s: list[float]
    """Arrival to last token, per request."""
    wall_s: float
    """First arrival to last completion."""
    ttft_s: list[float] | None = None
    """Arrival to first token, per request, where the system streams."""
    memory: dict[str, Any] = dataclasses.field(default_factory=dict)
    """KV memory figures (see :func:`dense_kv_memory`, the engine's ``stats()``)."""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Further figures a system measures (the engine's decode-step time)."""


def reference_outputs(model, trace: Trace, *, chunk: int = 64, progress: bool = False) -> list[list[int]]:
    """Greedy tokens of ``reference_generate`` for every request, at its exact output length.

    Requests are grouped by output length (longest first) into batches of ``chunk``; a batch runs
    to its longest length with EOS banned throughout, and each row keeps its own prefix: with EOS
    banned, the first ``n`` greedy tokens do not depend on how many more follow.
    """
    from encdec import reference_generate

    order = sorted(range(len(trace)), key=lambda i: -trace.requests[i].output_len)
    out: list[list[int]] = [[] for _ in range(len(trace))]
    batches = [order[i : i + chunk] for i in range(0, len(order), chunk)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"reference {trace.name}", leave=False)
    for idx in batches:
        L = trace.requests[idx[0]].output_len
        gens = reference_generate(
            model, [list(trace.requests[i].input_ids) for i in idx], L, min_new_tokens=L
        )
        for i, g in zip(idx, gens, strict=True):
            out[i] = list(g.token_ids[: trace.requests[i].output_len])
    return out


def teacher_forced_agreement(
    model, inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], *, chunk: int = 16,
    ban_eos: bool = True,
) -> float:
    """Fraction of target positions where ``model``'s greedy choice, fed the target's prefix,
    is the target token: the per-step agreement of a quantized model with the float greedy
    output, free of the cascade that one early flip causes in a free-running comparison.
    ``ban_eos``: EOS is never chosen (as in the bench's references, which ban it)."""
    cfg = model.config
    ban = cfg.eos_token_id if ban_eos else None
    hits = total = 0
    for start in range(0, len(inputs), chunk):
        xs, ys = inputs[start : start + chunk], targets[start : start + chunk]
        S, T = max(len(x) for x in xs), max(len(y) for y in ys)
        ids = np.full((len(xs), S), cfg.pad_token_id, np.int32)
        mask = np.zeros((len(xs), S), bool)
        toks = np.full((len(xs), T), cfg.pad_token_id, np.int32)
        toks[:, 0] = cfg.decoder_start_token_id
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            ids[i, : len(x)], mask[i, : len(x)] = x, True
            toks[i, 1 : len(y)] = y[:-1]
        choice = np.asarray(_greedy_choices()(model.params, cfg, ids, mask, toks, dtype=model.dtype, ban=ban))
        for i, y in enumerate(ys):
            hits += int((choice[i, : len(y)] == np.asarray(y)).sum())
            total += len(y)
    return hits / max(total, 1)


@functools.cache
def _greedy_choices():
    """The greedy token at every position of teacher-forced targets, as one compiled program (op
    by op, a chunk took seconds)."""
    import jax
    import jax.numpy as jnp

    from encdec.models import decode, encode, init_dense_kv

    def choices(params, cfg, ids_BS, mask_BS, tokens_BT, *, dtype, ban):
        B, T = tokens_BT.shape
        enc_BSD = encode(params, cfg, ids_BS, mask_BS, dtype=dtype)
        kv = init_dense_kv(params, cfg, enc_BSD, mask_BS, T, dtype=dtype)
        positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
        logits_BTV, _ = decode(params, cfg, tokens_BT, positions_BT, kv, dtype=dtype)
        logits_BTV = logits_BTV.astype(jnp.float32)
        if ban is not None:
            logits_BTV = logits_BTV.at[..., ban].set(-jnp.inf)
        return jnp.argmax(logits_BTV, axis=-1)

    return jax.jit(choices, static_argnames=("cfg", "dtype", "ban"))


def position_agreement(got: Sequence[Sequence[int]], expected: Sequence[Sequence[int]]) -> float:
    """Fraction of the reference's positions where the free-running output has the same token."""
    hits = sum(sum(a == b for a, b in zip(g, e, strict=False)) for g, e in zip(got, expected, strict=True))
    return hits / max(sum(len(e) for e in expected), 1)


TIE_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}
"""A divergence is a numerical tie when the reference's two logits differ by less than this
fraction of the standard deviation of its logits at that step."""


class TieCheck:
    """Whether a divergence from the reference starts at a near-tie of the reference's logits.

    Random weights give flat next-token distributions, so over thousands of greedy steps two
    logits sometimes agree to 1e-5 and a different summation order picks the other one; every
    later token then differs. At a request's first divergence this recomputes the reference
    logits after the common prefix, unbatched and teacher-forced, and compares the two choices.
    """

    def __init__(self, model, trace: Trace, tolerance: float | None = None):
        self.model, self.trace = model, trace
        dtype = np.dtype(model.dtype).name if model.dtype is not None else "float32"
        self.tolerance = TIE_TOLERANCE.get(dtype, 5e-2) if tolerance is None else tolerance
        self._memo: dict[tuple, dict[str, Any]] = {}

    def next_logits(self, request: int, prefix: Sequence[int]) -> np.ndarray:
        import jax.numpy as jnp

        from encdec.models import decode, encode, init_dense_kv

        m, cfg = self.model, self.model.config
        ids_BS = jnp.asarray([self.trace.requests[request].input_ids], jnp.int32)
        mask_BS = jnp.ones(ids_BS.shape, bool)
        enc_BSD = encode(m.params, cfg, ids_BS, mask_BS, dtype=m.dtype)
        tokens_BT = jnp.asarray([[cfg.decoder_start_token_id, *prefix]], jnp.int32)
        T = tokens_BT.shape[1]
        kv = init_dense_kv(m.params, cfg, enc_BSD, mask_BS, T, dtype=m.dtype)
        positions_BT = jnp.arange(T, dtype=jnp.int32)[None]
        logits_BTV, _ = decode(m.params, cfg, tokens_BT, positions_BT, kv, dtype=m.dtype)
        return np.asarray(logits_BTV[0, -1], np.float32)

    def __call__(self, request: int, prefix: Sequence[int], expected: int, got: int) -> dict[str, Any]:
        key = (request, tuple(prefix), expected, got)
        if key not in self._memo:
            logits_V = self.next_logits(request, prefix)
            gap = float(logits_V[expected] - logits_V[got])
            rel = abs(gap) / max(float(logits_V.std()), 1e-12)
            self._memo[key] = {"logit_gap": gap, "logit_gap_rel": rel, "numerical_tie": rel < self.tolerance}
        return self._memo[key]


def compare_outputs(
    got: Sequence[Sequence[int]], expected: Sequence[Sequence[int]], tie_check: TieCheck | None = None,
    max_tie_checks: int = 32,
) -> dict[str, Any]:
    """Token-for-token comparison with the reference.

    ``outputs_match_reference`` holds when every request matches exactly or (with ``tie_check``)
    first diverges at a numerical tie; ``match_fraction`` counts exact matches only;
    ``first_mismatch`` is the first real mismatch, else the first tie divergence.
    """
    if len(got) != len(expected):
        raise ValueError(f"{len(got)} outputs for {len(expected)} reference outputs")
    exact = [list(g) == list(e) for g, e in zip(got, expected, strict=True)]
    ties, checks, first_real, first_tie = 0, 0, None, None
    for i, ok in enumerate(exact):
        if ok:
            continue
        g, e = list(got[i]), list(expected[i])
        pos = next((k for k, (a, b) in enumerate(zip(g, e, strict=False)) if a != b), min(len(g), len(e)))
        info: dict[str, Any] = {
            "request": i, "position": pos, "expected": e[max(0, pos - 2) : pos + 6],
            "got": g[max(0, pos - 2) : pos + 6], "expected_len": len(e), "got_len": len(g),
        }
        if tie_check is not None and checks < max_tie_checks and pos < min(len(g), len(e)):
            checks += 1
            info.update(tie_check(i, e[:pos], e[pos], g[pos]))
        if info.get("numerical_tie"):
            ties += 1
            first_tie = first_tie or info
        elif first_real is None:
            first_real = info
    return {
        "outputs_match_reference": first_real is None,
        "match_fraction": float(np.mean(exact)) if exact else 1.0,
        "token_agreement": position_agreement(got, expected),
        "tie_divergences": ties,
        "first_mismatch": first_real or first_tie,
    }


def _pct(x: Sequence[float] | None, q: float) -> float | None:
    if not x:
        return None
    return float(np.percentile(np.asarray(x, np.float64), q))


def summarize(
    run: SystemRun,
    trace: Trace,
    reference: Sequence[Sequence[int]] | None,
    tie_check: TieCheck | None = None,
    max_tie_checks: int = 32,
) -> dict[str, Any]:
    """The scalar metrics of one run (plus per-request latencies for CDF plots)."""
    tokens = sum(len(t) for t in run.token_ids)
    lengths_ok = all(len(t) == r.output_len for t, r in zip(run.token_ids, trace.requests, strict=True))
    row: dict[str, Any] = {
        "system": run.system,
        "num_requests": len(trace),
        "output_tokens": tokens,
        "lengths_exact": lengths_ok,
        "wall_s": run.wall_s,
        "output_tokens_per_s": tokens / run.wall_s if run.wall_s > 0 else None,
        "requests_per_s": len(trace) / run.wall_s if run.wall_s > 0 else None,
        "p50_latency_s": _pct(run.latency_s, 50),
        "p99_latency_s": _pct(run.latency_s, 99),
        "mean_latency_s": float(np.mean(run.latency_s)),
        "ttft_p50_s": _pct(run.ttft_s, 50),
        "ttft_p99_s": _pct(run.ttft_s, 99),
    }
    if reference is not None:
        row.update(compare_outputs(run.token_ids, reference, tie_check, max_tie_checks))
    else:
        keys = ("outputs_match_reference", "match_fraction", "token_agreement", "tie_divergences")
        for k in (*keys, "first_mismatch"):
            row[k] = None
    for k in ("peak_kv_bytes", "kv_bytes_total", "kv_utilization", "slot_occupancy", "compiled"):
        row[k] = run.memory.get(k)
    row["kv_estimated"] = bool(run.memory.get("estimated", False))
    row.update(run.extra)
    row["latencies_s"] = [float(x) for x in run.latency_s]
    return row


def kv_bytes_per_token(model_config, dtype_bytes: int) -> tuple[int, int]:
    """Bytes of K+V per token over all decoder layers: (self-attention, cross-attention)."""
    per_layer = 2 * model_config.decoder_heads * model_config.head_dim * dtype_bytes
    return per_layer * model_config.decoder_layers, per_layer * model_config.decoder_layers


def dense_kv_memory(
    model_config, dtype_bytes: int, batches: Sequence[Sequence[tuple[int, int]]]
) -> dict[str, Any]:
    """KV memory of a dense padded cache (HF ``generate``), estimated from the batches it ran.

    ``batches`` holds ``(input_len, output_len)`` per row. A batch holds ``B x S_max`` cross
    and ``B x L_max`` self entries; utilization is the fraction of them that are real tokens,
    at the batch with the largest cache.
    """
    self_b, cross_b = kv_bytes_per_token(model_config, dtype_bytes)
    peak, util = 0, None
    for rows in batches:
        S, L = max(s for s, _ in rows), max(n for _, n in rows)
        allocated = len(rows) * (S * cross_b + L * self_b)
        used = sum(s * cross_b + n * self_b for s, n in rows)
        if allocated > peak:
            peak, util = allocated, used / allocated
    return {"peak_kv_bytes": peak, "kv_bytes_total": peak, "kv_utilization": util, "estimated": True}


def engine_memory(stats: Any, num_slots: int) -> dict[str, Any]:
    """KV figures from ``Engine.stats()`` (an ``EngineStats``): peak bytes in use, pool bytes,
    their ratio, and the time-weighted mean fraction of slots busy between dispatches."""
    peak, total = stats.peak_kv_bytes, stats.kv_bytes_total
    busy = stats.mean_busy_slots
    if busy is None and stats.slot_occupancy:  # one dispatch: its own occupancy
        busy = float(stats.slot_occupancy[0][1])
    return {
        "peak_kv_bytes": peak,
        "kv_bytes_total": total,
        "kv_utilization": peak / total if total else None,
        "slot_occupancy": None if busy is None else busy / num_slots,
    }
