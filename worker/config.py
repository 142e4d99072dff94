"""The worker's configuration: what `ember worker` flags become, validated in one place.

Kept free of grpc and torch so the CLI can import it (and its error type) cheaply.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from ember.worker.memory import host_memory_bytes
from ember.worker.s3_source import S3Settings

GB = 10**9
DEFAULT_DISK_CACHE_GB = 100.0
DRAM_DEFAULT_FRACTION = 0.25


class WorkerConfigError(ValueError):
    """A worker option is invalid; the message names the flag and what to use instead."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


@dataclass
class WorkerConfig:
    cache_dir: Path
    host: str = "127.0.0.1"
    port: int = 50061
    controller: str | None = None
    advertise_address: str | None = None
    node_id: str | None = None
    disk_cache_gb: float = DEFAULT_DISK_CACHE_GB
    dram_cache_gb: float | None = None  # None: a quarter of host memory
    device: str = "cpu"
    metrics_port: int | None = None
    token: str | None = None
    # S3 client bounds; S3Settings says why these defaults.
    s3_connect_timeout_s: float = S3Settings.connect_timeout_s
    s3_read_timeout_s: float = S3Settings.read_timeout_s
    s3_max_attempts: int = S3Settings.max_attempts

    def validate(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise WorkerConfigError(f"--device must be cpu or cuda, got {self.device!r}")
        if not 0 <= self.port <= 65535:
            raise WorkerConfigError(f"--port must be 0-65535, got {self.port}")
        if self.metrics_port is not None and not 0 < self.metrics_port <= 65535:
            raise WorkerConfigError(f"--metrics-port must be 1-65535, got {self.metrics_port}")
        if self.disk_cache_gb < 0:
            raise WorkerConfigError(f"--disk-cache-gb must be >= 0, got {self.disk_cache_gb}")
        if self.dram_cache_gb is not None and self.dram_cache_gb < 0:
            raise WorkerConfigError(f"--dram-cache-gb must be >= 0 (0 disables the DRAM tier), got {self.dram_cache_gb}")
        for flag, seconds in (("--s3-connect-timeout", self.s3_connect_timeout_s),
                              ("--s3-read-timeout", self.s3_read_timeout_s)):
            if not seconds > 0:
                raise WorkerConfigError(f"{flag} must be > 0 seconds, got {seconds}")
        if self.s3_max_attempts < 1:
            raise WorkerConfigError(f"--s3-max-attempts must be >= 1 (1: no retries), got {self.s3_max_attempts}")
        for flag, value in (("--controller", self.controller), ("--advertise-address", self.advertise_address)):
            if value is not None and not _is_host_port(value):
                raise WorkerConfigError(f"{flag} must be HOST:PORT, got {value!r}")

    def s3_settings(self) -> S3Settings:
        return S3Settings(self.s3_connect_timeout_s, self.s3_read_timeout_s, self.s3_max_attempts)

    @property
    def dram_cache_bytes(self) -> int:
        if self.dram_cache_gb is None:
            return int(host_memory_bytes() * DRAM_DEFAULT_FRACTION)
        return int(self.dram_cache_gb * GB)

    def resolved_node_id(self) -> str:
        return self.node_id or socket.gethostname()

    def resolved_address(self, bound_port: int) -> str:
        if self.advertise_address:
            return self.advertise_address
        host = self.host if self.host not in ("0.0.0.0", "::", "") else socket.gethostname()
        return f"{host}:{bound_port}"


def _is_host_port(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) <= 65535)
