"""Seeded synthetic request traces: arrival times, random input ids and exact output lengths.

Every request's output length is exact: systems are run with ``min_new_tokens = max_new_tokens``
(EOS banned until then), so all of them generate the same number of tokens and a trace's work is
fixed by its seed. Lengths, token ids and arrivals come from independent streams of one seed, so
changing the arrival process does not change the requests.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from encdec.bench.config import LengthDist, WorkloadConfig

PROFILES: dict[str, tuple[LengthDist, LengthDist]] = {
    # (input length, output length)
    "translation": (LengthDist("uniform", low=8, high=64), LengthDist("uniform", low=8, high=64)),
    "summarization": (LengthDist("uniform", low=256, high=512), LengthDist("uniform", low=32, high=128)),
    "mixed": (LengthDist("uniform", low=16, high=256), LengthDist("loguniform", low=4, high=256)),
}
"""Named profiles: short in / short out, long in / short out, and a wide spread of output lengths."""


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    """One request of a trace."""

    index: int
    """Position in the trace (results are reported in this order)."""
    input_ids: tuple[int, ...]
    output_len: int
    """Exact number of tokens to generate."""
    arrival_s: float
    """Seconds after the start of the run at which the request arrives."""


@dataclasses.dataclass(frozen=True)
class Trace:
    """A workload's requests, in arrival order."""

    name: str
    requests: tuple[TraceRequest, ...]
    arrival: str = "all-at-once"
    num_beams: int = 1
    """Beam width every system decodes with (1: greedy)."""

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def all_at_once(self) -> bool:
        return all(r.arrival_s == 0.0 for r in self.requests)

    @property
    def output_tokens(self) -> int:
        return sum(r.output_len for r in self.requests)

    @property
    def max_input_len(self) -> int:
        return max(len(r.input_ids) for r in self.requests)

    @property
    def max_output_len(self) -> int:
        return max(r.output_len for r in self.requests)

    def head(self, n: int) -> Trace:
        """The first ``n`` requests."""
        return dataclasses.replace(self, name=f"{self.name}-head{n}", requests=self.requests[:n])

    def capped(self, max_output_len: int) -> Trace:
        """Every request, arriving at once, outputs capped: a cheap warm-up that still sees
        every input length (so every encoder bucket compiles)."""
        reqs = tuple(
            dataclasses.replace(r, output_len=min(r.output_len, max_output_len), arrival_s=0.0)
            for r in self.requests
        )
        name = f"{self.name}-capped{max_output_len}"
        return dataclasses.replace(self, name=name, requests=reqs, arrival="all-at-once")

    def without_arrivals(self) -> Trace:
        reqs = tuple(dataclasses.replace(r, arrival_s=0.0) for r in self.requests)
        return dataclasses.replace(self, requests=reqs, arrival="all-at-once")

    def engine_slots(self, num_slots: int) -> int:
        """Engine slots holding as many sequences as a static batch of ``num_slots`` requests."""
        return num_slots * self.num_beams

    def summary(self) -> dict[str, Any]:
        ins = np.array([len(r.input_ids) for r in self.requests])
        outs = np.array([r.output_len for r in self.requests])
        return {
            "name": self.name,
            "num_requests": len(self),
            "arrival": self.arrival,
            "last_arrival_s": float(max(r.arrival_s for r in self.requests)),
            "input_len": _stats(ins),
            "output_len": _stats(outs),
            "output_tokens": int(outs.sum()),
            "num_beams": self.num_beams,
        }


def _stats(x: np.ndarray) -> dict[str, float]:
    return {"min": int(x.min()), "mean": float(x.mean()), "p50": float(np.median(x)), "max": int(x.max())}


def resolve_lengths(cfg: WorkloadConfig) -> tuple[LengthDist, LengthDist]:
    """Input and output length distributions: the profile's, with explicit ones taking precedence."""
    base_in, base_out = PROFILES[cfg.profile] if cfg.profile else (None, None)
    return cfg.input_len or base_in, cfg.output_len or base_out


def sample_lengths(dist: LengthDist, n: int, rng: np.random.Generator) -> np.ndarray:
    if dist.kind == "fixed":
        return np.full(n, dist.value, np.int64)
    if dist.kind == "uniform":
        return rng.integers(dist.low, dist.high + 1, n)
    log_x = rng.uniform(np.log(dist.low), np.log(dist.high + 1), n)
    return np.clip(np.floor(np.exp(log_x)), dist.low, dist.high).astype(np.int64)


def make_trace(cfg: WorkloadConfig, token_range: tuple[int, int], max_input_len: int | None = None) -> Trace:
    """The trace of a workload for a vocabulary whose ordinary tokens are ``[low, high)``.

    ``max_input_len`` caps input lengths (a model with learned positions has a limit).
    """
    low, high = token_range
    if not 0 <= low < high:
        raise ValueError(f"token range [{low}, {high}) is empty")
    in_dist, out_dist = resolve_lengths(cfg)
    len_rng, ids_rng, arr_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(3))
    n = cfg.num_requests
    in_lens = sample_lengths(in_dist, n, len_rng)
    out_lens = sample_lengths(out_dist, n, len_rng)
    if max_input_len is not None:
        in_lens = np.minimum(in_lens, max_input_len)
    if cfg.arrival == "poisson":
        gaps = arr_rng.exponential(1.0 / cfg.rate, n)
        arrivals = np.concatenate([[0.0], np.cumsum(gaps[1:])])
    else:
        arrivals = np.zeros(n)
    requests = tuple(
        TraceRequest(
            index=i,
            input_ids=tuple(int(t) for t in ids_rng.integers(low, high, int(in_lens[i]))),
            output_len=int(out_lens[i]),
            arrival_s=float(arrivals[i]),
        )
        for i in range(n)
    )
    return Trace(cfg.name, requests, cfg.arrival, cfg.num_beams)
