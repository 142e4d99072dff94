"""Which bytes to read, in which pieces, and where each tensor (or rank slice) ends up.

Pure offset arithmetic on the index; no torch and no I/O, so it is cheap to test exhaustively.

Full loads read every partition whole, in `chunk_bytes` pieces, straight into one destination
buffer per partition (tensors are views at their index offsets).

Sharded loads (tp_size > 1) read only what a rank needs. A split of dim 0 (or of any dim after
leading dims of size 1) is one contiguous byte range. A split of a later dim is strided: one
short piece per row. Reading those pieces one by one would be thousands of tiny I/Os per tensor
(a 4096-row down_proj means 4096 reads of a few KiB each), and checksums cover whole chunks
anyway, so the whole tensor is read and the rank's columns are gathered from memory. Needed
ranges are widened to whole checksum chunks when verifying (to the alignment otherwise),
neighbours closer than `merge_gap` are merged into one read, and merged ranges are cut into
reads of at most `chunk_bytes`.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from ember.ckpt_format.index import CheckpointIndex, TensorEntry
from ember.ckpt_format.spec import DTYPE_ITEMSIZE, align_up

from .tp import ShardPlan, Slice, slice_for

MERGE_GAP = 1 << 20


@dataclass(frozen=True)
class ReadJob:
    """Bytes [start, end) of partition `partition`, read (and verified) as one piece."""

    partition: int
    start: int
    end: int
    items: tuple[int, ...] = ()  # sharded loads: indices of the items this piece feeds

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Item:
    """One output tensor (or rank slice): where its bytes are in the file and in the destination."""

    entry: TensorEntry
    slice: Slice
    need_start: int  # absolute partition offsets of the bytes this item is built from
    need_end: int
    dest_offset: int
    local_shape: tuple[int, ...]
    local_nbytes: int

    def layout(self) -> tuple[int, int, int, int]:
        """(outer, row_bytes, lo, hi): the item is bytes [lo, hi) of each of `outer` rows of the tensor."""
        return self.slice.byte_layout(self.entry.shape, DTYPE_ITEMSIZE[self.entry.dtype])

    @property
    def contiguous(self) -> bool:
        """True when the item's bytes are one run in the file (copied as they are)."""
        outer, row, lo, hi = self.layout()
        return outer == 1 or (lo == 0 and hi == row)


@dataclass(frozen=True)
class ShardedPlan:
    items: list[Item]
    names: dict[str, int]  # output name -> item index (an alias shares its target's item if sliced alike)
    dest_bytes: int
    jobs: list[ReadJob]

    @property
    def read_bytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)


def full_jobs(index: CheckpointIndex, chunk_bytes: int) -> list[ReadJob]:
    """Every partition whole, cut into reads of `chunk_bytes` (a partition's last read may be short)."""
    jobs = []
    for p, part in enumerate(index.partitions):
        for start in range(0, part.size, chunk_bytes):
            jobs.append(ReadJob(p, start, min(start + chunk_bytes, part.size)))
    return jobs


def shard_slices(
    index: CheckpointIndex, plan: ShardPlan | None, tp_rank: int, tp_size: int
) -> dict[str, tuple[TensorEntry, Slice]]:
    """Every output name with its canonical tensor entry and this rank's slice of it."""
    out = {}
    for name in index.names():
        entry = index.resolve(name)
        out[name] = (entry, slice_for(name, entry.shape, plan, tp_rank, tp_size))
    return out


def is_sharded(slices: dict[str, tuple[TensorEntry, Slice]]) -> bool:
    return any(not s.is_whole for _, s in slices.values())


def sharded_plan(
    index: CheckpointIndex,
    slices: dict[str, tuple[TensorEntry, Slice]],
    *,
    chunk_bytes: int,
    verify: bool,
    merge_gap: int = MERGE_GAP,
) -> ShardedPlan:
    items: list[Item] = []
    by_key: dict[tuple[str, Slice], int] = {}
    names: dict[str, int] = {}
    dest = 0
    for name, (entry, sl) in slices.items():
        key = (entry.name, sl)
        if key not in by_key:
            itemsize = DTYPE_ITEMSIZE[entry.dtype]
            local_shape = sl.local_shape(entry.shape)
            local_nbytes = math.prod(local_shape) * itemsize
            outer, _row, lo, hi = sl.byte_layout(entry.shape, itemsize)
            if local_nbytes == 0:
                need = (entry.offset, entry.offset)
            elif outer == 1:
                need = (entry.offset + lo, entry.offset + hi)
            else:  # strided (or every row whole): built from the whole tensor
                need = (entry.offset, entry.offset + entry.nbytes)
            by_key[key] = len(items)
            items.append(Item(entry, sl, need[0], need[1], dest, local_shape, local_nbytes))
            dest = align_up(dest + local_nbytes, index.alignment)
        names[name] = by_key[key]
    granule = index.chunk_bytes if verify else index.alignment
    jobs = _jobs_for_items(index, items, granule, chunk_bytes, merge_gap)
    return ShardedPlan(items, names, dest, jobs)


def _jobs_for_items(
    index: CheckpointIndex, items: list[Item], granule: int, chunk_bytes: int, merge_gap: int
) -> list[ReadJob]:
    jobs: list[ReadJob] = []
    for p, part in enumerate(index.partitions):
        mine = sorted(
            (i for i, it in enumerate(items) if it.entry.partition == p and it.need_end > it.need_start),
            key=lambda i: items[i].need_start,
        )
        if not mine:
            continue
        ranges: list[list[int]] = []
        for i in mine:
            start = items[i].need_start // granule * granule
            end = min(align_up(items[i].need_end, granule), part.size)
            if ranges and start <= ranges[-1][1] + merge_gap:
                ranges[-1][1] = max(ranges[-1][1], end)
            else:
                ranges.append([start, end])
        starts = [items[i].need_start for i in mine]
        # running max of ends: non-decreasing even where two slices of one tensor overlap
        max_end: list[int] = []
        for i in mine:
            max_end.append(max(items[i].need_end, max_end[-1] if max_end else 0))
        for start, end in ranges:
            for js in range(start, end, chunk_bytes):
                je = min(js + chunk_bytes, end)
                lo = bisect.bisect_right(max_end, js)
                hi = bisect.bisect_left(starts, je)
                feeds = tuple(i for i in mine[lo:hi] if items[i].need_end > js)
                if feeds:
                    jobs.append(ReadJob(p, js, je, feeds))
    return jobs
