"""Limits that keep one caller from exhausting the controller: body size, prompt and output caps,
a token-bucket rate limit and a cap on concurrent generations per API key.

The same KeyLimiter serves HTTP and gRPC, keyed by the caller's key id (or by "anonymous" when
auth is off), so a key gets one budget whichever door it uses. Every refusal is a 4xx naming the
limit: 413 for the body, 400 naming the field, 429 with Retry-After for rate and concurrency.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ember.controller.config import LimitsConfig
from ember.controller.errors import BadRequest, ControllerError
from ember.controller.worker_client import GenerateInput


class RateLimited(ControllerError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limited"
    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class BodyTooLarge(ControllerError):
    status = 413
    type = "invalid_request_error"
    code = "body_too_large"
    grpc_code = "INVALID_ARGUMENT"


def limiter_key(authorization: str | None) -> str:
    """One budget per presented key (its digest: the key itself is never kept)."""
    if not authorization:
        return "anonymous"
    return hashlib.sha256(authorization.encode()).hexdigest()


def check_generate_input(inp: GenerateInput, limits: LimitsConfig) -> None:
    """400 naming the field when a request asks for more than this controller serves."""
    if inp.max_tokens is not None and inp.max_tokens > limits.max_tokens:
        raise BadRequest(f"'max_tokens' is {inp.max_tokens}; this controller serves at most {limits.max_tokens} "
                         "tokens per request", param="max_tokens")
    if inp.prompt_token_ids is not None and len(inp.prompt_token_ids) > limits.max_prompt_tokens:
        raise BadRequest(f"'prompt' has {len(inp.prompt_token_ids)} tokens; at most {limits.max_prompt_tokens} "
                         "are accepted", param="prompt")
    chars = len(inp.prompt) if isinstance(inp.prompt, str) else 0
    param = "prompt"
    if inp.messages:
        chars, param = sum(len(text) for _, text in inp.messages), "messages"
    if chars > limits.max_prompt_chars:
        raise BadRequest(f"'{param}' has {chars} characters; at most {limits.max_prompt_chars} are accepted",
                         param=param)


@dataclass
class _Bucket:
    tokens: float
    updated: float
    streams: int = 0


@dataclass
class KeyLimiter:
    """A token bucket and a concurrent-generation counter per key."""

    limits: LimitsConfig
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def _bucket(self, key: str) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) > 100_000:  # forget idle keys rather than grow without bound
                self._buckets = {k: b for k, b in self._buckets.items() if b.streams}
            bucket = self._buckets[key] = _Bucket(float(self._burst()), self.clock())
        return bucket

    def _burst(self) -> int:
        if self.limits.burst is not None:
            return self.limits.burst
        return max(1, math.ceil(self.limits.rate_per_s or 1))

    def take(self, key: str) -> None:
        """One request's worth of the key's rate budget, or RateLimited with the wait."""
        rate = self.limits.rate_per_s
        if rate is None:
            return
        bucket = self._bucket(key)
        now = self.clock()
        bucket.tokens = min(float(self._burst()), bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens < 1.0:
            wait = (1.0 - bucket.tokens) / rate
            raise RateLimited(f"rate limit of {rate:g} requests/s for this API key exceeded; retry in {wait:.1f} s",
                              wait)
        bucket.tokens -= 1.0

    @contextlib.contextmanager
    def stream(self, key: str) -> Iterator[None]:
        """Holds one of the key's concurrent-generation slots for the duration of the block."""
        cap = self.limits.max_streams_per_key
        if cap is None:
            yield
            return
        bucket = self._bucket(key)
        if bucket.streams >= cap:
            raise RateLimited(f"this API key already has {bucket.streams} generations running (the limit is {cap}); "
                              "wait for one to finish", 1.0)
        bucket.streams += 1
        try:
            yield
        finally:
            bucket.streams -= 1


class BodyLimitMiddleware:
    """ASGI middleware: a body over the limit is refused with 413 before any of it is parsed.

    The body is read here (bounded) and replayed to the app, so a chunked upload without
    Content-Length cannot make the app buffer more than the limit."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_bytes:
                    await self._refuse(send)
                    return
            except ValueError:
                pass
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        await send_error(send, BodyTooLarge(f"the request body is larger than {self.max_bytes} bytes, this "
                                            "controller's limit; send a shorter prompt"))


class KeyLimitMiddleware:
    """ASGI middleware: generation requests take from their key's rate budget and hold one of its
    stream slots until the response (streamed or not) has been sent."""

    def __init__(self, app, limiter: KeyLimiter, applies: Callable[[str, str], bool]) -> None:
        self.app = app
        self.limiter = limiter
        self.applies = applies

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.applies(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        raw = headers.get(b"authorization")
        key = limiter_key(raw.decode(errors="replace") if raw else None)
        slot = self.limiter.stream(key)
        try:
            slot.__enter__()  # a request refused for concurrency does not spend rate budget
        except RateLimited as exc:
            await send_error(send, exc)
            return
        try:
            self.limiter.take(key)
        except RateLimited as exc:
            slot.__exit__(None, None, None)
            await send_error(send, exc)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            slot.__exit__(None, None, None)


async def send_error(send, err: ControllerError) -> None:
    payload = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
