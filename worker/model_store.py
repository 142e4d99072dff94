"""Where a checkpoint URI's bytes are on this node, fetching them when they are not.

Tiers, slowest first: S3 (fetched with parallel ranged GETs straight into a disk cache entry,
and written through into the DRAM pool when it fits: see ember.worker.write_through), the disk
cache (a directory with a byte capacity and LRU eviction that survives restarts), and the DRAM
pool (ember.loader.DramPool, handed to the backend's load). Local paths and file:// URIs are read
in place: they are already on disk and are never copied into the cache.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from ember.worker.disk_cache import CacheEntry, DiskCache
from ember.worker.s3_source import FetchStats, S3Location, S3Plan, S3Source
from ember.worker.store_errors import CheckpointNotFound, InvalidCheckpointURI
from ember.worker.write_through import fetch_through_pool

ProgressFn = Callable[[int, int], None]

# Bucket names per the S3 rules (3-63 chars, lowercase letters, digits, dots, hyphens).
log = logging.getLogger("ember.worker.store")
# Where a checkpoint goes when the disk cache's filesystem is full: memory-backed when possible,
# deleted as soon as the load has read it (the load goes on; the checkpoint is just not cached).
SCRATCH_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class CheckpointURI:
    raw: str
    local_path: Path | None = None
    s3: S3Location | None = None

    @property
    def canonical(self) -> str:
        """The spelling used as the cache key and in inventories."""
        if self.s3 is not None:
            return str(self.s3)
        return str(self.local_path)


def parse_checkpoint_uri(uri: str) -> CheckpointURI:
    """Accepts a local path, file:///abs/path or s3://bucket/prefix; anything else is refused."""
    text = uri.strip()
    if not text:
        raise InvalidCheckpointURI(
            "checkpoint_uri is empty", "give a local path, file:///path or s3://bucket/prefix"
        )
    if "://" not in text:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:/", text):
            raise InvalidCheckpointURI(
                f"malformed checkpoint URI {uri!r}",
                "write s3://bucket/prefix or file:///absolute/path (two slashes after the scheme)",
            )
        return CheckpointURI(raw=uri, local_path=Path(text).expanduser().resolve())
    parsed = urlparse(text)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise InvalidCheckpointURI(
                f"file URI {uri!r} names host {parsed.netloc!r}; only local files can be read",
                "use file:///absolute/path",
            )
        if not parsed.path:
            raise InvalidCheckpointURI(f"file URI {uri!r} has no path", "use file:///absolute/path")
        return CheckpointURI(raw=uri, local_path=Path(unquote(parsed.path)).resolve())
    if scheme == "s3":
        bucket = parsed.netloc
        if not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise InvalidCheckpointURI(
                f"S3 URI {uri!r} has an invalid bucket name {bucket!r}",
                "write s3://bucket/prefix with a bucket of 3-63 lowercase letters, digits, '.' or '-'",
            )
        if parsed.query or parsed.fragment:
            raise InvalidCheckpointURI(f"S3 URI {uri!r} must not have a query or fragment")
        prefix = unquote(parsed.path).strip("/")
        if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
            raise InvalidCheckpointURI(f"S3 URI {uri!r} has an empty, '.' or '..' path segment")
        return CheckpointURI(raw=uri, s3=S3Location(bucket=bucket, prefix=prefix))
    raise InvalidCheckpointURI(
        f"unsupported checkpoint URI scheme {parsed.scheme!r} in {uri!r}",
        "use a local path, file:///path or s3://bucket/prefix",
    )


@dataclass
class Inspection:
    """What a checkpoint is, learned without reading its weights (to check it fits first)."""

    uri: CheckpointURI
    index: Any  # ember.ckpt_format.index.CheckpointIndex
    plan: S3Plan | None  # set when the bytes are still only in S3


@dataclass(frozen=True)
class DramInventory:
    capacity_bytes: int
    used_bytes: int
    checkpoints: list[tuple[str, int]]  # (uri, bytes), most recently used first


@dataclass
class LocatedCheckpoint:
    uri: CheckpointURI
    path: Path  # the Ember checkpoint directory to load
    tier: str  # where the bytes were: "s3" (fetched now) or "disk" (cache entry or local path)
    fetch: FetchStats | None  # set when fetched from S3 now
    cached: bool  # True when `path` is a disk cache entry (pinned until release())


