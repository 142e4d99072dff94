"""Download an Ember checkpoint from S3 with parallel ranged GETs.

Endpoint, region and credentials come from the standard AWS environment and config files
(AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, profiles, instance roles …), so the same
worker talks to AWS, MinIO or moto without flags. A single GET stream is far slower than the
network on S3; many ranged GETs in flight are how every fast S3 reader gets its bandwidth, and
writing each range straight into its place in a preallocated file needs no reassembly. A caller
may name a second destination per file (`mirror`, e.g. DRAM-pool buffers): every piece written to
the file is copied there at the same offset, so the bytes are in memory once the download ends
and nothing has to read the file back (see ember.worker.write_through).

Every S3 call is bounded (S3Settings): a stalled endpoint costs a cold start seconds, then a
clear error, never botocore's minute-per-attempt default.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ember.worker.store_errors import (
    CheckpointNotFound,
    ErrorKind,
    StorageAccessDenied,
    StorageUnauthenticated,
    StoreError,
)

INDEX_FILE = "ember.json"
DEFAULT_THREADS = 8
DEFAULT_PART_BYTES = 16 << 20
_READ_BYTES = 1 << 20
# Backoff between attempts at a range whose body stalled or broke off: rand(0, 1) * min(base * 2**i,
# cap), the truncated exponential backoff with full jitter botocore's standard mode uses, so threads
# that failed together do not come back together.
_STREAM_BACKOFF_BASE_S = 0.2
_STREAM_BACKOFF_CAP_S = 5.0

ProgressFn = Callable[[int, int], None]


class Mirror(Protocol):
    """A second destination for one file's bytes (ember.loader's HostBuffer is one)."""

    nbytes: int

    def prepare(self, start: int, end: int) -> None:
        """Make [start, end) ready to be written (e.g. fault pages in); called once per range."""

    def view(self, start: int = 0, end: int | None = None) -> memoryview:
        """Writable bytes of [start, end)."""


_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired"}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "403", "Forbidden", "AccountProblem"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # no leading or trailing "/"; "" for the bucket root

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


@dataclass(frozen=True)
class S3Plan:
    index: Any  # ember.ckpt_format.index.CheckpointIndex (its path names the S3 location)
    sizes: dict[str, int]  # every file to download: name -> bytes

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())


@dataclass(frozen=True)
class FetchStats:
    bytes: int
    seconds: float

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class S3Settings:
    """How long the worker waits on S3 and how often it tries (`ember worker --s3-*` flags).

    - connect_timeout_s (5 s): a TCP handshake with S3 takes milliseconds; 5 s still covers two
      lost SYNs (Linux retransmits after 1 s, then 3 s). Longer means the endpoint is down or
      unreachable, and a new attempt on a fresh connection is the better bet.
    - read_timeout_s (30 s): the longest silence on an open connection — before the first byte of
      an answer or between two reads of a body, not the time for a whole 16 MiB range. S3 answers
      in well under a second even when it throttles (it says SlowDown instead); 30 s leaves room
      for slow S3-compatible stores (MinIO on busy disks) and is raised per node when needed.
      botocore's default is 60 s per attempt, so a stalled endpoint held a cold start for
      minutes before anyone heard of it.
    - max_attempts (3): tries per request, the first included (botocore's standard retry mode:
      exponential backoff with jitter on throttling, 5xx, connection errors and timeouts). The
      same bound applies to a ranged GET whose body stalls or breaks off mid-stream, which
      botocore cannot retry (the answer was already handed over): fetch() resumes it from the
      last byte written.
    """

    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    max_attempts: int = 3


def make_client(max_connections: int = DEFAULT_THREADS, settings: S3Settings = S3Settings()) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        max_pool_connections=max_connections,
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        # botocore's "max_attempts" counts retries only; "total_max_attempts" counts the first try too.
        retries={"total_max_attempts": settings.max_attempts, "mode": "standard"},
    )
    return boto3.session.Session().client("s3", config=config)


def _timeout_hint(flag: str, seconds: float | None) -> str:
    now = f" (now {seconds:g} s)" if seconds is not None else ""
    return ("check that the S3 endpoint (AWS_ENDPOINT_URL) is up and reachable from the worker; for a slow store "
            f"raise --s3-{flag} / EMBER_S3_{flag.upper().replace('-', '_')}{now}")


def translate_error(
    exc: BaseException, location: S3Location, key: str | None = None, settings: S3Settings | None = None
) -> StoreError:
    """Turn a botocore exception into a StoreError that names the bucket/key and what to do.

    `settings` are the client's, so a timeout says how long it waited and how often it tried
    (botocore already retried it that many times).
    """
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    where = f"s3://{location.bucket}/{key}" if key else str(location)
    if isinstance(exc, (ReadTimeoutError, ConnectTimeoutError)):
        reading = isinstance(exc, ReadTimeoutError)
        flag = "read-timeout" if reading else "connect-timeout"
        seconds = None if settings is None else settings.read_timeout_s if reading else settings.connect_timeout_s
        what = "did not answer" if reading else "did not accept a connection"
        if settings is not None:
            what += f" within {seconds:g} s in {settings.max_attempts} attempt(s)"
        return StoreError(f"S3 timed out reading {where}: the endpoint {what} ({exc})",
                          _timeout_hint(flag, seconds), kind=ErrorKind.UNAVAILABLE)
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return StorageUnauthenticated(
            f"no usable AWS credentials to read {where}: {exc}",
            "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or a profile/role) in the worker's environment",
        )
    if isinstance(exc, EndpointConnectionError):
        return StoreError(
            f"cannot reach the S3 endpoint for {where}: {exc}",
            "check AWS_ENDPOINT_URL / network access from the worker",
            kind=ErrorKind.UNAVAILABLE,
        )
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket":
            return CheckpointNotFound(
                f"S3 bucket {location.bucket!r} does not exist (checkpoint {location})",
                "check the bucket name in the checkpoint URI",
            )
        if code in _MISSING_CODES:
            return CheckpointNotFound(
                f"S3 object {where} does not exist (bucket {location.bucket!r}, key {key!r})",
                "upload the whole converted checkpoint directory under the prefix",
            )
        if code in _AUTH_CODES:
            return StorageUnauthenticated(
                f"S3 rejected the worker's credentials reading {where}: {code}",
                "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the worker's environment",
            )
        if code in _DENIED_CODES:
            return StorageAccessDenied(
                f"access denied reading {where} ({code})",
                f"grant s3:GetObject and s3:ListBucket on bucket {location.bucket!r} to the worker's identity",
            )
        return StoreError(f"S3 error reading {where}: {code or exc}", kind=ErrorKind.UNAVAILABLE)
    return StoreError(f"failed to read {where}: {exc}", kind=ErrorKind.UNAVAILABLE)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """pwrite may write less than asked (a filesystem filling up answers short before ENOSPC)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class _BrokenStream(Exception):
    """A ranged GET's body timed out or ended early (`cause` says how) once `offset` was written."""

    def __init__(self, cause: BaseException, offset: int) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.offset = offset


