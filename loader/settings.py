"""Reader thread count and read chunk size: defaults from bench/loader.py, overridable per call or env.

Measured (cold, interleaved, noisy shared VMs; details in the report of bench/loader.py):
- 2-core VM, ext4 on virtio: raw O_DIRECT reads into touched buffers are flat at 2.1-2.8 GB/s
  from 2 to 8 threads and 16 to 64 MiB (one thread is lower). Into fresh pages, 8 x 16 MiB did
  best (2.0 vs 1.7-1.9 GB/s): more requests in flight hide page zeroing behind other threads'
  I/O. With reused (DRAM-pool) buffers every cell from 4 to 32 MiB x 4 or 8 threads gave 1.9-2.0
  GB/s and checksum verification cost nothing measurable.
- H100 node (16 cores, virtio disk ~1.8 GB/s), disk -> GPU: 8 x 16 MiB best for Ember (1.40 GB/s),
  64 MiB reads worse (1.07-1.14): a smaller read finishes and starts its copy to the GPU sooner.
- 2-core VM again (2026-11-24, a quiet machine, fresh destination memory): 64 MiB reads beat
  16 MiB in every measurement: 1.79 vs 1.56 GB/s medians over 6 interleaved rounds, and the
  bench's tuning picked 32-64 MiB in three runs out of three (1.59-1.80 GB/s against 1.05-1.41
  for the 16 MiB default). Fewer, larger populate calls and requests cost less CPU per byte.
Hence 8 threads, with 64 MiB reads on CPU and 16 MiB reads to a GPU (which also bounds pinned
staging on GPU nodes to (8 + 2) x 16 MiB). EMBER_LOADER_THREADS and EMBER_LOADER_CHUNK_MB
override them for nodes whose disks differ (NVMe arrays want more requests in flight).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import LoaderError

DEFAULT_THREADS = 8
DEFAULT_CHUNK_MB = {"cpu": 64, "cuda": 16}  # by destination device type
MAX_THREADS = 64


@dataclass(frozen=True)
class IOSettings:
    threads: int
    chunk_bytes: int  # read size: a multiple of the checkpoint's checksum chunk


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise LoaderError(f"{name}={raw!r} is not an integer", f"set {name} to a whole number or unset it") from None


def resolve_io_settings(
    threads: int | None, chunk_mb: float | None, checksum_chunk: int, device_type: str = "cpu"
) -> IOSettings:
    """Turn the caller's (or env's) choice into valid settings for one checkpoint and device type.

    The read size is rounded to a multiple of the checkpoint's checksum chunk so each read is
    verified as whole chunks, with no bytes of a chunk arriving in two different reads.
    """
    if threads is None:
        threads = _env_int("EMBER_LOADER_THREADS") or DEFAULT_THREADS
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise LoaderError(f"threads must be an integer from 1 to {MAX_THREADS}, got {threads!r}")
    if chunk_mb is None:
        env = _env_int("EMBER_LOADER_CHUNK_MB")
        chunk_mb = env if env is not None else DEFAULT_CHUNK_MB.get(device_type, DEFAULT_CHUNK_MB["cpu"])
    if isinstance(chunk_mb, bool) or not isinstance(chunk_mb, (int, float)) or not chunk_mb > 0:
        raise LoaderError(f"chunk_mb must be a positive number of MiB, got {chunk_mb!r}")
    wanted = int(chunk_mb * (1 << 20))
    multiple = max(1, round(wanted / checksum_chunk))
    return IOSettings(threads=threads, chunk_bytes=multiple * checksum_chunk)
