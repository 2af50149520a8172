"""``GET /metrics``: the server's figures in Prometheus' text format (``prometheus_client``).

Gauges and counters are read at scrape time from the engine loop's latest
:class:`~encdec.engine.async_engine.LoadSnapshot` (never waiting for the loop); the latency and
time-to-first-token histograms are fed by the loop's ``on_finish`` hook from every request's
engine timings (``arrival`` to ``done`` and to ``first_token``). Each server has its own
registry, so several servers in one process do not share figures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from encdec.engine import RequestOutput
from encdec.engine.async_engine import LoadSnapshot

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)


class _EngineCollector(Collector):
    def __init__(self, snapshot: Callable[[], LoadSnapshot | None]):
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        if s is None:
            return
        yield GaugeMetricFamily("encdec_engine_alive", "1 while the engine loop runs", value=int(s.alive))
        yield GaugeMetricFamily(
            "encdec_queue_depth", "Requests waiting in the engine for a slot", value=s.queued
        )
        yield GaugeMetricFamily(
            "encdec_pending_requests", "Requests between submit and their last token", value=s.pending
        )
        yield GaugeMetricFamily("encdec_busy_slots", "Decode slots holding a request", value=s.busy_slots)
        yield GaugeMetricFamily("encdec_slots", "Decode slots", value=s.num_slots)
        used = GaugeMetricFamily("encdec_kv_pages_in_use", "KV cache pages held by requests", labels=["pool"])
        used.add_metric(["self"], s.self_pages_used)
        used.add_metric(["cross"], s.cross_pages_used)
        yield used
        yield GaugeMetricFamily(
            "encdec_kv_cross_pages_cached",
            "Cross pages kept after their requests ended, for requests with the same input",
            value=s.cross_pages_cached,
        )
        total = GaugeMetricFamily("encdec_kv_pages", "KV cache pages in each pool", labels=["pool"])
        total.add_metric(["self"], s.self_pages_total)
        total.add_metric(["cross"], s.cross_pages_total)
        yield total
        yield CounterMetricFamily("encdec_generated_tokens", "Tokens generated", value=s.tokens_generated)
        finished = CounterMetricFamily("encdec_requests_finished", "Requests ended", labels=["finish_reason"])
        for reason in ("stop", "length", "cancelled", "error"):
            finished.add_metric([reason], s.finished.get(reason, 0))
        yield finished


class ServerMetrics:
    """One server's registry; :meth:`observe` is the engine's ``on_finish`` hook."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "encdec_request_latency_seconds",
            "Arrival to last token of requests that ran to their end",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "encdec_time_to_first_token_seconds",
            "Arrival to first token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._snapshot: Callable[[], LoadSnapshot] | None = None
        self.registry.register(_EngineCollector(lambda: None if self._snapshot is None else self._snapshot()))

    def watch(self, snapshot: Callable[[], LoadSnapshot]) -> None:
        """Read the engine's figures from ``snapshot`` (``AsyncEngine.snapshot``)."""
        self._snapshot = snapshot

    def observe(self, output: RequestOutput) -> None:
        t = output.timings
        if "arrival" not in t:
            return
        if "first_token" in t:
            self.ttft.observe(t["first_token"] - t["arrival"])
        if output.finish_reason in ("stop", "length") and "done" in t:
            self.latency.observe(t["done"] - t["arrival"])

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
