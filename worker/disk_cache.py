"""The worker's disk tier: checkpoints fetched from S3, with a byte capacity and LRU eviction.

Layout under the cache directory:
    <key>/entry.json      {"uri", "bytes", "last_used"} — last use survives restarts
    <key>/checkpoint/     the Ember checkpoint directory the loader reads
    .tmp/<key>-<nonce>/   downloads in progress; renamed to <key>/ only when complete
An entry exists only after its atomic rename, so a crash mid-download leaves nothing that looks
complete; at start every entry is re-validated with open_checkpoint (sizes against the index) and
anything broken or partial is deleted. Chunk checksums are verified by the loader as it reads;
a corrupt chunk there makes the model store drop the entry and fetch it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ember.worker.store_errors import CacheFull

log = logging.getLogger(__name__)

ENTRY_FILE = "entry.json"
CHECKPOINT_DIR = "checkpoint"
TMP_DIR = ".tmp"


@dataclass
class CacheEntry:
    uri: str
    key: str
    root: Path
    bytes: int
    last_used: float

    @property
    def path(self) -> Path:
        """The checkpoint directory."""
        return self.root / CHECKPOINT_DIR


@dataclass
class PendingEntry:
    """A download in progress: write the checkpoint into `path`, then commit or abort."""

    uri: str
    key: str
    root: Path
    bytes: int
    final_root: Path  # where commit() renames `root` to

    @property
    def path(self) -> Path:
        return self.root / CHECKPOINT_DIR

    @property
    def final_path(self) -> Path:
        """The checkpoint directory once committed (what loads of this entry will be given)."""
        return self.final_root / CHECKPOINT_DIR


def cache_key(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:32]


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskCache:
    def __init__(self, root: Path, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"disk cache capacity must be >= 0 bytes, got {capacity_bytes}")
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        self._lock = threading.Lock()
        self._entries: dict[str, CacheEntry] = {}
        self._pinned: dict[str, int] = {}
        self._reserved = 0
        self.dropped_at_start: list[str] = []
        self.root.mkdir(parents=True, exist_ok=True)
        self._scan()

    # -- inventory -------------------------------------------------------------------------

    def _scan(self) -> None:
        """Rebuild the inventory from disk, deleting partial downloads and broken entries."""
        from ember.ckpt_format.index import open_checkpoint

        shutil.rmtree(self.root / TMP_DIR, ignore_errors=True)
        for child in sorted(self.root.iterdir()):
            if not child.is_dir() or child.name == TMP_DIR:
                continue
            try:
                meta = json.loads((child / ENTRY_FILE).read_text())
                uri = meta["uri"]
                if cache_key(uri) != child.name:
                    raise ValueError(f"entry for {uri!r} stored under the wrong key {child.name}")
                open_checkpoint(child / CHECKPOINT_DIR)
                entry = CacheEntry(
                    uri=uri,
                    key=child.name,
                    root=child,
                    bytes=_dir_bytes(child / CHECKPOINT_DIR),
                    last_used=float(meta.get("last_used", 0.0)),
                )
            except Exception as exc:  # anything unreadable is a broken entry: drop it
                log.warning("dropping broken disk cache entry %s: %s", child, exc)
                self.dropped_at_start.append(f"{child.name}: {exc}")
                shutil.rmtree(child, ignore_errors=True)
                continue
            self._entries[uri] = entry

    def entries(self) -> list[CacheEntry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.last_used, reverse=True)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.bytes for e in self._entries.values()) + self._reserved

    def get(self, uri: str) -> CacheEntry | None:
        with self._lock:
            return self._entries.get(uri)

    def touch(self, uri: str) -> None:
        """Record a use now (persisted, so LRU order survives restarts)."""
        with self._lock:
            entry = self._entries.get(uri)
            if entry is None:
                return
            entry.last_used = time.time()
            data = {"uri": entry.uri, "bytes": entry.bytes, "last_used": entry.last_used}
        _write_json_atomic(entry.root / ENTRY_FILE, data)

    def drop(self, uri: str) -> bool:
        with self._lock:
            entry = self._entries.pop(uri, None)
        if entry is None:
            return False
        self._remove(entry)
        return True

    def _remove(self, entry: CacheEntry) -> None:
        # Rename first so a crash during rmtree cannot leave a half-deleted entry under its key.
        doomed = self.root / TMP_DIR / f"drop-{entry.key}-{uuid.uuid4().hex}"
        doomed.parent.mkdir(exist_ok=True)
        os.replace(entry.root, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    # -- pinning: entries being loaded are never evicted -------------------------------------

    def pin(self, uri: str) -> None:
        with self._lock:
            self._pinned[uri] = self._pinned.get(uri, 0) + 1

    def unpin(self, uri: str) -> None:
        with self._lock:
            n = self._pinned.get(uri, 0) - 1
            if n > 0:
                self._pinned[uri] = n
            else:
                self._pinned.pop(uri, None)

    # -- adding entries ----------------------------------------------------------------------

    def begin(self, uri: str, nbytes: int) -> PendingEntry:
        """Reserve room for a new entry (evicting least recently used ones) and return its temp dir."""
        with self._lock:
            if nbytes > self.capacity_bytes:
                raise CacheFull(
                    f"checkpoint {uri} is {nbytes / 1e9:.2f} GB but the disk cache holds at most "
                    f"{self.capacity_bytes / 1e9:.2f} GB",
                    "start the worker with a larger --disk-cache-gb",
                )
            victims = self._choose_victims(nbytes)
            for victim in victims:
                del self._entries[victim.uri]
            self._reserved += nbytes
        for victim in victims:
            log.info("evicting %s (%d bytes) from the disk cache", victim.uri, victim.bytes)
            self._remove(victim)
        key = cache_key(uri)
        root = self.root / TMP_DIR / f"{key}-{uuid.uuid4().hex}"
        (root / CHECKPOINT_DIR).mkdir(parents=True)
        return PendingEntry(uri=uri, key=key, root=root, bytes=nbytes, final_root=self.root / key)

    def _choose_victims(self, nbytes: int) -> list[CacheEntry]:
        used = sum(e.bytes for e in self._entries.values()) + self._reserved
        victims: list[CacheEntry] = []
        for entry in sorted(self._entries.values(), key=lambda e: e.last_used):
            if used + nbytes <= self.capacity_bytes:
                break
            if self._pinned.get(entry.uri):
                continue
            victims.append(entry)
            used -= entry.bytes
        if used + nbytes > self.capacity_bytes:
            pinned = ", ".join(u for u in self._pinned) or "none"
            raise CacheFull(
                f"no room in the disk cache for {nbytes / 1e9:.2f} GB: {used / 1e9:.2f} of "
                f"{self.capacity_bytes / 1e9:.2f} GB are held by checkpoints being loaded or downloaded ({pinned})",
                "retry when those loads finish, or start the worker with a larger --disk-cache-gb",
            )
        return victims

    def commit(self, pending: PendingEntry) -> CacheEntry:
        """Publish a completed download atomically."""
        actual = _dir_bytes(pending.path)
        now = time.time()
        _write_json_atomic(pending.root / ENTRY_FILE, {"uri": pending.uri, "bytes": actual, "last_used": now})
        final = pending.final_root
        with self._lock:
            self._reserved -= pending.bytes
            old = self._entries.pop(pending.uri, None)
        if old is not None or final.exists():
            shutil.rmtree(final, ignore_errors=True)
        os.replace(pending.root, final)
        _fsync_dir(self.root)
        entry = CacheEntry(uri=pending.uri, key=pending.key, root=final, bytes=actual, last_used=now)
        with self._lock:
            self._entries[pending.uri] = entry
        return entry

    def abort(self, pending: PendingEntry) -> None:
        with self._lock:
            self._reserved -= pending.bytes
        shutil.rmtree(pending.root, ignore_errors=True)
