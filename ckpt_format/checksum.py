"""Chunk checksums: xxh3-64 over fixed-size chunks of each partition file.

Chunked rather than per-file so a loader can verify each chunk as soon as it is read (and name
the exact bad chunk), and per-chunk rather than per-tensor so the check is independent of the
tensor layout.
"""

from __future__ import annotations

from collections.abc import Callable

import xxhash

from ember.ckpt_format.errors import CorruptChunkError
from ember.ckpt_format.index import CheckpointIndex

REPAIR_HINT = (
    "the checkpoint is damaged: re-run `ember convert` from the original model, "
    "or re-download/re-copy the checkpoint"
)


def chunk_digest(buf) -> str:
    """xxh3-64 of a bytes-like object as 16 lowercase hex digits; a memoryview is not copied."""
    return xxhash.xxh3_64_hexdigest(buf)


def verify_chunk(index: CheckpointIndex, partition: int, chunk_i: int, buf) -> None:
    """Raise CorruptChunkError unless `buf` holds exactly chunk `chunk_i` of `partition`."""
    start, end = index.chunk_range(partition, chunk_i)
    file = index.partition_path(partition)
    length = memoryview(buf).nbytes
    if length != end - start:
        raise CorruptChunkError(
            f"{file}: chunk {chunk_i} (bytes {start}..{end}) is {length} bytes long, "
            f"expected {end - start}",
            REPAIR_HINT,
            file=file,
            chunk=chunk_i,
            start=start,
            end=end,
        )
    expected = index.partitions[partition].checksums[chunk_i]
    actual = chunk_digest(buf)
    if actual != expected:
        raise CorruptChunkError(
            f"{file}: checksum mismatch in chunk {chunk_i} (bytes {start}..{end}): "
            f"expected xxh3-64 {expected}, found {actual}",
            REPAIR_HINT,
            file=file,
            chunk=chunk_i,
            start=start,
            end=end,
        )


def verify_partition(
    index: CheckpointIndex,
    partition: int,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Read one partition file chunk by chunk and verify every checksum.

    `progress(n)` is called with the byte count of each verified chunk.
    """
    entry = index.partitions[partition]
    buf = bytearray(min(index.chunk_bytes, max(entry.size, 1)))
    view = memoryview(buf)
    with open(index.partition_path(partition), "rb", buffering=0) as f:
        for i in range(index.num_chunks(partition)):
            start, end = index.chunk_range(partition, i)
            n = _read_full(f, view[: end - start])
            verify_chunk(index, partition, i, view[:n])
            if progress is not None:
                progress(n)


def verify_all(index: CheckpointIndex, progress: Callable[[int], None] | None = None) -> None:
    """Verify every chunk of every partition (what `ember inspect --verify` runs)."""
    for p in range(len(index.partitions)):
        verify_partition(index, p, progress)


def _read_full(f, view: memoryview) -> int:
    """readinto until `view` is full or EOF; returns the bytes read (short only at EOF)."""
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            break
        done += n
    return done
