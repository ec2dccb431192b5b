"""/metrics in the Prometheus text format, through ``prometheus_client`` (one registry per app).

HTTP-side series are observed as requests finish; engine series are read from each engine's locked
``stats()`` snapshot at scrape time by a custom collector, so a scrape never iterates engine state that the
engine thread is changing.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _EngineCollector:
    def __init__(self, engines: dict):
        self.engines = engines

    def collect(self):
        snaps = {name: engine.stats() for name, engine in sorted(self.engines.items())}
        families = [
            (CounterMetricFamily, "steplab_prompt_tokens", "Prompt tokens prefilled.", "prompt_tokens_total"),
            (CounterMetricFamily, "steplab_generation_tokens", "Tokens generated.", "generation_tokens_total"),
            (CounterMetricFamily, "steplab_rejected_requests", "Requests turned away because the queue was full.", "rejected_total"),
            (GaugeMetricFamily, "steplab_queue_depth", "Requests waiting for a slot.", "waiting"),
            (GaugeMetricFamily, "steplab_running_sequences", "Sequences holding a KV-cache slot.", "running"),
            (GaugeMetricFamily, "steplab_free_slots", "KV-cache slots not in use.", "free_slots"),
            (GaugeMetricFamily, "steplab_batch_slots", "KV-cache slots (the maximum batch).", "max_batch"),
        ]
        for kind, name, help, key in families:
            fam = kind(name, help, labels=["model"])
            for model, snap in snaps.items():
                fam.add_metric([model], snap[key])
            yield fam
        fam = CounterMetricFamily("steplab_finished_sequences", "Finished sequences by finish reason.", labels=["model", "reason"])
        for model, snap in snaps.items():
            for reason, n in sorted(snap["finished"].items()):
                fam.add_metric([model, reason], n)
        yield fam


class Metrics:
    """The app's series; ``render()`` is the /metrics body."""

    def __init__(self, engines: dict):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("steplab_requests", "HTTP requests by endpoint and status code.", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("steplab_request_duration_seconds", "Time from request to the last byte of the response.",
                                 ["endpoint"], buckets=LATENCY, registry=self.registry)
        self.ttft = Histogram("steplab_time_to_first_token_seconds", "Time from request to the first generated token.",
                              ["model"], buckets=TTFT, registry=self.registry)
        self.in_flight = Gauge("steplab_http_in_flight", "HTTP handlers running now (requests not yet answered in full).",
                               registry=self.registry)
        self.auth_failures = Counter("steplab_auth_failures", "Requests refused for a missing or wrong API key.",
                                     registry=self.registry)
        self.auth_blocked = Counter("steplab_auth_blocked", "Requests refused (429) because their address failed auth too often.",
                                    registry=self.registry)
        self.registry.register(_EngineCollector(engines))

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint).observe(seconds)

    def observe_ttft(self, model: str, seconds: float) -> None:
        self.ttft.labels(model=model).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
