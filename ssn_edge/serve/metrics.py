"""Prometheus metrics of one server (prometheus_client, a registry of its own so servers in one process, as in
tests, do not share counters): requests by route and status, inference latency, decisions, queue depth."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics,
                               generate_latest)

disable_created_metrics()  # the *_created series (process start time per label set) only add noise to a scrape

# Inference latency buckets (seconds): a few ms for a small model on a fast CPU up to seconds for a tiled frame.
BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("ssn_edge_requests", "HTTP requests by route kind and status code",
                                ["route", "model", "code"], registry=r)
        self.latency = Histogram("ssn_edge_inference_seconds", "Inference request latency (body read to response)",
                                 ["model", "version"], buckets=BUCKETS, registry=r)
        self.decisions = Counter("ssn_edge_decisions", "Images decided, by decision", ["model", "version", "decision"], registry=r)
        self.in_flight = Gauge("ssn_edge_in_flight", "Inference requests admitted and not finished", ["model", "version"], registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
