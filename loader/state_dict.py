"""load_state_dict: an Ember checkpoint (or one rank's slice of it) into tensors on a device.

Four paths, picked per call:
- disk, full, CPU: reader threads O_DIRECT-read each piece straight into its final place in one
  page-aligned buffer per partition (a DRAM-pool buffer when a pool is given); tensors are views.
- disk, full, CUDA: pieces land in a small ring of pinned chunks (or in the pool's buffers, which
  are pinned) and are copied asynchronously on a side stream into one device buffer per
  partition while the next pieces are read; a chunk is reused once its copy event completed.
- disk, sharded (tp_size > 1): only the rank's byte ranges are read (see plan.py), through a
  staging ring, and its slices gathered into one destination buffer (on GPU: gathered on the
  device, after a contiguous host-to-device copy of each piece).
- DRAM hit: no disk I/O. CPU full loads are zero-copy views of the pooled buffers; sharded CPU
  loads view dim-0 slices and copy strided ones; CUDA loads copy from the pinned pool buffers.
Memory for the destination is checked before the first byte is read, and any failure (a corrupt
chunk included) raises with nothing returned and the pool unchanged.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ember.ckpt_format.index import CheckpointIndex, open_checkpoint

from .direct_io import PartitionFile, log_fallbacks, open_partition
from .errors import InsufficientMemoryError, LoaderError
from .hostmem import HostBuffer, available_host_memory
from .pipeline import CudaCopier, cuda_ring, host_ring, run_jobs, scatter, verify_job
from .plan import ShardedPlan, full_jobs, is_sharded, shard_slices, sharded_plan
from .pool import DramPool, Fill, Lease
from .settings import IOSettings, resolve_io_settings
from .stats import BandwidthTracker, LoadStats, _publish
from .tp import ShardPlan, validate_tp

if TYPE_CHECKING:
    import torch

#: Strided slices served from DRAM to a GPU go through a device temporary; cap what is queued.
_MAX_DEVICE_TEMP = 512 << 20


@dataclass
class _Outcome:
    state: dict[str, Any]
    tier: str
    nbytes: int
    files: list[PartitionFile] | None = None
    zero_copy: bool = False


@dataclass
class _Load:
    index: CheckpointIndex
    device: Any  # torch.device
    io: IOSettings
    verify: bool

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def load_state_dict(
    path: str | os.PathLike[str],
    device: str | Any = "cpu",
    *,
    threads: int | None = None,
    chunk_mb: float | None = None,
    verify: bool = True,
    tp_rank: int = 0,
    tp_size: int = 1,
    shard_plan: ShardPlan | None = None,
    pool: DramPool | None = None,
    tracker: BandwidthTracker | None = None,
) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint at `path` (aliases as the same tensor object) on `device`.

    threads / chunk_mb: reader threads and read size (defaults per device type in
    ember.loader.settings, env EMBER_LOADER_THREADS / EMBER_LOADER_CHUNK_MB). verify: check each chunk's xxh3-64 while
    reading (CorruptChunkError names the file and chunk). tp_rank / tp_size / shard_plan: load
    only this rank's slices (`torch.chunk(full, tp_size, dim)[tp_rank]`, see ember.loader.tp).
    pool: a DramPool serving hits without disk I/O and filled by full disk loads; on CPU the
    returned tensors then share the pool's memory and are read-only by contract.
    tracker: receives this load's LoadStats (also available from last_load_stats()).
    """
    t0 = time.perf_counter()
    validate_tp(tp_rank, tp_size)
    if not isinstance(verify, bool):
        raise LoaderError(f"verify must be True or False, got {verify!r}")
    if pool is not None and not isinstance(pool, DramPool):
        raise LoaderError(f"pool must be an ember.loader.DramPool, got {type(pool).__name__}")
    index = open_checkpoint(path)
    dev = resolve_device(device)
    io = resolve_io_settings(threads, chunk_mb, index.chunk_bytes, dev.type)
    slices = shard_slices(index, shard_plan, tp_rank, tp_size)
    sharded = is_sharded(slices)
    load = _Load(index, dev, io, verify)

    outcome: _Outcome | None = None
    if pool is not None:
        lease = pool.lease(index)
        if lease is None and not sharded:
            with pool.filling(index) as (lease, fill):
                if lease is None:
                    outcome = _disk_full(load, fill)
        if lease is not None:
            outcome = _from_lease(load, lease, slices, sharded)
            del lease
    if outcome is None:
        outcome = _disk_sharded(load, slices) if sharded else _disk_full(load, None)

    files = outcome.files or []
    stats = LoadStats(
        path=str(index.path),
        tier=outcome.tier,  # type: ignore[arg-type]
        device=str(dev),
        nbytes=outcome.nbytes,
        seconds=time.perf_counter() - t0,
        verify=verify if outcome.tier == "disk" else False,
        direct_io=bool(files) and all(f.direct for f in files),
        fallback_reason="; ".join(sorted({f.fallback_reason for f in files if f.fallback_reason})) or None,
        threads=io.threads,
        chunk_bytes=io.chunk_bytes,
        tp_rank=tp_rank,
        tp_size=tp_size,
        zero_copy=outcome.zero_copy,
    )
    _publish(stats, tracker)
    return outcome.state


