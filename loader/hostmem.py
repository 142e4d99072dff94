"""Page-aligned host buffers that reads land in, and what the host has free.

Why not `torch.empty`: O_DIRECT needs page-aligned destinations, and fresh pages are the hidden
bottleneck on these machines (first-touch page faults cap writes near 3 GB/s). A HostBuffer is an
anonymous mmap (always page-aligned) whose pages are faulted in bulk, chunk by chunk, by the
reader thread that is about to fill them (`madvise(MADV_POPULATE_WRITE)`, which releases the GIL
through ctypes), so page zeroing overlaps other threads' I/O instead of running serially up front.

Huge pages. Buffers of 2 MiB or more can be 2 MiB-aligned and asked for transparent huge pages
(`MADV_HUGEPAGE`). Measured on the 2-core VM (2026-11-24): faulting them in is 3.4x faster when
the memory is already backed by the hypervisor (11.6-12.2 vs 3.4-3.6 GB/s for 2 GiB), but slower
when the guest reports freed memory to the host (virtio-balloon free page reporting, as on
Firecracker): reported memory goes back in 2 MiB blocks, so a fresh huge page is always a
hypervisor fault while 4 KiB pages often reuse small blocks the host still backs (fresh 2 GB
loads, 6 interleaved rounds: 1.28 GB/s median with huge pages, 1.64 with 4 KiB pages). O_DIRECT
reads into touched huge pages were as fast or faster than into touched 4 KiB pages
(2.82 vs 2.69 GB/s in one run, 3.06 vs 1.59 in another).
So buffers ask for huge pages unless free page reporting is active. That includes DRAM-pool
slabs: once touched they are reused without faults whatever their page size, so what counts is
their first fill, which is fresh memory like any other (bench/coldstart.py's cold start from
disk took 0.36-0.37 s on this VM with huge-page pool slabs, 0.17-0.23 s without).
EMBER_LOADER_HUGEPAGES=1 or 0 forces it either way (0 also for nodes where THP compaction
stalls hurt).

When CUDA is present a buffer can be page-locked chunk by chunk (`cudaHostRegister`) so
host-to-device copies run asynchronously at full PCIe speed. The ranges are unregistered when the
last tensor viewing the buffer dies: the buffer's memory is owned by a ctypes array with a
finaliser, and tensors made by `torch.frombuffer` keep that owner alive.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

PAGE = mmap.PAGESIZE
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14; older kernels answer EINVAL and we touch pages instead.
_MADV_HUGEPAGE = 14
HUGE_PAGE = 2 << 20
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
_libc.memset.restype = ctypes.c_void_p
_populate_supported = True


def available_host_memory() -> int:
    """MemAvailable from /proc/meminfo: what can be allocated without swapping or the OOM killer."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


_VIRTIO_BALLOON = 0x0005
_BALLOON_F_REPORTING = 5  # feature bit: the guest tells the host which pages it freed


def free_page_reporting(devices: str = "/sys/bus/virtio/devices") -> bool:
    """Whether a virtio balloon with free page reporting is attached (freed memory goes back to
    the host, so fresh huge pages cost a hypervisor fault each)."""
    try:
        entries = os.listdir(devices)
    except OSError:
        return False
    for name in entries:
        try:
            with open(os.path.join(devices, name, "device"), encoding="ascii") as f:
                if int(f.read().strip(), 16) != _VIRTIO_BALLOON:
                    continue
            with open(os.path.join(devices, name, "features"), encoding="ascii") as f:
                bits = f.read().strip()
        except (OSError, ValueError):
            continue
        if len(bits) > _BALLOON_F_REPORTING and bits[_BALLOON_F_REPORTING] == "1":
            return True
    return False


def use_hugepages() -> bool:
    """EMBER_LOADER_HUGEPAGES=1/0 decides; otherwise huge pages unless free page reporting makes
    fresh huge pages slow (module docstring)."""
    raw = os.environ.get("EMBER_LOADER_HUGEPAGES", "").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    return not _reporting()


@functools.cache
def _reporting() -> bool:
    return free_page_reporting()


def prefault(address: int, nbytes: int) -> None:
    """Fault in (and zero) pages now, in bulk; GIL released while the kernel works."""
    global _populate_supported
    if nbytes <= 0:
        return
    if _populate_supported:
        if _libc.madvise(address, nbytes, _MADV_POPULATE_WRITE) == 0:
            return
        _populate_supported = False
    _libc.memset(address, 0, nbytes)


def _unregister_all(owner: Any) -> None:
    ranges = owner.__dict__.get("registered")
    if not ranges:
        return
    import torch

    try:
        cudart = torch.cuda.cudart()
    except (RuntimeError, AttributeError):  # interpreter shutdown: the driver cleans up the process
        return
    base = ctypes.addressof(owner)
    for start in ranges:
        cudart.cudaHostUnregister(base + start)
    ranges.clear()


