"""The DRAM tier: checkpoints' partition buffers kept in host memory, LRU by model, bounded in bytes.

Sharing contract (CPU): a load served from the pool — and a disk load that fills the pool —
returns tensors that are views of the pooled buffers, with no copy. The model and the pool then
share memory, so such tensors are READ-ONLY by contract: inference never writes weights; code
that wants to modify weights in place must `.clone()` them first (or load without a pool).
GPU loads copy out of the pool and share nothing.

Lifetime: every load holds a lease on the buffers it uses, released when the last tensor made
from them is garbage-collected. Evicting a model only drops the pool's reference: memory still
viewed by a live model stays valid (Python keeps it alive) and simply stops counting towards
`used_bytes`. Evicted buffers nobody views are kept as spares (within capacity) and reused for
the next load of a partition of the same size, because writing into already-touched pages is
much faster than into fresh ones (page zeroing costs as much as the disk read on some nodes). A
buffer is reused only once its lease count is zero, so a live model's weights are never
overwritten.

Thread safety: one lock guards the bookkeeping; a per-checkpoint lock makes two concurrent loads
of the same checkpoint read the disk once (the second waits and is served from DRAM). Loads of
different checkpoints run concurrently.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from ember.ckpt_format.index import CheckpointIndex

from .hostmem import PAGE, HostBuffer


@dataclass(frozen=True)
class PoolEntryInfo:
    """One checkpoint held in the pool (as reported by DramPool.contents())."""

    path: str
    nbytes: int
    partitions: int
    in_use: bool  # some live tensors view this entry's memory
    pinned: bool
    last_used: float  # time.time() of the last load served or filled


class _Slab:
    """One partition buffer and the number of live leases (loads whose tensors view it)."""

    __slots__ = ("buf", "leases", "state")

    def __init__(self, buf: HostBuffer, state: str) -> None:
        self.buf = buf
        self.leases = 0
        self.state = state  # "filling" | "cached" | "orphan" (evicted, still viewed) | "spare"

    @property
    def nbytes(self) -> int:
        return _rounded(self.buf.nbytes)


@dataclass
class _Entry:
    key: str
    fingerprint: str
    slabs: list[_Slab]
    last_used: float = field(default_factory=time.time)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.slabs)


def _rounded(n: int) -> int:
    return max(PAGE, -(-n // PAGE) * PAGE)


def checkpoint_key(index: CheckpointIndex) -> str:
    return str(Path(index.path).resolve())


def fingerprint(index: CheckpointIndex) -> str:
    """Identity of a checkpoint's bytes: a checkpoint re-converted in place is a different entry."""
    doc = index.to_json()
    blob = json.dumps([doc["partitions"], doc["tensors"], doc["aliases"]], sort_keys=True)
    return xxhash.xxh3_64_hexdigest(blob.encode())


class Lease:
    """Buffers of one pooled checkpoint, held for one load: `tensors[p]` is partition p's bytes."""

    def __init__(self, pool: DramPool, slabs: list[_Slab]) -> None:
        self.tensors = [s.buf.lease(pool._release_callback(s)) for s in slabs]
        self.buffers = [s.buf for s in slabs]


class Fill:
    """A pool reservation for one checkpoint being read from disk (see DramPool.filling)."""

    def __init__(self, pool: DramPool, index: CheckpointIndex, key: str, fp: str) -> None:
        self._pool = pool
        self.index = index
        self.key = key
        self.fingerprint = fp
        self.slabs: list[_Slab] | None = None
        self.new_bytes = 0  # bytes of freshly allocated (not recycled) buffers
        self.committed = False

    def reserve(self) -> list[HostBuffer] | None:
        """Buffers for every partition (recycled where possible), or None when the checkpoint
        cannot fit in the pool's capacity even after evicting every other model."""
        return self._pool._reserve(self)

    def commit(self) -> Lease:
        return self._pool._commit(self)


