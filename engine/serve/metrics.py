"""What the engine counts: requests by outcome, batches by stage and size, stage latencies.

`Stats` keeps the counts in memory (the engine always has one: `Engine.stats`); `PrometheusRecorder`
exports the same events with `prometheus_client` (the `serve` extra) for `GET /metrics`. A recorder is any
object with these four methods; the engine calls them from its threads and ignores their errors.
"""
from __future__ import annotations

import threading
from collections import Counter

# Seconds per stage batch: the toy model's stages take 10 ms - 3 s on a CPU, Karlo's up to minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Exact counts up to 16 images per batch (what a load test reads back), coarser beyond.
BATCH_BUCKETS = tuple(range(1, 17)) + (24, 32, 48, 64, 128)


class Stats:
    """In-memory counts (thread-safe): `snapshot()` gives a JSON-able dict."""

    def __init__(self):
        self._lock = threading.Lock()
        self.submitted = 0
        self.rejected: Counter = Counter()
        self.done: Counter = Counter()
        self.batch_sizes: dict[str, Counter] = {}
        self.stage_seconds: dict[str, float] = {}

    def on_submit(self) -> None:
        with self._lock:
            self.submitted += 1

    def on_reject(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] += 1

    def on_done(self, status: str, seconds: float) -> None:
        with self._lock:
            self.done[status] += 1

    def on_batch(self, stage: str, rows: int, requests: int, seconds: float) -> None:
        with self._lock:
            self.batch_sizes.setdefault(stage, Counter())[rows] += 1
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds

    def snapshot(self) -> dict:
        with self._lock:
            return {"submitted": self.submitted, "rejected": dict(self.rejected), "done": dict(self.done),
                    "batch_sizes": {s: {str(k): v for k, v in sorted(c.items())} for s, c in self.batch_sizes.items()},
                    "stage_seconds": dict(self.stage_seconds)}


class PrometheusRecorder:
    """The engine's events as Prometheus metrics in `registry` (a fresh one by default), plus gauges for
    the queue depth and the requests in progress."""

    def __init__(self, engine, registry=None):
        from prometheus_client import CollectorRegistry, Counter as PCounter, Gauge, Histogram
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = PCounter("unclip_requests", "Requests finished, by outcome", ["status"], registry=r)
        self.rejected = PCounter("unclip_rejected", "Requests refused at submission, by reason", ["reason"],
                                 registry=r)
        self.latency = Histogram("unclip_request_seconds", "Request latency (queue wait included)", ["status"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("unclip_batch_size", "Images per stage batch", ["stage"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.stage_latency = Histogram("unclip_stage_seconds", "Seconds per stage batch", ["stage"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        queue = Gauge("unclip_queue_depth", "Requests waiting to start", registry=r)
        queue.set_function(lambda: engine.queue_depth)
        active = Gauge("unclip_in_progress", "Requests in progress", registry=r)
        active.set_function(lambda: engine.in_progress)

    def on_submit(self) -> None:
        pass

    def on_reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def on_done(self, status: str, seconds: float) -> None:
        self.requests.labels(status).inc()
        self.latency.labels(status).observe(seconds)

    def on_batch(self, stage: str, rows: int, requests: int, seconds: float) -> None:
        self.batch_rows.labels(stage).observe(rows)
        self.stage_latency.labels(stage).observe(seconds)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        from prometheus_client import generate_latest
        return generate_latest(self.registry)
