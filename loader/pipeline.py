"""The moving parts of a load: reader threads, staging ring, CUDA copy stream, slice gathering.

Reader threads take read jobs from one shared list in file order; each thread reads a piece,
verifies its checksum chunks right away (xxh3 releases the GIL, so hashing overlaps the other
threads' I/O), then hands the bytes on. The first failure stops every thread before its next
job and is re-raised in the caller, so a bad chunk never yields a partial result.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ember.ckpt_format.checksum import verify_chunk
from ember.ckpt_format.index import CheckpointIndex

from .hostmem import PAGE, HostBuffer
from .plan import Item, ReadJob


def run_jobs(jobs: Sequence[ReadJob], threads: int, work: Callable[[ReadJob], None]) -> None:
    """Run `work` over `jobs` on up to `threads` threads; re-raise the first exception."""
    if not jobs:
        return
    n = min(threads, len(jobs))
    if n == 1:
        for job in jobs:
            work(job)
        return
    lock = threading.Lock()
    it = iter(jobs)
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        while not stop.is_set():
            with lock:
                job = next(it, None)
            if job is None:
                return
            try:
                work(job)
            except BaseException as exc:  # re-raised in the caller
                with lock:
                    errors.append(exc)
                stop.set()
                return

    workers = [threading.Thread(target=loop, name=f"ember-reader-{i}", daemon=True) for i in range(n)]
    for t in workers:
        t.start()
    try:
        for t in workers:
            t.join()
    except BaseException:
        stop.set()
        for t in workers:
            t.join()
        raise
    if errors:
        raise errors[0]


def verify_job(index: CheckpointIndex, job: ReadJob, view: memoryview) -> None:
    """Check every checksum chunk inside the piece just read (jobs start on chunk boundaries)."""
    cb = index.chunk_bytes
    first = job.start // cb
    last = -(-job.end // cb)
    for i in range(first, last):
        s, e = index.chunk_range(job.partition, i)
        verify_chunk(index, job.partition, i, view[s - job.start : e - job.start])


# ---------------------------------------------------------------------------------------------
# Staging ring: reused, already-touched chunks that pieces are read into before being moved on.


class Slot:
    """One staging chunk: host memory to read into, and on GPU a pinned chunk plus a device twin."""

    def __init__(self, host_view: memoryview, host_tensor: Any, device_tensor: Any = None) -> None:
        self.view = host_view
        self.host = host_tensor
        self.device = device_tensor


class Ring:
    """A bounded pool of slots. A slot returns to the ring only when its copy event has completed,
    so a model never needs to fit in pinned memory: at most `len(slots)` chunks are staged."""

    def __init__(self, slots: list[Slot]) -> None:
        self._free = list(slots)
        self._inflight: collections.deque[tuple[Any, Slot]] = collections.deque()
        self._cond = threading.Condition()

    def acquire(self) -> Slot:
        with self._cond:
            while True:
                if self._free:
                    return self._free.pop()
                if self._inflight:
                    event, slot = self._inflight.popleft()
                    break
                self._cond.wait()
        event.synchronize()  # oldest copy first: it is the one most likely done
        return slot

    def release(self, slot: Slot, event: Any = None) -> None:
        with self._cond:
            if event is None:
                self._free.append(slot)
            else:
                self._inflight.append((event, slot))
            self._cond.notify()


def host_ring(n: int, chunk_bytes: int) -> tuple[Ring, list[HostBuffer]]:
    """Slots in pre-faulted host memory (CPU sharded loads)."""
    bufs = [HostBuffer(chunk_bytes, populate=True) for _ in range(n)]
    return Ring([Slot(b.view(), b.tensor) for b in bufs]), bufs


def cuda_ring(n: int, chunk_bytes: int, device: Any, with_device_twin: bool) -> Ring:
    """Slots in pinned memory from torch's caching host allocator: after the first load the same
    page-locked chunks are handed back, so pinning is paid once per process, not per load."""
    import torch

    slots = []
    for _ in range(n):
        raw = torch.empty(chunk_bytes + PAGE, dtype=torch.uint8, pin_memory=True)
        skew = (-raw.data_ptr()) % PAGE  # O_DIRECT wants a page-aligned destination
        host = raw[skew : skew + chunk_bytes]
        view = memoryview(host.numpy()).cast("B")
        twin = torch.empty(chunk_bytes, dtype=torch.uint8, device=device) if with_device_twin else None
        slots.append(Slot(view, host, twin))
    return Ring(slots)


class CudaCopier:
    """Host-to-device copies on a dedicated stream, so they overlap reads and the compute stream."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def copy(self, dst: Any, src: Any) -> Any:
        torch = self.torch
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def run(self, fn: Callable[[], None]) -> Any:
        """Enqueue device work (slice gathering) on the copy stream; returns its completion event."""
        torch = self.torch
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            fn()
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def synchronize(self) -> None:
        self.stream.synchronize()


# ---------------------------------------------------------------------------------------------
# Gathering a rank's slice out of a piece of the file.


def scatter(item: Item, piece_start: int, src: Any, dst: Any) -> None:
    """Copy the part of `item` that lies in `src` (file bytes from `piece_start`) into `dst`.

    `src` and `dst` are flat uint8 tensors on the same device (`dst` is the whole destination
    buffer). Contiguous items are one byte-range copy; strided items (a split of a later dim)
    copy full rows as one 2-D strided copy and the partial rows at the piece's edges one by one.
    """
    x0 = max(piece_start, item.need_start)
    x1 = min(piece_start + src.numel(), item.need_end)
    if x0 >= x1:
        return
    if item.contiguous:
        d = item.dest_offset + (x0 - item.need_start)
        dst[d : d + (x1 - x0)].copy_(src[x0 - piece_start : x1 - piece_start])
        return
    outer, row, lo, hi = item.layout()
    width = hi - lo
    base = item.entry.offset
    y0, y1 = x0 - base, x1 - base  # relative to the tensor's first byte
    out = dst[item.dest_offset : item.dest_offset + outer * width].view(outer, width)
    full0 = -(-y0 // row)
    full1 = y1 // row
    if full1 > full0:
        s = full0 * row + base - piece_start
        block = src[s : s + (full1 - full0) * row].view(full1 - full0, row)[:, lo:hi]
        out[full0:full1].copy_(block)
    for r in {y0 // row, (y1 - 1) // row}:
        if full0 <= r < full1:
            continue
        a = max(y0, r * row + lo)
        b = min(y1, r * row + hi)
        if a < b:
            out[r, a - r * row - lo : b - r * row - lo].copy_(src[a + base - piece_start : b + base - piece_start])
