"""Prometheus metrics of one worker, and the per-tier bandwidth estimates it reports.

Each WorkerMetrics owns its registry, so several workers (or tests) in one process never collide
on metric names. Tier labels are "s3", "disk" and "dram" — the same strings as
LoadProgress.source_tier and NodeStatus.tiers.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

TIERS = ("s3", "disk", "dram")
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0)
MIGRATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class TierBandwidth:
    """EWMA of measured read rates per tier (GB/s); the scheduler's time-to-ready divides by these."""

    def __init__(self, alpha: float = 0.3) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self._gbps: dict[str, float] = {}
        self._lock = threading.Lock()

    def observe(self, tier: str, nbytes: int, seconds: float) -> float | None:
        """Fold one measurement in; ignores empty or instantaneous reads that carry no rate."""
        if nbytes <= 0 or seconds <= 0:
            return None
        rate = nbytes / seconds / 1e9
        with self._lock:
            old = self._gbps.get(tier)
            new = rate if old is None else self.alpha * rate + (1 - self.alpha) * old
            self._gbps[tier] = new
        return new

    def gbps(self, tier: str) -> float:
        with self._lock:
            return self._gbps.get(tier, 0.0)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.loads = Counter("ember_worker_loads", "Completed loads by source tier", ["tier"], registry=r)
        self.load_failures = Counter("ember_worker_load_failures", "Loads that ended in an error", registry=r)
        self.load_seconds = Histogram(
            "ember_worker_load_seconds",
            "Seconds from Load to ready (fetch + load + init) by source tier",
            ["tier"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.load_bytes = Counter("ember_worker_load_bytes", "Checkpoint bytes read by tier", ["tier"], registry=r)
        self.tier_read_gbps = Gauge(
            "ember_worker_tier_read_gbps", "Measured read bandwidth per tier (EWMA, GB/s)", ["tier"], registry=r
        )
        self.generate_requests = Counter(
            "ember_worker_generate_requests", "Generate requests by outcome", ["outcome"], registry=r
        )
        self.generated_tokens = Counter("ember_worker_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("ember_worker_prompt_tokens", "Prompt tokens processed", registry=r)
        self.instances = Gauge("ember_worker_instances", "Loaded instances", registry=r)
        self.peak_batch_size = Gauge(
            "ember_worker_peak_batch_size", "Largest decode batch seen on any instance", registry=r
        )
        self.cache_bytes = Gauge("ember_worker_cache_bytes", "Bytes held per cache tier", ["tier"], registry=r)
        # Live migration: direction "out" (source) | "in" (destination); mode "kv" | "tokens".
        self.migrations = Counter(
            "ember_worker_migrations",
            "Requests migrated by direction, mode and outcome (out: handed_over | stayed | finished; "
            "in: accepted | refused)",
            ["direction", "mode", "outcome"],
            registry=r,
        )
        self.migration_bytes = Counter(
            "ember_worker_migration_bytes", "Bytes of migration state sent or received", ["direction", "mode"], registry=r
        )
        self.migration_stop_seconds = Histogram(
            "ember_worker_migration_stop_seconds",
            "Source side: seconds from stopping a request to the destination's first token",
            ["mode"],
            buckets=MIGRATION_BUCKETS,
            registry=r,
        )
        self.migration_seconds = Histogram(
            "ember_worker_migration_seconds",
            "Source side: seconds from the start of a request's migration to its hand-over",
            ["mode"],
            buckets=MIGRATION_BUCKETS,
            registry=r,
        )
        for tier in TIERS:  # export zeros from the start so dashboards see every series
            self.loads.labels(tier)
            self.load_bytes.labels(tier)
            self.tier_read_gbps.labels(tier)

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)
