"""Prometheus metrics for one app, in its own registry (never the global one)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_UPSTREAM_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """Requests by decision and intent, guard and upstream latency, requests in flight."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "railproxy_requests",
            "Chat requests by decision (prompt, refuse, reply, no_match, invalid, "
            "unavailable) and intent.",
            ["decision", "intent"],
            registry=self.registry,
        )
        self.upstream_responses = Counter(
            "railproxy_upstream_responses",
            "Upstream exchanges by the status railproxy answered and how they ended.",
            ["status", "outcome"],
            registry=self.registry,
        )
        self.guard_seconds = Histogram(
            "railproxy_guard_seconds",
            "Time to decide one request (normalise, embed, search, decide).",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.upstream_seconds = Histogram(
            "railproxy_upstream_seconds",
            "Time from sending a request upstream to its first event (streams) or whole answer.",
            buckets=_UPSTREAM_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "railproxy_in_flight",
            "Chat requests being handled now.",
            registry=self.registry,
        )

    def decision(self, label: str, intent: str | None, guard_seconds: float | None) -> None:
        self.requests.labels(decision=label, intent=intent or "").inc()
        if guard_seconds is not None:
            self.guard_seconds.observe(guard_seconds)

    def upstream(self, status: int, outcome: str) -> None:
        self.upstream_responses.labels(status=str(status), outcome=outcome).inc()

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
