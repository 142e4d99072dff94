"""Errors of the model store, each tagged with the kind of failure the gRPC layer reports.

The store knows nothing of gRPC; the agent maps `kind` to a status code. Every message names the
checkpoint URI (bucket, key or path) and the hint says what to do.
"""

from __future__ import annotations

from enum import Enum


class ErrorKind(str, Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    PERMISSION_DENIED = "permission_denied"
    UNAUTHENTICATED = "unauthenticated"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"


class StoreError(Exception):
    kind: ErrorKind = ErrorKind.UNAVAILABLE

    def __init__(self, message: str, hint: str | None = None, *, kind: ErrorKind | None = None) -> None:
        super().__init__(message)
        self.hint = hint
        if kind is not None:
            self.kind = kind

    def full_message(self) -> str:
        return f"{self} ({self.hint})" if self.hint else str(self)


class InvalidCheckpointURI(StoreError):
    kind = ErrorKind.INVALID_ARGUMENT


class CheckpointNotFound(StoreError):
    kind = ErrorKind.NOT_FOUND


class StorageAccessDenied(StoreError):
    kind = ErrorKind.PERMISSION_DENIED


class StorageUnauthenticated(StoreError):
    kind = ErrorKind.UNAUTHENTICATED


class CacheFull(StoreError):
    kind = ErrorKind.RESOURCE_EXHAUSTED
