"""Open partition files for direct I/O, and positional reads that fill a buffer exactly.

O_DIRECT skips the page cache: bytes go from the disk straight into our (page-aligned,
pre-faulted) destination, with no second copy and no cache pollution on a node that streams
models far bigger than its RAM. Filesystems that refuse it (tmpfs, some FUSE/overlay mounts)
answer EINVAL at open or on the first read; we then read buffered with
posix_fadvise(SEQUENTIAL) so readahead is as aggressive as the kernel allows, and say why once.
`os.preadv` releases the GIL, so several reader threads keep several requests in flight.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LoaderError

log = logging.getLogger("ember.loader")

_O_DIRECT = getattr(os, "O_DIRECT", 0)


@dataclass
class PartitionFile:
    """An open partition: `direct` says whether reads bypass the page cache."""

    path: Path
    fd: int
    direct: bool
    fallback_reason: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _retired: list[int] = field(default_factory=list, repr=False)

    def close(self) -> None:
        for fd in [self.fd, *self._retired]:
            if fd >= 0:
                os.close(fd)
        self.fd = -1
        self._retired.clear()

    def _switch_to_buffered(self, reason: str) -> None:
        with self._lock:
            if not self.direct:
                return
            fd = _open_buffered(self.path)
            # The direct fd stays open until close(): another thread may be about to read with
            # it, and a closed number could be reused by an unrelated open in the meantime.
            self._retired.append(self.fd)
            self.fd = fd
            self.direct = False
            self.fallback_reason = reason

    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill `buf` with the file's bytes at `offset`; a short file is an error, not zeros."""
        done = 0
        total = len(buf)
        while done < total:
            try:
                n = os.preadv(self.fd, [buf[done:]], offset + done)
            except OSError as exc:
                if exc.errno == errno.EINVAL and self.direct:
                    # Some filesystems accept O_DIRECT at open and refuse the read itself.
                    self._switch_to_buffered(f"direct read refused by the filesystem ({exc.strerror})")
                    continue
                raise LoaderError(
                    f"reading {self.path} at byte {offset + done} failed: {exc.strerror}",
                    "check the disk (dmesg) and re-convert or re-download the checkpoint",
                ) from exc
            if n == 0:
                raise LoaderError(
                    f"{self.path} ended at byte {offset + done}, before the {offset + total} its index promises",
                    "the file changed while loading; re-convert or re-download the checkpoint",
                )
            done += n


def _open_buffered(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    return fd


def open_partition(path: Path, *, direct: bool = True) -> PartitionFile:
    """Open with O_DIRECT where the filesystem allows it, else buffered + sequential readahead."""
    if direct and _O_DIRECT:
        try:
            fd = os.open(path, os.O_RDONLY | _O_DIRECT | getattr(os, "O_CLOEXEC", 0))
            return PartitionFile(path, fd, True)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise LoaderError(f"cannot open {path}: {exc.strerror}", "check the path and permissions") from exc
            reason = f"O_DIRECT refused by the filesystem ({exc.strerror})"
    else:
        reason = "direct I/O disabled" if _O_DIRECT else "O_DIRECT not available on this platform"
    try:
        fd = _open_buffered(path)
    except OSError as exc:
        raise LoaderError(f"cannot open {path}: {exc.strerror}", "check the path and permissions") from exc
    return PartitionFile(path, fd, False, reason)


def log_fallbacks(files: list[PartitionFile]) -> str | None:
    """Log once per load why direct I/O was not used; return the reason for the load's stats."""
    reasons = {f.fallback_reason for f in files if not f.direct and f.fallback_reason}
    if not reasons:
        return None
    reason = "; ".join(sorted(reasons))
    where = files[0].path.parent if files else "?"
    log.warning("direct I/O not used for %s: %s; reading buffered with sequential readahead", where, reason)
    return reason
