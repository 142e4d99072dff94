"""Download an Ember checkpoint from S3 with parallel ranged GETs.

Endpoint, region and credentials come from the standard AWS environment and config files
(AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, profiles, instance roles …), so the same
worker talks to AWS, MinIO or moto without flags. A single GET stream is far slower than the
network on S3; many ranged GETs in flight are how every fast S3 reader gets its bandwidth, and
writing each range straight into its place in a preallocated file needs no reassembly.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

ProgressFn = Callable[[int, int], None]

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


def make_client(max_connections: int = DEFAULT_THREADS) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(max_pool_connections=max_connections, retries={"max_attempts": 3, "mode": "standard"})
    return boto3.session.Session().client("s3", config=config)


def translate_error(exc: BaseException, location: S3Location, key: str | None = None) -> StoreError:
    """Turn a botocore exception into a StoreError that names the bucket/key and what to do."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    where = f"s3://{location.bucket}/{key}" if key else str(location)
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


class S3Source:
    """Fetches checkpoint directories from S3 into local directories."""

    def __init__(
        self,
        *,
        threads: int = DEFAULT_THREADS,
        part_bytes: int = DEFAULT_PART_BYTES,
        client_factory: Callable[[int], Any] = make_client,
    ) -> None:
        if threads < 1 or part_bytes < _READ_BYTES:
            raise ValueError(f"threads must be >= 1 and part_bytes >= {_READ_BYTES} (got {threads}, {part_bytes})")
        self.threads = threads
        self.part_bytes = part_bytes
        self._client_factory = client_factory

    def plan(self, location: S3Location) -> S3Plan:
        """The checkpoint's validated index and every file's size, from one listing and one GET.

        Cheap (no weights read), so the worker can check the model fits before downloading it.
        """
        from ember.ckpt_format.index import parse_index

        client = self._client_factory(self.threads)
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
            raise translate_error(exc, location, location.key(INDEX_FILE)) from exc
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
    ) -> FetchStats:
        """Download the checkpoint into `dest` (an empty directory); return bytes and seconds.

        `plan` is what plan() returned when the caller already asked (to size a cache entry).
        Setting `cancel` stops the download at the next piece (the caller gave up on the load).
        """
        started = time.perf_counter()
        plan = (plan if plan is not None else self.plan(location)).sizes
        client = self._client_factory(self.threads)
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
                if stop.is_set():
                    return
                key = location.key(name)
                try:
                    resp = client.get_object(Bucket=location.bucket, Key=key, Range=f"bytes={start}-{end - 1}")
                    body = resp["Body"]
                    offset = start
                    while offset < end and not stop.is_set():
                        piece = body.read(min(_READ_BYTES, end - offset))
                        if not piece:
                            break
                        os.pwrite(fds[name], piece, offset)
                        offset += len(piece)
                        advance(len(piece))
                except StoreError:
                    raise
                except Exception as exc:
                    raise translate_error(exc, location, key) from exc
                if offset != end and not stop.is_set():
                    raise StoreError(
                        f"short read of s3://{location.bucket}/{key} bytes {start}-{end - 1}: got {offset - start}",
                        "the object changed or the connection dropped; retry the load",
                        kind=ErrorKind.UNAVAILABLE,
                    )

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
            raise translate_error(exc, location) from exc
        return listed
