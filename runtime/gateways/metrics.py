"""The gateway's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("itemrt_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.errors = Counter("itemrt_errors", "Errors by kind", ["kind"], registry=r)
        self.latency = Histogram("itemrt_request_seconds", "Request latency", ["endpoint"], registry=r,
                                 buckets=STAGE_BUCKETS)
        self.stages = Histogram("itemrt_stage_seconds", "Runtime stage latency per batch", ["stage"], registry=r,
                                buckets=STAGE_BUCKETS)
        self.batch = Histogram("itemrt_batch_size", "Images per detect_batch call", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32))
        self.in_flight = Gauge("itemrt_in_flight_images", "Images admitted and not yet answered", registry=r)
        self.queued = Gauge("itemrt_queued_images", "Images waiting for a batch (queue depth)", registry=r)
        self.uploads = Gauge("itemrt_uploads_in_progress", "Request bodies being received", registry=r)
        self.cache_hit_rate = Gauge("itemrt_text_cache_hit_rate", "Caption text-cache hit rate", registry=r)
        self.ready = Gauge("itemrt_ready", "1 when the bundle is loaded and warmed", registry=r)

    def on_batch(self, n: int, results) -> None:
        self.batch.observe(n)
        for stage, ms in results[0].timings_ms.items():  # one timing per batch, shared by its results
            self.stages.labels(stage).observe(ms / 1e3)

    def text(self) -> bytes:
        return generate_latest(self.registry)
