"""Page-aligned host buffers that reads land in, and what the host has free.

Why not `torch.empty`: O_DIRECT needs page-aligned destinations, and fresh pages are the hidden
bottleneck on these machines (first-touch page faults cap writes near 3 GB/s). A HostBuffer is an
anonymous mmap (always page-aligned) whose pages are faulted in bulk, chunk by chunk, by the
reader thread that is about to fill them (`madvise(MADV_POPULATE_WRITE)`, which releases the GIL
through ctypes), so page zeroing overlaps other threads' I/O instead of running serially up front.

When CUDA is present a buffer can be page-locked chunk by chunk (`cudaHostRegister`) so
host-to-device copies run asynchronously at full PCIe speed. The ranges are unregistered when the
last tensor viewing the buffer dies: the buffer's memory is owned by a ctypes array with a
finaliser, and tensors made by `torch.frombuffer` keep that owner alive.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

PAGE = mmap.PAGESIZE
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14; older kernels answer EINVAL and we touch pages instead.
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
        mapped = max(nbytes, PAGE)
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if populate:
            flags |= mmap.MAP_POPULATE
        mm = mmap.mmap(-1, mapped, flags=flags)
        # The owner is the only holder of the mapping: when it dies (no tensor left) the pages go.
        self._mapped = mapped
        self._owner = _array_type("owner", mapped).from_buffer(mm)
        self._owner.registered = {}  # start -> end of each cudaHostRegister'ed range
        self._lock = threading.Lock()
        self.address = ctypes.addressof(self._owner)
        self._tensor = None

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
        """Make [start, end) ready to be written at full speed: faulted in, and page-locked if pinned."""
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
