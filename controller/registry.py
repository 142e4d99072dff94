"""Deployments: validated before they are stored, so a bad checkpoint fails at deploy, not at the
first request.

A checkpoint URI is checked where the controller can see it: a local path must be an Ember
checkpoint directory (its ember.json parses and its partition files have the sizes the index
records — ember.ckpt_format.open_checkpoint, which is torch-free); an s3:// prefix must hold an
ember.json that parses. Either way the controller learns the checkpoint's size, which the
scheduler's time-to-ready estimate needs. URIs are stored in the spelling workers use in their
inventories (absolute resolved path; s3://bucket/prefix without a trailing slash), so locality
lookups match.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from pydantic import ValidationError

from ember.controller.errors import BadRequest, InvalidCheckpoint, NotFound
from ember.controller.models import DeploymentRecord, DeploymentSpec, DeploymentUpdate
from ember.controller.state import StateStore

if TYPE_CHECKING:  # checkpoint_policy imports canonical_uri from here
    from ember.controller.checkpoint_policy import CheckpointPolicy

INDEX_FILE = "ember.json"
# The deploy-time check reads one small object while an API caller waits, so it is bounded tighter
# than a worker's download (ember.worker.s3_source.S3Settings, which the controller cannot import):
# the same 5 s connect timeout and botocore standard retries (3 attempts, backoff with jitter), and
# 10 s of silence at most per attempt instead of botocore's 60 s default.
S3_CONNECT_TIMEOUT_S = 5.0
S3_READ_TIMEOUT_S = 10.0
S3_MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class CheckedCheckpoint:
    uri: str  # canonical spelling
    size_bytes: int
    local: bool


def canonical_uri(uri: str) -> tuple[str, bool]:
    """(canonical URI, is a local path); raises InvalidCheckpoint for what no worker can read."""
    text = uri.strip()
    if "://" not in text:
        return str(Path(text).expanduser().resolve()), True
    parsed = urlparse(text)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path:
            raise InvalidCheckpoint(f"checkpoint {uri!r}: a file URI is file:///absolute/path", param="checkpoint")
        return str(Path(unquote(parsed.path)).resolve()), True
    if scheme == "s3":
        if not parsed.netloc:
            raise InvalidCheckpoint(f"checkpoint {uri!r} names no bucket: use s3://bucket/prefix", param="checkpoint")
        prefix = unquote(parsed.path).strip("/")
        return (f"s3://{parsed.netloc}/{prefix}" if prefix else f"s3://{parsed.netloc}"), False
    raise InvalidCheckpoint(
        f"checkpoint {uri!r}: unsupported scheme {parsed.scheme!r}; use a local path, file:///path or s3://bucket/prefix",
        param="checkpoint",
    )


def check_checkpoint(uri: str) -> CheckedCheckpoint:
    """Blocking (file or network I/O): run it in a thread."""
    canonical, local = canonical_uri(uri)
    if local:
        return CheckedCheckpoint(canonical, _check_local(canonical), True)
    return CheckedCheckpoint(canonical, _check_s3(canonical), False)


def _check_local(path: str) -> int:
    from ember.ckpt_format.errors import CheckpointError
    from ember.ckpt_format.index import open_checkpoint

    try:
        return open_checkpoint(path).total_bytes
    except CheckpointError as exc:
        hint = getattr(exc, "hint", None)
        raise InvalidCheckpoint(
            f"checkpoint {path} cannot be deployed: {exc}" + (f" ({hint})" if hint else ""), param="checkpoint"
        ) from exc
    except OSError as exc:
        raise InvalidCheckpoint(f"checkpoint {path} cannot be read: {exc}", param="checkpoint") from exc


def _check_s3(uri: str) -> int:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    from ember.ckpt_format.errors import CheckpointError
    from ember.ckpt_format.index import parse_index

    parsed = urlparse(uri)
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    key = f"{prefix}/{INDEX_FILE}" if prefix else INDEX_FILE
    where = f"s3://{bucket}/{key}"
    client = boto3.client("s3", config=Config(
        connect_timeout=S3_CONNECT_TIMEOUT_S, read_timeout=S3_READ_TIMEOUT_S,
        retries={"total_max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
    ))
    try:
        client.head_object(Bucket=bucket, Key=key)
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except NoCredentialsError as exc:
        raise InvalidCheckpoint(
            f"checkpoint {uri}: no S3 credentials to read {where} ({exc}); set AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for S3-compatible stores) for the controller",
            param="checkpoint",
        ) from exc
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchKey", "NotFound") or status == 404:
            reason = f"{where} does not exist (is the bucket {bucket!r} and prefix {prefix!r} right, and was the " \
                     "converted checkpoint uploaded there?)"
        elif code in ("NoSuchBucket",):
            reason = f"the bucket {bucket!r} does not exist"
        elif code in ("403", "AccessDenied", "Forbidden") or status == 403:
            reason = f"access to {where} is denied: check the controller's S3 credentials and the bucket policy"
        else:
            reason = f"reading {where} failed: {code or status}: {exc}"
        raise InvalidCheckpoint(f"checkpoint {uri} cannot be deployed: {reason}", param="checkpoint") from exc
    except BotoCoreError as exc:
        raise InvalidCheckpoint(f"checkpoint {uri}: cannot reach S3 to read {where}: {exc}", param="checkpoint") from exc
    try:
        return parse_index(body, Path(uri)).total_bytes
    except CheckpointError as exc:
        raise InvalidCheckpoint(f"checkpoint {uri}: {where} is not a valid Ember index: {exc}",
                                param="checkpoint") from exc


class DeploymentRegistry:
    """Create, update and delete deployments in the store, checking checkpoints first."""

    def __init__(self, store: StateStore, policy: CheckpointPolicy | None = None) -> None:
        self.store = store
        self.policy = policy

    async def create(self, spec: DeploymentSpec) -> DeploymentRecord:
        if self.policy is not None:
            self.policy.check(spec.checkpoint)
        checked = await asyncio.to_thread(check_checkpoint, spec.checkpoint)
        now = time.time()
        record = DeploymentRecord(
            **spec.model_dump(exclude={"checkpoint"}), checkpoint=checked.uri,
            checkpoint_bytes=checked.size_bytes, created_at=now, updated_at=now,
        )
        await self.store.create_deployment(record)  # Conflict (409) when the name is taken
        return record

    async def update(self, name: str, update: DeploymentUpdate) -> tuple[DeploymentRecord, DeploymentRecord]:
        """(old, new) records; the checkpoint is checked again when it changes."""
        old = await self.store.get_deployment(name)
        if old is None:
            raise NotFound(f"no deployment named {name!r}", param="name", code="deployment_not_found")
        changes = update.model_dump(exclude_unset=True, exclude_none=True)
        if "checkpoint" in changes:
            if self.policy is not None:
                self.policy.check(changes["checkpoint"])
            checked = await asyncio.to_thread(check_checkpoint, changes["checkpoint"])
            changes["checkpoint"] = checked.uri
            changes["checkpoint_bytes"] = checked.size_bytes
        merged = old.model_dump() | changes | {"updated_at": time.time()}
        try:
            new = DeploymentRecord.model_validate(merged)  # re-checks min <= max across old and new fields
        except ValidationError as exc:
            raise BadRequest(f"invalid update of {name!r}: {exc.errors()[0]['msg']}") from None
        await self.store.put_deployment(new)
        return old, new

    async def delete(self, name: str) -> DeploymentRecord:
        old = await self.store.get_deployment(name)
        if old is None or not await self.store.delete_deployment(name):
            raise NotFound(f"no deployment named {name!r}", param="name", code="deployment_not_found")
        return old