def _lease_ended(proxy: Any) -> None:
    callback = proxy.__dict__.get("on_release")
    if callback is not None:
        callback()


_types: dict[tuple[str, int], type] = {}
_types_lock = threading.Lock()


def _array_type(kind: str, nbytes: int) -> type:
    """A ctypes byte-array subclass of one size with a finaliser: the owner of a mapping
    unregisters pinned ranges, a lease reports that the tensors made from it are all gone."""
    with _types_lock:
        cls = _types.get((kind, nbytes))
        if cls is None:
            final = _unregister_all if kind == "owner" else _lease_ended
            cls = type(f"HostMemory{kind.title()}", (ctypes.c_uint8 * nbytes,), {"__del__": final})
            _types[(kind, nbytes)] = cls
        return cls


class HostBuffer:
    """`nbytes` of page-aligned anonymous memory; `tensor` is a uint8 view that keeps it alive."""

    def __init__(self, nbytes: int, *, populate: bool = False, pin: bool = False) -> None:
        if nbytes < 0:
            raise ValueError(f"buffer size must be >= 0, got {nbytes}")
        self.nbytes = nbytes
        self.pin = pin
        mapped = max(-(-nbytes // PAGE) * PAGE, PAGE)
        huge = nbytes >= HUGE_PAGE and use_hugepages()
        # Huge pages need 2 MiB-aligned extents: over-map by 2 MiB and start at the aligned offset.
        mm = mmap.mmap(-1, mapped + (HUGE_PAGE if huge else 0), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        skew = 0
        if huge:
            base = ctypes.addressof(ctypes.c_uint8.from_buffer(mm))
            skew = (-base) % HUGE_PAGE
            _libc.madvise(base + skew, mapped, _MADV_HUGEPAGE)  # advice only: EINVAL is harmless
        # The owner is the only holder of the mapping: when it dies (no tensor left) the pages go.
        self._mapped = mapped
        self._owner = _array_type("owner", mapped).from_buffer(mm, skew)
        self._owner.registered = {}  # start -> end of each cudaHostRegister'ed range
        self._lock = threading.Lock()
        self.address = ctypes.addressof(self._owner)
        self._tensor = None
        if populate:
            prefault(self.address, mapped)

    @property
    def tensor(self):
        """Flat uint8 torch tensor over the buffer (created once; views of it share the memory)."""
        if self._tensor is None:
            import torch

            with self._lock:
                if self._tensor is None:
                    self._tensor = torch.frombuffer(self._owner, dtype=torch.uint8)[: self.nbytes]
        return self._tensor

    def lease(self, on_release: Callable[[], None]):
        """A new uint8 tensor over the buffer; `on_release()` runs once no tensor derived from it
        is alive any more (how the DRAM pool knows a buffer may be reused)."""
        import torch

        proxy = _array_type("lease", self._mapped).from_buffer(self._owner)
        proxy.on_release = on_release
        return torch.frombuffer(proxy, dtype=torch.uint8)[: self.nbytes]

    def view(self, start: int = 0, end: int | None = None) -> memoryview:
        end = self.nbytes if end is None else end
        return memoryview(self._owner).cast("B")[start:end]

    def prepare(self, start: int, end: int) -> None:
        """Make [start, end) ready to be written at full speed: faulted in, and page-locked if pinned.

        The range is widened to whole pages (madvise wants a page-aligned start), so callers such
        as S3 ranges of any size need not align it."""
        start -= start % PAGE
        end = min(-(-end // PAGE) * PAGE, self._mapped)
        if end <= start:
            return
        prefault(self.address + start, end - start)
        if self.pin:
            self.register(start, end)

    def register(self, start: int, end: int) -> None:
        """Page-lock [start, end) for async device copies. Parts already locked (a recycled buffer
        filled before with another read size) are skipped: CUDA refuses to lock a page twice."""
        if end <= start:
            return
        import torch

        with self._lock:
            for lo, hi in self._gaps(start, end):
                err = torch.cuda.cudart().cudaHostRegister(self.address + lo, hi - lo, 0)
                if int(err) != 0:
                    raise RuntimeError(f"cudaHostRegister of {hi - lo} bytes failed with CUDA error {int(err)}")
                self._owner.registered[lo] = hi

    def _gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        gaps, pos = [], start
        for lo, hi in sorted(self._owner.registered.items()):
            if hi <= pos or lo >= end:
                continue
            if lo > pos:
                gaps.append((pos, lo))
            pos = max(pos, hi)
        if pos < end:
            gaps.append((pos, end))
        return gaps

    def pinned_pieces(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """Split [start, end) at registration boundaries, so no device copy spans two registrations."""
        bounds = list(self._owner.registered.items())
        cuts = sorted({b for s, e in bounds for b in (s, e) if start < b < end})
        pos = start
        for cut in [*cuts, end]:
            if cut > pos:
                yield pos, cut
                pos = cut

    @property
    def registered_bytes(self) -> int:
        return sum(e - s for s, e in list(self._owner.registered.items()))
