"""S3 → (disk cache file AND DRAM-pool slab) in one pass, so the load after a download is a DRAM hit.

Without this a cold start from S3 wrote the checkpoint to disk and then read it back with O_DIRECT
into the DRAM pool: the bytes were in memory once during the download and were read again. Here
the download fills the pool's buffers too (S3Source.fetch's `mirror`), and the pool entry is
keyed by the directory the loader will be given (the disk cache entry's final path), so the
backend's `load_model(path, pool=...)` finds it without touching the disk.

Integrity: the pool never holds unverified bytes. Ranged GETs do not line up with checksum
chunks, so every chunk's xxh3-64 is checked over the slabs once the whole download is in (hashing
runs at >10 GB/s per core: a small fraction of any download), before the fill is committed. A
mismatch raises CorruptChunkError naming the S3 object and chunk; a mismatch, a failed or cancelled
download leaves the fill uncommitted, which gives its buffers back (DramPool.filling), so the pool
is as it was. When there is no pool, the checkpoint does not fit it, or the host lacks the memory
for new slabs, the download goes to disk only, as before, and the load fills the pool itself.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ember.worker.s3_source import FetchStats, ProgressFn, S3Location, S3Plan, S3Source
from ember.worker.store_errors import ErrorKind, StoreError

log = logging.getLogger(__name__)

S3_CORRUPT_HINT = (
    "the object in S3 does not match the checksums in its ember.json: re-upload the whole converted "
    "checkpoint directory (ember convert output) under this prefix"
)


def fetch_through_pool(
    source: S3Source,
    pool: Any,  # ember.loader.DramPool | None
    location: S3Location,
    dest: Path,
    plan: S3Plan,
    *,
    load_path: Path,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> FetchStats:
    """Download the checkpoint into `dest` and, when it fits, into the pool under `load_path`.

    `load_path` is the directory later loads will name (for a disk cache entry, where commit()
    puts it; `dest` itself for an uncached download). Returns the download's FetchStats; the
    checkpoint is in the pool exactly when `load_path in pool` afterwards.
    """
    if pool is None:
        return source.fetch(location, dest, progress, plan, cancel)
    from ember.ckpt_format.index import open_checkpoint
    from ember.loader.hostmem import available_host_memory

    index = dataclasses.replace(plan.index, path=Path(load_path))
    if any(plan.sizes.get(p.file) != p.size for p in index.partitions):
        # An object of the wrong size: the load names it (PartitionSizeError), as without a pool.
        return source.fetch(location, dest, progress, plan, cancel)
    with pool.filling(index) as (lease, fill):
        # Already pooled (verified when it was filled, same fingerprint): only the disk copy is new.
        buffers = None if lease is not None else fill.reserve()
        del lease
        if buffers is None or fill.new_bytes > available_host_memory():
            return source.fetch(location, dest, progress, plan, cancel)  # the reservation goes back unused
        mirror = {p.file: buf for p, buf in zip(index.partitions, buffers)}
        stats = source.fetch(location, dest, progress, plan, cancel, mirror=mirror)
        downloaded = open_checkpoint(dest)  # sizes checked; its path is the only difference to `index`
        if downloaded.to_json() != index.to_json():
            # ember.json changed in S3 between plan() and the download: the loader will use the new
            # one, from disk, and verify the bytes against it.
            log.warning("%s changed while it was downloaded; not keeping it in DRAM", location)
            return stats
        verify_buffers(downloaded, buffers, location, threads=source.threads)
        if cancel is not None and cancel.is_set():
            raise StoreError(f"download of {location} was cancelled", kind=ErrorKind.UNAVAILABLE)
        fill.commit()  # the returned lease is dropped at once: nothing views the slabs yet
    return stats


def verify_buffers(index: Any, buffers: list[Any], location: S3Location, threads: int = 4) -> None:
    """Check every chunk checksum of `index` over the partition buffers (HostBuffers).

    Raises CorruptChunkError naming the S3 object, chunk and byte range of the first mismatch.
    xxh3 releases the GIL, so threads hash in parallel.
    """
    from ember.ckpt_format.checksum import verify_chunk
    from ember.ckpt_format.errors import CorruptChunkError

    chunks = [(p, i) for p in range(len(index.partitions)) for i in range(index.num_chunks(p))]

    def check(chunk: tuple[int, int]) -> None:
        p, i = chunk
        start, end = index.chunk_range(p, i)
        try:
            verify_chunk(index, p, i, buffers[p].view(start, end))
        except CorruptChunkError as exc:
            obj = f"s3://{location.bucket}/{location.key(index.partitions[p].file)}"
            detail = str(exc).removeprefix(f"{exc.file}: ")  # verify_chunk names the local file first
            raise CorruptChunkError(
                f"{obj}: {detail} (downloaded bytes; nothing was cached)",
                S3_CORRUPT_HINT,
                file=exc.file,
                chunk=exc.chunk,
                start=exc.start,
                end=exc.end,
            ) from None

    if threads <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            check(chunk)
        return
    with ThreadPoolExecutor(max_workers=min(threads, len(chunks)), thread_name_prefix="s3-verify") as pool:
        for _ in pool.map(check, chunks):  # map re-raises the first failure in chunk order
            pass