class DramPool:
    """Host-memory tier for checkpoints, LRU by model with a byte capacity (see module docstring)."""

    def __init__(self, capacity_bytes: int, pin: bool | None = None) -> None:
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be a non-negative integer, got {capacity_bytes!r}")
        if pin is None:
            pin = _cuda_available()
        self.capacity_bytes = capacity_bytes
        self.pin = bool(pin)
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._reserved = 0
        self._spares: list[_Slab] = []
        self._orphans: set[_Slab] = set()
        self._released: collections.deque[_Slab] = collections.deque()
        self._key_locks: dict[str, threading.Lock] = {}

    # ---- queries ------------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        """Bytes of cached checkpoints plus reservations of loads in progress."""
        with self._lock:
            self._drain()
            return self._used()

    @property
    def spare_bytes(self) -> int:
        """Touched buffers kept for reuse (freed first when room is needed; see trim())."""
        with self._lock:
            self._drain()
            return sum(s.nbytes for s in self._spares)

    def contents(self) -> list[PoolEntryInfo]:
        """Cached checkpoints, least recently used first."""
        with self._lock:
            self._drain()
            return [
                PoolEntryInfo(
                    path=e.key,
                    nbytes=e.nbytes,
                    partitions=len(e.slabs),
                    in_use=any(s.leases for s in e.slabs),
                    pinned=self.pin,
                    last_used=e.last_used,
                )
                for e in self._entries.values()
            ]

    def __contains__(self, path: object) -> bool:
        key = str(Path(path).resolve()) if isinstance(path, (str, Path)) else None
        with self._lock:
            return key in self._entries

    def __repr__(self) -> str:
        return f"DramPool(capacity_bytes={self.capacity_bytes}, used_bytes={self.used_bytes}, pin={self.pin})"

    # ---- management ---------------------------------------------------------------------------

    def evict(self, path: str | Path) -> bool:
        """Drop a checkpoint from the pool; True if it was there. Live models keep their memory."""
        key = str(Path(path).resolve())
        with self._lock:
            self._drain()
            entry = self._entries.pop(key, None)
            if entry is None:
                return False
            self._retire(entry)
            return True

    def clear(self) -> None:
        """Evict everything and free spare buffers."""
        with self._lock:
            self._drain()
            while self._entries:
                self._retire(self._entries.popitem(last=False)[1])
            self._spares.clear()

    def trim(self) -> int:
        """Free spare buffers now; returns the bytes released."""
        with self._lock:
            self._drain()
            freed = sum(s.nbytes for s in self._spares)
            self._spares.clear()
            return freed

    def prefetch(self, path: str | Path, **options: Any):
        """Read a checkpoint from disk into the pool without keeping tensors; returns its LoadStats.

        Options are load_state_dict's (threads, chunk_mb, verify, tracker).
        """
        from .state_dict import load_state_dict
        from .stats import last_load_stats

        state = load_state_dict(path, "cpu", pool=self, **options)
        del state
        return last_load_stats()

    # ---- used by the loader -------------------------------------------------------------------

    def lease(self, index: CheckpointIndex) -> Lease | None:
        """The checkpoint's buffers if cached (and marks it most recently used), else None."""
        key = checkpoint_key(index)
        fp = fingerprint(index)
        return self._lease_key(key, fp)

    @contextmanager
    def filling(self, index: CheckpointIndex) -> Iterator[tuple[Lease | None, Fill]]:
        """Serialise disk loads of one checkpoint: yields (lease, fill). If another thread filled
        the pool while we waited, `lease` is set and nothing needs reading; otherwise reserve
        buffers with `fill.reserve()`, read into them, and `fill.commit()`. A fill that is not
        committed (an error, a corrupt chunk) gives its buffers back as spares and leaves the
        pool's contents as they were."""
        key = checkpoint_key(index)
        fp = fingerprint(index)
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            fill = Fill(self, index, key, fp)
            try:
                yield self._lease_key(key, fp), fill
            finally:
                if not fill.committed and fill.slabs is not None:
                    self._abort(fill)

    def _lease_key(self, key: str, fp: str) -> Lease | None:
        with self._lock:
            self._drain()
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry.fingerprint != fp:  # re-converted in place: the cached bytes are stale
                self._retire(self._entries.pop(key))
                return None
            self._entries.move_to_end(key)
            entry.last_used = time.time()
            for s in entry.slabs:
                s.leases += 1
            slabs = list(entry.slabs)
        return Lease(self, slabs)

    def _reserve(self, fill: Fill) -> list[HostBuffer] | None:
        sizes = [p.size for p in fill.index.partitions]
        total = sum(_rounded(n) for n in sizes)
        with self._lock:
            self._drain()
            if total > self.capacity_bytes:
                return None
            while True:
                taken = self._match_spares(sizes)
                new = sum(_rounded(n) for n, s in zip(sizes, taken) if s is None)
                spare_left = sum(s.nbytes for s in self._spares if s not in taken)
                if self._used() + total + spare_left <= self.capacity_bytes:
                    break
                free_spare = next((s for s in self._spares if s not in taken), None)
                if free_spare is not None:
                    self._spares.remove(free_spare)
                    continue
                if self._entries:
                    self._retire(self._entries.popitem(last=False)[1])
                    continue
                return None  # only in-progress reservations of other loads are left
            slabs = []
            for n, s in zip(sizes, taken):
                if s is None:
                    s = _Slab(HostBuffer(n, pin=self.pin), "filling")
                else:
                    self._spares.remove(s)
                    s.state = "filling"
                slabs.append(s)
            self._reserved += total
            fill.slabs = slabs
            fill.new_bytes = new
        return [s.buf for s in slabs]

    def _match_spares(self, sizes: list[int]) -> list[_Slab | None]:
        free = list(self._spares)
        taken: list[_Slab | None] = []
        for n in sizes:
            match = next((s for s in free if s.buf.nbytes == n), None)
            if match is not None:
                free.remove(match)
            taken.append(match)
        return taken

    def _commit(self, fill: Fill) -> Lease:
        assert fill.slabs is not None
        with self._lock:
            self._drain()
            self._reserved -= sum(s.nbytes for s in fill.slabs)
            for s in fill.slabs:
                s.state = "cached"
                s.leases += 1
            self._entries[fill.key] = _Entry(fill.key, fill.fingerprint, fill.slabs)
            fill.committed = True
            slabs = list(fill.slabs)
        return Lease(self, slabs)

    def _abort(self, fill: Fill) -> None:
        assert fill.slabs is not None
        with self._lock:
            self._drain()
            self._reserved -= sum(s.nbytes for s in fill.slabs)
            for s in fill.slabs:
                if s.leases:
                    s.state = "orphan"
                    self._orphans.add(s)
                else:
                    s.state = "spare"
                    self._spares.append(s)
            fill.slabs = None
            self._fit_spares()

    # ---- bookkeeping (caller holds self._lock) ------------------------------------------------

    def _used(self) -> int:
        return sum(e.nbytes for e in self._entries.values()) + self._reserved

    def _retire(self, entry: _Entry) -> None:
        """An entry left the cache: unviewed buffers become spares, viewed ones orphans."""
        for s in entry.slabs:
            if s.leases:
                s.state = "orphan"
                self._orphans.add(s)
            else:
                s.state = "spare"
                self._spares.append(s)
        self._fit_spares()

    def _fit_spares(self) -> None:
        spare = sum(s.nbytes for s in self._spares)
        while self._spares and self._used() + spare > self.capacity_bytes:
            spare -= self._spares.pop(0).nbytes

    def _release_callback(self, slab: _Slab):
        released = self._released

        def on_release() -> None:  # runs from a finaliser: no locks, just a thread-safe append
            released.append(slab)

        return on_release

    def _drain(self) -> None:
        while self._released:
            s = self._released.popleft()
            s.leases -= 1
            if s.leases == 0 and s.state == "orphan":
                self._orphans.discard(s)
                s.state = "spare"
                self._spares.append(s)
        self._fit_spares()


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())
