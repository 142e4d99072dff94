"""Prometheus metrics of the controller, in a registry of its own (several controllers per process
in tests never collide).

A cold start is timed phase by phase, so a slow one says where the time went: queue wait
(before an instance start was decided), scheduling (the decision), fetch (S3 → disk), load
(disk/DRAM → device), init (model initialisation) and first token (instance ready → first
token of the request that waited for it). The scheduler's time-to-ready estimate is recorded
next to the measured one, and their ratio shows how good the estimates are.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
COLD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
RATIO_BUCKETS = (0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 4)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ControllerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "ember_controller_"
        self.queue_length = Gauge(p + "queue_length", "Requests waiting in a deployment's queue", ["deployment"], registry=r)
        self.in_flight = Gauge(p + "requests_in_flight", "Requests dispatched to instances", ["deployment"], registry=r)
        self.instances = Gauge(p + "instances", "Instances by state", ["deployment", "state"], registry=r)
        self.nodes = Gauge(p + "nodes", "Worker nodes by state", ["state"], registry=r)
        self.requests = Counter(p + "requests_total", "Requests by outcome", ["deployment", "outcome"], registry=r)
        self.rejected = Counter(p + "queue_rejections_total", "Requests refused with 429 (queue full)",
                                ["deployment"], registry=r)
        self.cold_starts = Counter(p + "cold_starts_total", "Instance starts by source tier",
                                   ["deployment", "tier"], registry=r)
        self.load_failures = Counter(p + "load_failures_total", "Instance loads that failed", ["deployment", "code"],
                                     registry=r)
        self.cold_start_phase = Histogram(
            p + "cold_start_phase_seconds", "Cold start time per phase and source tier",
            ["tier", "phase"], buckets=COLD_BUCKETS, registry=r,
        )
        self.time_to_ready = Histogram(
            p + "time_to_ready_seconds", "Time to ready of instance starts: the scheduler's estimate and the actual",
            ["tier", "kind"], buckets=COLD_BUCKETS, registry=r,
        )
        self.time_to_ready_ratio = Histogram(
            p + "time_to_ready_actual_over_estimated", "Actual / estimated time to ready", ["tier"],
            buckets=RATIO_BUCKETS, registry=r,
        )
        self.scheduling_seconds = Histogram(p + "scheduling_decision_seconds", "Duration of a placement decision",
                                            buckets=(1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.01), registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Request arrival to first token",
                              ["deployment"], buckets=TTFT_BUCKETS,
                              registry=r)
        self.inter_token = Histogram(p + "inter_token_latency_seconds", "Time between streamed chunks",
                                     ["deployment"], buckets=LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram(p + "dispatch_seconds", "Request arrival to the worker call (warm requests)",
                                  ["deployment"], buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.05),
                                  registry=r)
        self.heartbeats = Counter(p + "heartbeats_total", "Heartbeats received", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def forget_deployment(self, name: str) -> None:
        for gauge in (self.queue_length, self.in_flight):
            try:
                gauge.remove(name)
            except KeyError:
                pass
        for state in ("starting", "loading", "ready", "stopping"):
            try:
                self.instances.remove(name, state)
            except KeyError:
                pass