class ModelStore:
    def __init__(
        self,
        cache_dir: Path,
        disk_capacity_bytes: int,
        dram_pool: Any = None,
        s3: S3Source | None = None,
    ) -> None:
        self.disk = DiskCache(Path(cache_dir) / "disk", disk_capacity_bytes)
        self.dram_pool = dram_pool
        self.s3 = s3 or S3Source()
        self._locks: dict[str, asyncio.Lock] = {}
        self._local_uris: dict[str, str] = {}  # resolved local checkpoint dir -> URI it was loaded as
        self._scratch: set[Path] = set()  # uncached downloads, deleted on release()

    def _lock(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    async def inspect(self, uri: str | CheckpointURI) -> Inspection:
        """The checkpoint's validated index: from disk when local or cached, else ember.json from S3."""
        from ember.ckpt_format.index import open_checkpoint

        parsed = uri if isinstance(uri, CheckpointURI) else parse_checkpoint_uri(uri)
        if parsed.local_path is not None:
            path = self._check_local(parsed.local_path)
            return Inspection(parsed, await asyncio.to_thread(open_checkpoint, path), None)
        assert parsed.s3 is not None
        entry = self.disk.get(parsed.canonical)
        if entry is not None:
            try:
                return Inspection(parsed, await asyncio.to_thread(open_checkpoint, entry.path), None)
            except Exception:  # damaged since the start-up scan: forget it and use the source
                await asyncio.to_thread(self.disk.drop, parsed.canonical)
        plan = await asyncio.to_thread(self.s3.plan, parsed.s3)
        return Inspection(parsed, plan.index, plan)

    async def locate(
        self, uri: str | CheckpointURI | Inspection, progress: ProgressFn | None = None
    ) -> LocatedCheckpoint:
        """Make the checkpoint readable from local disk; pins cache entries until release()."""
        plan = uri.plan if isinstance(uri, Inspection) else None
        if isinstance(uri, Inspection):
            uri = uri.uri
        parsed = uri if isinstance(uri, CheckpointURI) else parse_checkpoint_uri(uri)
        if parsed.local_path is not None:
            path = self._check_local(parsed.local_path)
            self._local_uris[str(path.resolve())] = parsed.canonical
            return LocatedCheckpoint(parsed, path, "disk", None, cached=False)
        assert parsed.s3 is not None
        key = parsed.canonical
        async with self._lock(key):
            entry = self.disk.get(key)
            if entry is not None:
                self.disk.pin(key)
                await asyncio.to_thread(self.disk.touch, key)
                return LocatedCheckpoint(parsed, entry.path, "disk", None, cached=True)
            try:
                stats = await self._fetch(parsed.s3, key, progress, plan)
            except Exception as exc:
                if not _disk_full(exc):
                    raise
                log.warning("disk cache full while caching %s (%s): entry dropped, loading it uncached", key, exc)
                scratch = Path(tempfile.mkdtemp(prefix="ember-uncached-", dir=SCRATCH_DIR))
                self._scratch.add(scratch)
                try:
                    stats = await asyncio.to_thread(self._download, parsed.s3, scratch, scratch, progress, plan)
                except BaseException:
                    self._drop_scratch(scratch)
                    raise
                return LocatedCheckpoint(parsed, scratch, "s3", stats, cached=False)
            self.disk.pin(key)
            entry = self.disk.get(key)
            assert entry is not None
            return LocatedCheckpoint(parsed, entry.path, "s3", stats, cached=True)

    async def _fetch(
        self, location: S3Location, key: str, progress: ProgressFn | None, plan: S3Plan | None
    ) -> FetchStats:
        if plan is None:
            plan = await asyncio.to_thread(self.s3.plan, location)
        pending = await asyncio.to_thread(self.disk.begin, key, plan.total_bytes)  # may evict (rmtree)
        cancel = threading.Event()
        try:
            stats = await asyncio.to_thread(
                self._download, location, pending.path, pending.final_path, progress, plan, cancel
            )
            await asyncio.to_thread(self.disk.commit, pending)
        except BaseException:
            cancel.set()  # a cancelled load must not leave a download running in the background
            await asyncio.to_thread(self.disk.abort, pending)
            self.forget_dram(pending.final_path)  # written through, but the entry it belongs to is gone
            raise
        return stats

    def _download(
        self,
        location: S3Location,
        dest: Path,
        load_path: Path,
        progress: ProgressFn | None,
        plan: S3Plan | None,
        cancel: threading.Event | None = None,
    ) -> FetchStats:
        """S3 → `dest`, and into the DRAM pool (keyed by `load_path`) when it fits."""
        if plan is None:
            plan = self.s3.plan(location)
        return fetch_through_pool(
            self.s3, self.dram_pool, location, dest, plan, load_path=load_path, progress=progress, cancel=cancel
        )

    def release(self, located: LocatedCheckpoint) -> None:
        if located.cached:
            self.disk.unpin(located.uri.canonical)
        elif located.path in self._scratch:
            self._drop_scratch(located.path)

    def _drop_scratch(self, path: Path) -> None:
        self._scratch.discard(path)
        shutil.rmtree(path, ignore_errors=True)
        # No load can name this directory again: its pool entry would only hold memory. A model
        # still viewing it keeps its weights (DramPool.evict).
        self.forget_dram(path)

    async def refetch(self, located: LocatedCheckpoint, progress: ProgressFn | None = None) -> LocatedCheckpoint:
        """Drop a cache entry found corrupt and fetch it again from its source."""
        self.release(located)
        key = located.uri.canonical
        async with self._lock(key):
            await asyncio.to_thread(self.disk.drop, key)
        return await self.locate(located.uri, progress)

    def disk_entries(self) -> list[CacheEntry]:
        return self.disk.entries()

    # -- DRAM tier (ember.loader.DramPool, keyed by the resolved checkpoint directory) ----------

    def in_dram(self, path: Path) -> bool:
        return self.dram_pool is not None and path in self.dram_pool

    def forget_dram(self, path: Path) -> None:
        if self.dram_pool is not None:
            self.dram_pool.evict(path)

    def dram_inventory(self) -> DramInventory:
        if self.dram_pool is None:
            return DramInventory(0, 0, [])
        uris = dict(self._local_uris)
        uris.update({str(e.path.resolve()): e.uri for e in self.disk.entries()})
        contents = sorted(self.dram_pool.contents(), key=lambda e: e.last_used, reverse=True)
        return DramInventory(
            capacity_bytes=self.dram_pool.capacity_bytes,
            used_bytes=self.dram_pool.used_bytes,
            checkpoints=[(uris.get(e.path, e.path), e.nbytes) for e in contents],
        )

    @staticmethod
    def _check_local(path: Path) -> Path:
        if not path.exists():
            raise CheckpointNotFound(f"checkpoint directory {path} does not exist", "check the path on the worker node")
        if not path.is_dir() or not (path / "ember.json").is_file():
            raise CheckpointNotFound(
                f"{path} is not an Ember checkpoint directory (no ember.json)",
                f"convert it first: ember convert {path} {path}.ember",
            )
        return path


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the chain (the S3 source wraps I/O errors in its own)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
