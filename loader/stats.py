"""What each load measured, and per-tier bandwidth estimates built from those measurements.

The scheduler ranks nodes by time-to-ready = size / bandwidth of the tier that holds a model, so
the bandwidths must be measured, not configured. Every load produces a LoadStats; a worker passes
one BandwidthTracker to all its loads and reports `tracker.snapshot()` in its heartbeats.
`last_load_stats()` is per thread, so concurrent loads in different threads never see each
other's numbers.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Literal

Tier = Literal["disk", "dram"]


@dataclass(frozen=True)
class LoadStats:
    """One load: where the bytes came from, how many, how fast, and how they were read."""

    path: str
    tier: Tier
    device: str
    nbytes: int  # bytes taken from the source tier (partition bytes read, or served from DRAM)
    seconds: float  # wall time of the whole load call, open to last tensor ready
    verify: bool
    direct_io: bool  # every partition read with O_DIRECT (False for DRAM hits and fallbacks)
    fallback_reason: str | None
    threads: int
    chunk_bytes: int
    tp_rank: int = 0
    tp_size: int = 1
    zero_copy: bool = False  # tensors are views of DRAM-pool memory (CPU hits)

    @property
    def bytes(self) -> int:
        """Same as nbytes (the name the worker's load report uses)."""
        return self.nbytes

    @property
    def gbps(self) -> float:
        """Decimal GB/s (1e9 bytes), the unit disks and links are rated in."""
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gbps"] = self.gbps
        return d


class BandwidthTracker:
    """Exponentially weighted moving average of measured GB/s per source tier (thread-safe).

    Loads smaller than `min_bytes` are ignored: their time is dominated by fixed costs (opening
    files, starting threads) and would make a tier look slower than it is for real models.
    Zero-copy DRAM hits move no bytes, so they are not bandwidth samples either.
    """

    def __init__(self, alpha: float = 0.3, min_bytes: int = 64 << 20) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.min_bytes = min_bytes
        self._lock = threading.Lock()
        self._ewma: dict[str, float] = {}
        self._samples: dict[str, int] = {}

    def record(self, stats: LoadStats) -> None:
        if stats.nbytes < self.min_bytes or stats.seconds <= 0 or stats.zero_copy:
            return
        with self._lock:
            prev = self._ewma.get(stats.tier)
            g = stats.gbps
            self._ewma[stats.tier] = g if prev is None else prev + self.alpha * (g - prev)
            self._samples[stats.tier] = self._samples.get(stats.tier, 0) + 1

    def gbps(self, tier: Tier) -> float | None:
        with self._lock:
            return self._ewma.get(tier)

    def snapshot(self) -> dict[str, float]:
        """{tier: GB/s} for every tier with at least one sample."""
        with self._lock:
            return dict(self._ewma)

    def samples(self, tier: Tier) -> int:
        with self._lock:
            return self._samples.get(tier, 0)


_local = threading.local()


def last_load_stats() -> LoadStats | None:
    """Stats of the most recent successful load made by the calling thread."""
    return getattr(_local, "last", None)


def _publish(stats: LoadStats, tracker: BandwidthTracker | None) -> None:
    _local.last = stats
    if tracker is not None:
        tracker.record(stats)
