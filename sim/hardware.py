"""Simulated worker nodes: GPUs, the DRAM and disk checkpoint caches, and a serial load queue.

What the real worker does, reduced to what timing depends on:
- caches are LRU by bytes with a capacity, filled by loads (S3 → disk → DRAM, as the worker's
  model store and DRAM pool do); an entry can be pinned (ServerlessLLM's DRAM pool) and is then
  never evicted;
- loads on a node run one at a time in arrival order, which is what the scheduler's
  queue_wait(n) assumes (the time until the loads already placed on n are done);
- an instance holds ceil(memory / GPU memory) whole GPUs.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any


class TierCache:
    """One cache tier of one node: checkpoint URI -> bytes, least recently used first."""

    __slots__ = ("capacity", "used", "entries", "pins", "pinned_bytes")

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.used = 0
        self.entries: OrderedDict[str, int] = OrderedDict()
        self.pins: dict[str, int] = {}
        self.pinned_bytes = 0

    def __contains__(self, uri: str) -> bool:
        return uri in self.entries

    def touch(self, uri: str) -> None:
        self.entries.move_to_end(uri)

    def insert(self, uri: str, nbytes: int) -> bool:
        """Add (or refresh) an entry, evicting unpinned LRU entries; False when it cannot fit."""
        if uri in self.entries:
            self.entries.move_to_end(uri)
            return True
        if self.capacity - self.pinned_bytes < nbytes:
            return False
        if self.used + nbytes > self.capacity:
            for victim in [u for u in self.entries if u not in self.pins]:
                self.used -= self.entries.pop(victim)
                if self.used + nbytes <= self.capacity:
                    break
        self.entries[uri] = nbytes
        self.used += nbytes
        return True

    def pin(self, uri: str) -> None:
        count = self.pins.get(uri, 0)
        if count == 0:
            self.pinned_bytes += self.entries[uri]
        self.pins[uri] = count + 1

    def unpin(self, uri: str) -> None:
        count = self.pins.get(uri, 0)
        if count <= 1:
            if count == 1:
                del self.pins[uri]
                self.pinned_bytes -= self.entries[uri]
            return
        self.pins[uri] = count - 1


@dataclass(eq=False)
class SimNode:
    id: str
    gpus_total: int
    gpu_bytes: int
    gbps: dict[str, float]  # what a load reaches from each source tier here ("s3" always)
    dram: TierCache | None
    disk: TierCache | None
    gpus_free: int = 0
    instances: dict[str, Any] = field(default_factory=dict)  # id -> engine Instance
    load_queue: deque = field(default_factory=deque)  # instances holding their GPUs, waiting to load
    gpu_waiters: deque = field(default_factory=deque)  # instances waiting for GPUs that migrations free
    loading: Any = None  # the instance whose load runs now
    active_requests: int = 0
    gpu_seconds: float = 0.0
    _gpu_clock: float = 0.0

    def __post_init__(self) -> None:
        self.gpus_free = self.gpus_total

    @property
    def address(self) -> str:
        return f"{self.id}:50061"

    def account(self, now: float) -> None:
        """Integrate allocated GPUs over time; call before every change of gpus_free."""
        self.gpu_seconds += (self.gpus_total - self.gpus_free) * (now - self._gpu_clock)
        self._gpu_clock = now

    def best_tier(self, uri: str) -> str:
        """The tier a load of the checkpoint reads from: the fastest holding it (S3 always does),
        chosen the way the scheduler's time-to-ready chooses."""
        best, best_gbps = "s3", self.gbps["s3"]
        for tier, cache in (("dram", self.dram), ("disk", self.disk)):
            if cache is not None and uri in cache and self.gbps[tier] > best_gbps:
                best, best_gbps = tier, self.gbps[tier]
        return best