def resolve_device(device: str | Any) -> Any:
    """A torch.device the loader supports (cpu, cuda[:N]), with a clear error otherwise."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise LoaderError(f"unknown device {device!r}", "use 'cpu' or 'cuda[:N]'") from exc
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LoaderError(
                f"device {device!r} requested but CUDA is not available",
                "load with device='cpu', or run on a node with an NVIDIA GPU and a CUDA build of torch",
            )
        idx = torch.cuda.current_device() if dev.index is None else dev.index
        if not 0 <= idx < torch.cuda.device_count():
            raise LoaderError(f"device {device!r} does not exist ({torch.cuda.device_count()} GPUs)")
        return torch.device("cuda", idx)
    raise LoaderError(f"unsupported device {device!r}", "the loader supports 'cpu' and 'cuda[:N]'")


# ---- memory checks --------------------------------------------------------------------------


def _check_host(needed: int) -> None:
    avail = available_host_memory()
    if needed > avail:
        raise InsufficientMemoryError("host memory (RAM)", needed, avail)


def _check_device(device: Any, needed: int) -> None:
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if needed > free:
        raise InsufficientMemoryError(f"memory on {device}", needed, free)


# ---- tensors from buffers -------------------------------------------------------------------


def _views(index: CheckpointIndex, bases: list[Any], device: Any) -> dict[str, Any]:
    """Tensors as views of flat uint8 partition buffers; aliases are the same objects."""
    import torch

    from ember.ckpt_format.dtypes import to_torch

    state: dict[str, Any] = {}
    for name, e in index.tensors.items():
        dtype = to_torch(e.dtype)
        if e.nbytes == 0:
            state[name] = torch.empty(e.shape, dtype=dtype, device=device)
        else:
            state[name] = bases[e.partition][e.offset : e.offset + e.nbytes].view(dtype).view(e.shape)
    for alias, target in index.aliases.items():
        state[alias] = state[target]
    return state


def _plan_views(plan: ShardedPlan, dest: Any, device: Any) -> dict[str, Any]:
    import torch

    from ember.ckpt_format.dtypes import to_torch

    made: dict[int, Any] = {}
    state: dict[str, Any] = {}
    for name, i in plan.names.items():
        if i not in made:
            it = plan.items[i]
            dtype = to_torch(it.entry.dtype)
            if it.local_nbytes == 0:
                made[i] = torch.empty(it.local_shape, dtype=dtype, device=device)
            else:
                raw = dest[it.dest_offset : it.dest_offset + it.local_nbytes]
                made[i] = raw.view(dtype).view(it.local_shape)
        state[name] = made[i]
    return state


# ---- disk paths -----------------------------------------------------------------------------


def _open_files(index: CheckpointIndex) -> list[PartitionFile]:
    files: list[PartitionFile] = []
    try:
        for p in range(len(index.partitions)):
            files.append(open_partition(index.partition_path(p)))
    except BaseException:
        for f in files:
            f.close()
        raise
    log_fallbacks(files)
    return files


def _disk_full(load: _Load, fill: Fill | None) -> _Outcome:
    import torch

    index, io = load.index, load.io
    total = index.total_bytes
    bufs: list[HostBuffer] | None = None
    if fill is not None:
        bufs = fill.reserve()
        if bufs is None:
            fill = None  # does not fit the pool: load it around the pool
        else:
            _check_host(fill.new_bytes)
    if bufs is None and not load.cuda:
        _check_host(total)
        bufs = [HostBuffer(p.size) for p in index.partitions]
    if load.cuda:
        _check_device(load.device, total)
        if bufs is None:
            _check_host((io.threads + 2) * io.chunk_bytes)

    jobs = full_jobs(index, io.chunk_bytes)
    files = _open_files(index)
    try:
        if not load.cuda:
            assert bufs is not None

            def work(job) -> None:
                buf = bufs[job.partition]
                buf.prepare(job.start, job.end)
                view = buf.view(job.start, job.end)
                files[job.partition].read_into(view, job.start)
                if load.verify:
                    verify_job(index, job, view)

            run_jobs(jobs, io.threads, work)
            if fill is not None:
                bases = fill.commit().tensors
            else:
                bases = [b.tensor for b in bufs]
            return _Outcome(_views(index, bases, load.device), "disk", total, files)

        dev_bufs = [torch.empty(p.size, dtype=torch.uint8, device=load.device) for p in index.partitions]
        copier = CudaCopier(load.device)
        try:
            if bufs is not None:  # pool buffers are the staging area (pinned chunk by chunk)
                staged = bufs

                def work(job) -> None:
                    buf = staged[job.partition]
                    buf.prepare(job.start, job.end)
                    view = buf.view(job.start, job.end)
                    files[job.partition].read_into(view, job.start)
                    if load.verify:
                        verify_job(index, job, view)
                    # a recycled buffer may be page-locked in other pieces: copies never span two
                    for s, e in buf.pinned_pieces(job.start, job.end):
                        copier.copy(dev_bufs[job.partition][s:e], buf.tensor[s:e])

            else:
                ring = cuda_ring(io.threads + 2, io.chunk_bytes, load.device, with_device_twin=False)

                def work(job) -> None:
                    slot = ring.acquire()
                    event = None
                    try:
                        view = slot.view[: job.nbytes]
                        files[job.partition].read_into(view, job.start)
                        if load.verify:
                            verify_job(index, job, view)
                        dst = dev_bufs[job.partition][job.start : job.end]
                        event = copier.copy(dst, slot.host[: job.nbytes])
                    finally:
                        ring.release(slot, event)

            run_jobs(jobs, io.threads, work)
        finally:
            copier.synchronize()
        if fill is not None:
            fill.commit()
        return _Outcome(_views(index, dev_bufs, load.device), "disk", total, files)
    finally:
        for f in files:
            f.close()


def _disk_sharded(load: _Load, slices) -> _Outcome:
    import torch

    index, io = load.index, load.io
    plan = sharded_plan(index, slices, chunk_bytes=io.chunk_bytes, verify=load.verify)
    nslots = max(1, min(io.threads, len(plan.jobs))) + 2
    staging = nslots * io.chunk_bytes
    if load.cuda:
        _check_host(staging)
        _check_device(load.device, plan.dest_bytes + staging)
    else:
        _check_host(plan.dest_bytes + staging)

    files = _open_files(index)
    try:
        items = plan.items
        if not load.cuda:
            dest_buf = HostBuffer(plan.dest_bytes)
            dest = dest_buf.tensor
            ring, _slabs = host_ring(nslots, io.chunk_bytes)

            def work(job) -> None:
                slot = ring.acquire()
                try:
                    view = slot.view[: job.nbytes]
                    files[job.partition].read_into(view, job.start)
                    if load.verify:
                        verify_job(index, job, view)
                    src = slot.host[: job.nbytes]
                    for i in job.items:
                        scatter(items[i], job.start, src, dest)
                finally:
                    ring.release(slot)

            run_jobs(plan.jobs, io.threads, work)
            return _Outcome(_plan_views(plan, dest, load.device), "disk", plan.read_bytes, files)

        dest = torch.empty(plan.dest_bytes, dtype=torch.uint8, device=load.device)
        ring = cuda_ring(nslots, io.chunk_bytes, load.device, with_device_twin=True)
        copier = CudaCopier(load.device)

        def work(job) -> None:
            slot = ring.acquire()
            event = None
            try:
                view = slot.view[: job.nbytes]
                files[job.partition].read_into(view, job.start)
                if load.verify:
                    verify_job(index, job, view)
                src = slot.device[: job.nbytes]
                copier.copy(src, slot.host[: job.nbytes])

                def gather() -> None:
                    for i in job.items:
                        scatter(items[i], job.start, src, dest)

                event = copier.run(gather)
            finally:
                ring.release(slot, event)

        try:
            run_jobs(plan.jobs, io.threads, work)
        finally:
            copier.synchronize()
        return _Outcome(_plan_views(plan, dest, load.device), "disk", plan.read_bytes, files)
    finally:
        for f in files:
            f.close()


# ---- DRAM hits ------------------------------------------------------------------------------


def _from_lease(load: _Load, lease: Lease, slices, sharded: bool) -> _Outcome:
    import torch

    index = load.index
    total = index.total_bytes
    if not load.cuda:
        if not sharded:
            return _Outcome(_views(index, lease.tensors, load.device), "dram", total, zero_copy=True)
        full = _views(index, lease.tensors, load.device)
        state: dict[str, Any] = {}
        made: dict[tuple[str, Any], Any] = {}
        moved = 0
        for name, (entry, sl) in slices.items():
            key = (entry.name, sl)
            if key not in made:
                t = full[entry.name]
                if not sl.is_whole:
                    t = t.narrow(sl.dim, sl.start, sl.stop - sl.start)
                    if not t.is_contiguous():
                        t = t.contiguous()
                        moved += t.numel() * t.element_size()
                made[key] = t
            state[name] = made[key]
        return _Outcome(state, "dram", moved or total, zero_copy=moved == 0)

    copier = CudaCopier(load.device)
    try:
        if not sharded:
            _check_device(load.device, total)
            dev_bufs = [torch.empty(p.size, dtype=torch.uint8, device=load.device) for p in index.partitions]
            for p, buf in enumerate(lease.buffers):
                for s, e in buf.pinned_pieces(0, buf.nbytes):
                    copier.copy(dev_bufs[p][s:e], lease.tensors[p][s:e])
            copier.synchronize()
            return _Outcome(_views(index, dev_bufs, load.device), "dram", total)

        plan = sharded_plan(index, slices, chunk_bytes=load.io.chunk_bytes, verify=False)
        _check_device(load.device, plan.dest_bytes + _MAX_DEVICE_TEMP)
        dest = torch.empty(plan.dest_bytes, dtype=torch.uint8, device=load.device)
        temps: list[Any] = []
        temp_bytes = 0
        moved = 0
        for item in plan.items:
            if item.local_nbytes == 0:
                continue
            p = item.entry.partition
            buf, src = lease.buffers[p], lease.tensors[p]
            if item.contiguous:
                for s, e in buf.pinned_pieces(item.need_start, item.need_end):
                    d = item.dest_offset + s - item.need_start
                    copier.copy(dest[d : d + e - s], src[s:e])
                moved += item.need_end - item.need_start
                continue
            off, n = item.entry.offset, item.entry.nbytes
            temp = torch.empty(n, dtype=torch.uint8, device=load.device)
            for s, e in buf.pinned_pieces(off, off + n):
                copier.copy(temp[s - off : e - off], src[s:e])
            copier.run(lambda item=item, temp=temp, off=off: scatter(item, off, temp, dest))
            moved += n
            temps.append(temp)
            temp_bytes += n
            if temp_bytes > _MAX_DEVICE_TEMP:
                copier.synchronize()
                temps.clear()
                temp_bytes = 0
        copier.synchronize()
        return _Outcome(_plan_views(plan, dest, load.device), "dram", moved)
    finally:
        copier.synchronize()