class S3Source:
    """Fetches checkpoint directories from S3 into local directories."""

    def __init__(
        self,
        *,
        threads: int = DEFAULT_THREADS,
        part_bytes: int = DEFAULT_PART_BYTES,
        settings: S3Settings = S3Settings(),
    ) -> None:
        if threads < 1 or part_bytes < _READ_BYTES:
            raise ValueError(f"threads must be >= 1 and part_bytes >= {_READ_BYTES} (got {threads}, {part_bytes})")
        self.threads = threads
        self.part_bytes = part_bytes
        self.settings = settings

    def _client(self) -> Any:
        return make_client(self.threads, self.settings)

    def plan(self, location: S3Location) -> S3Plan:
        """The checkpoint's validated index and every file's size, from one listing and one GET.

        Cheap (no weights read), so the worker can check the model fits before downloading it.
        """
        from ember.ckpt_format.index import parse_index

        client = self._client()
        listed = self._list(client, location)
        if INDEX_FILE not in listed:
            raise CheckpointNotFound(
                f"no Ember checkpoint at {location}: key {location.key(INDEX_FILE)!r} does not exist "
                f"in bucket {location.bucket!r}",
                "convert the model with `ember convert` and upload the output directory under this prefix",
            )
        try:
            body = client.get_object(Bucket=location.bucket, Key=location.key(INDEX_FILE))["Body"].read()
        except Exception as exc:  # botocore errors
            raise translate_error(exc, location, location.key(INDEX_FILE), self.settings) from exc
        # parse_index validates every format rule, including that file names cannot escape the directory.
        index = parse_index(body, Path(str(location)))
        sizes: dict[str, int] = {INDEX_FILE: listed[INDEX_FILE]}
        for name in [p.file for p in index.partitions] + list(index.files):
            if name not in listed:
                raise CheckpointNotFound(
                    f"checkpoint {location} is incomplete: key {location.key(name)!r} is listed in its index "
                    f"but missing from bucket {location.bucket!r}",
                    "upload the whole converted checkpoint directory",
                )
            sizes[name] = listed[name]
        return S3Plan(index=index, sizes=sizes)

    def fetch(
        self,
        location: S3Location,
        dest: Path,
        progress: ProgressFn | None = None,
        plan: S3Plan | None = None,
        cancel: threading.Event | None = None,
        mirror: dict[str, Mirror] | None = None,
    ) -> FetchStats:
        """Download the checkpoint into `dest` (an empty directory); return bytes and seconds.

        `plan` is what plan() returned when the caller already asked (to size a cache entry).
        Setting `cancel` stops the download at the next piece (the caller gave up on the load).
        `mirror` maps file names to second destinations of the file's size: each receives exactly
        the bytes written to its file, at the same offsets (a resumed range included). Their
        content is unchecked here; it is only complete when fetch() returns.
        """
        started = time.perf_counter()
        plan = (plan if plan is not None else self.plan(location)).sizes
        mirror = mirror or {}
        for name, target in mirror.items():
            if plan.get(name) != target.nbytes:
                raise ValueError(f"mirror for {name!r} holds {target.nbytes} bytes, the file has {plan.get(name)}")
        client = self._client()
        dest.mkdir(parents=True, exist_ok=True)
        total = sum(plan.values())
        done = 0
        lock = threading.Lock()
        stop = cancel if cancel is not None else threading.Event()

        def advance(n: int) -> None:
            nonlocal done
            with lock:
                done += n
                current = done
            if progress is not None:
                progress(current, total)

        fds: dict[str, int] = {}
        try:
            for name, size in plan.items():
                fd = os.open(dest / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                fds[name] = fd
                os.ftruncate(fd, size)
            ranges = [
                (name, start, min(start + self.part_bytes, size))
                for name, size in plan.items()
                for start in range(0, size, self.part_bytes)
            ]

            def get_range(name: str, start: int, end: int) -> None:
                key = location.key(name)
                offset = start
                target = mirror.get(name)
                sink = None
                if target is not None and not stop.is_set():
                    target.prepare(start, end)
                    sink = target.view()
                broken = 0  # attempts whose body stalled or broke off
                while offset < end and not stop.is_set():
                    try:
                        # botocore retries this call itself (timeouts, 5xx, resets) up to max_attempts.
                        rng = f"bytes={offset}-{end - 1}"
                        body = client.get_object(Bucket=location.bucket, Key=key, Range=rng)["Body"]
                    except Exception as exc:
                        raise translate_error(exc, location, key, self.settings) from exc
                    try:
                        offset = self._copy_body(body, fds[name], sink, offset, end, stop, advance)
                    except _BrokenStream as exc:
                        body.close()  # a stalled connection must not go back to the pool
                        offset = exc.offset
                        broken += 1
                        if broken >= self.settings.max_attempts:
                            error = self._stream_error(location, key, start, end, offset, broken, exc.cause)
                            raise error from exc.cause
                        stop.wait(random.random() * min(_STREAM_BACKOFF_BASE_S * 2 ** (broken - 1),
                                                        _STREAM_BACKOFF_CAP_S))
                    except Exception as exc:  # the local write failed (disk full …): no retry helps
                        raise translate_error(exc, location, key, self.settings) from exc

            with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="s3-get") as pool:
                futures = [pool.submit(get_range, *r) for r in ranges]
                finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
                failed = [f for f in finished if f.exception() is not None]
                if failed:
                    stop.set()
                    wait(futures)
                    raise failed[0].exception()  # type: ignore[misc]
            if stop.is_set():
                raise StoreError(f"download of {location} was cancelled", kind=ErrorKind.UNAVAILABLE)
            for fd in fds.values():
                os.fsync(fd)
        finally:
            for fd in fds.values():
                os.close(fd)
        return FetchStats(bytes=total, seconds=time.perf_counter() - started)

    @staticmethod
    def _copy_body(
        body: Any,
        fd: int,
        sink: memoryview | None,
        offset: int,
        end: int,
        stop: threading.Event,
        advance: Callable[[int], None],
    ) -> int:
        """Write the body at `offset` on until `end` (into the file, then into `sink` when given);
        the new offset. A read that times out or breaks off raises _BrokenStream with the offset
        written so far (to both), so the next attempt asks only for the rest."""
        from botocore.exceptions import HTTPClientError, IncompleteReadError

        while offset < end and not stop.is_set():
            try:
                piece = body.read(min(_READ_BYTES, end - offset))
            except (HTTPClientError, IncompleteReadError) as exc:  # ReadTimeoutError, ResponseStreamingError …
                raise _BrokenStream(exc, offset) from exc
            if not piece:
                raise _BrokenStream(EOFError(f"the connection closed {end - offset} bytes early"), offset)
            _pwrite_all(fd, piece, offset)
            if sink is not None:
                sink[offset : offset + len(piece)] = piece
            offset += len(piece)
            advance(len(piece))
        return offset

    def _stream_error(
        self, location: S3Location, key: str, start: int, end: int, offset: int, attempts: int, cause: BaseException
    ) -> StoreError:
        from botocore.exceptions import ReadTimeoutError

        where = f"s3://{location.bucket}/{key} bytes {start}-{end - 1}"
        got = f"{offset - start} of {end - start} bytes arrived"
        if isinstance(cause, ReadTimeoutError):
            return StoreError(
                f"S3 timed out reading {where}: the body stalled for {self.settings.read_timeout_s:g} s "
                f"in each of {attempts} attempts ({got})",
                _timeout_hint("read-timeout", self.settings.read_timeout_s),
                kind=ErrorKind.UNAVAILABLE,
            )
        return StoreError(
            f"S3 broke off reading {where} in each of {attempts} attempts ({got}; last: {cause})",
            "check the S3 endpoint (AWS_ENDPOINT_URL) and the network from the worker, then retry the load",
            kind=ErrorKind.UNAVAILABLE,
        )

    def _list(self, client: Any, location: S3Location) -> dict[str, int]:
        """Direct children of the prefix: name -> size."""
        base = f"{location.prefix}/" if location.prefix else ""
        listed: dict[str, int] = {}
        try:
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=location.bucket, Prefix=base, Delimiter="/"):
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(base):]
                    if name:
                        listed[name] = int(obj["Size"])
        except Exception as exc:
            raise translate_error(exc, location, settings=self.settings) from exc
        return listed
