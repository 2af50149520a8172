"""What an engine reports about itself: :class:`EngineStats` (typed, JSON-serialisable)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

OCCUPANCY_SAMPLES = 16_384
"""Most recent per-dispatch occupancy samples kept: a fixed ring, so a long-running engine's
memory does not grow with the dispatches it has run."""


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """Counters since the last ``reset_stats()``, and the cache and request figures now."""

    dispatches: int
    """Decode dispatches (jitted calls of up to ``steps_per_dispatch`` steps)."""
    decode_steps: int
    encode_batches: int
    early_releases: int
    """Slots handed on when their request's last dispatch was issued (not one dispatch later)."""
    slot_fills: tuple[int, ...]
    """Requests started in each slot."""
    slot_occupancy: tuple[tuple[float, int], ...]
    """``(time.perf_counter(), busy slots)`` at each dispatch (the latest ``OCCUPANCY_SAMPLES``)."""
    mean_busy_slots: float | None
    """Busy slots averaged over time from the first dispatch to the last (None: fewer than two)."""
    self_pages_total: int
    cross_pages_total: int
    self_pages_used: int
    cross_pages_used: int
    """Cross pages held by queued or running requests (idle cached ones: ``cross_idle_pages``)."""
    peak_self_pages: int
    peak_cross_pages: int
    peak_kv_bytes: int
    kv_bytes_total: int
    compiled: dict[str, int]
    """Compiled variants of each jitted step."""
    tracked_requests: int
    """Requests the engine still holds: queued, running, or finished but not yet handed over."""
    queued_requests: int
    running_requests: int
    preemptions: int = 0
    """Requests that gave their pages back to let older ones grow (``kv_allocation="incremental"``)."""
    cross_reuse_lookups: int = 0
    """Admitted requests with an encoder-input key (``cross_kv_reuse``)."""
    cross_reuse_hits: int = 0
    """Of them, those that shared cross pages already written (no encode)."""
    cross_idle_pages: int = 0
    """Cross pages kept after their requests ended, for later requests with the same input."""

    @property
    def cross_reuse_hit_rate(self) -> float | None:
        return self.cross_reuse_hits / self.cross_reuse_lookups if self.cross_reuse_lookups else None

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and dicts, for JSON."""
        out = dataclasses.asdict(self)
        out["slot_fills"] = list(self.slot_fills)
        out["slot_occupancy"] = [list(s) for s in self.slot_occupancy]
        out["cross_reuse_hit_rate"] = self.cross_reuse_hit_rate
        return out


class Counters:
    """The mutable counters behind :class:`EngineStats`."""

    def __init__(self, num_slots: int):
        self.dispatches = 0
        self.decode_steps = 0
        self.encode_batches = 0
        self.early_releases = 0
        self.shared_starts = 0
        self.slot_fills = [0] * num_slots
        self._times = np.zeros(OCCUPANCY_SAMPLES, np.float64)
        self._busy = np.zeros(OCCUPANCY_SAMPLES, np.int32)
        self._first: float | None = None
        self._last: tuple[float, int] | None = None
        self._busy_area = 0.0

    def dispatched(self, now: float, steps: int, busy: int) -> None:
        i = self.dispatches % OCCUPANCY_SAMPLES
        self._times[i], self._busy[i] = now, busy
        self.dispatches += 1
        self.decode_steps += steps
        if self._last is not None:
            self._busy_area += self._last[1] * (now - self._last[0])
        else:
            self._first = now
        self._last = (now, busy)

    def occupancy(self) -> tuple[tuple[float, int], ...]:
        """The kept samples, oldest first."""
        n = min(self.dispatches, OCCUPANCY_SAMPLES)
        order = (np.arange(n) + self.dispatches - n) % OCCUPANCY_SAMPLES
        return tuple(zip(self._times[order].tolist(), self._busy[order].tolist(), strict=True))

    def mean_busy_slots(self) -> float | None:
        if self._first is None or self._last is None or self._last[0] <= self._first:
            return None
        return self._busy_area / (self._last[0] - self._first)
