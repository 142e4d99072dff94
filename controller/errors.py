"""Errors the controller answers with, each carrying its HTTP status and OpenAI error fields.

One hierarchy serves HTTP (OpenAI's `{"error": {"message", "type", "param", "code"}}`), gRPC
(each class maps to a status code) and the CLI (the client re-raises the message), so a user
sees the same sentence whichever door they came in by.
"""

from __future__ import annotations


class ControllerError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None
    grpc_code: str = "INTERNAL"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    @property
    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(ControllerError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"
    grpc_code = "INVALID_ARGUMENT"


class InvalidCheckpoint(BadRequest):
    """The checkpoint URI of a deployment cannot be read: the message says which URI and why."""

    code = "invalid_checkpoint"


class NotFound(ControllerError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"
    grpc_code = "NOT_FOUND"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, name: str, known: list[str]) -> None:
        listed = ", ".join(sorted(known)) or "none"
        super().__init__(
            f"the model {name!r} does not exist (deployed models: {listed}); deploy it with "
            f"`ember deploy {name} --checkpoint PATH|s3://…`",
            param="model",
        )


class Conflict(ControllerError):
    status = 409
    type = "invalid_request_error"
    code = "already_exists"
    grpc_code = "ALREADY_EXISTS"


class QueueFull(ControllerError):
    """The deployment's bounded queue is full: retry after the time the queue needs to drain."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"
    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after_s)))}


class Unavailable(ControllerError):
    """No instance could be started (no nodes, every load failed, timed out waiting)."""

    status = 503
    type = "server_error"
    code = "unavailable"
    grpc_code = "UNAVAILABLE"


class WorkerFailed(ControllerError):
    """A worker refused or failed a request; the message is the worker's own."""

    status = 502
    type = "server_error"
    code = "worker_error"
    grpc_code = "INTERNAL"


class Gone(ControllerError):
    """The deployment was deleted while the request waited for it."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"
    grpc_code = "NOT_FOUND"


class ConfigError(ValueError):
    """A controller option is invalid; the message names the flag and what to use instead."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint
