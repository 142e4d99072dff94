"""The token streams of requests that may move: tracking on the source, parking on the destination.

Every Generate stream on a worker runs through a TrackedStream, registered by (instance,
request id), so MigrateOut can find it. When a migration stops the request, the backend stream
ends with finish_reason "migrated"; the TrackedStream then waits for the migration's outcome:

- Handover: the destination runs the request now. The stream ends with a HandoverEvent that
  tells the client (the controller) where to attach: the source never closes the client's
  stream before the destination has acknowledged the state.
- StayHere: the destination refused or failed. The stream resumes the exported state on the
  source's own backend and goes on; the client sees a short pause and no other difference.

On the destination, a migrated-in request starts decoding at once (its first token is the
destination's acknowledgement) and its events wait in a ParkedStream until the client attaches
with Generate(resume_id); a stream nobody attaches to within PARK_TIMEOUT_S is cancelled, so a
lost controller never leaks a slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ember.api import worker_pb2 as pb
from ember.worker.backend import Backend, GenerationState, InferenceError, InvalidRequestError, TokenEvent

log = logging.getLogger(__name__)

#: Seconds a migrated-in request waits for its client to attach before it is cancelled.
PARK_TIMEOUT_S = 60.0


@dataclass
class Handover:
    """The destination acknowledged the state: the client's stream goes on there."""

    proto: pb.Handover


@dataclass
class StayHere:
    """The destination did not take the request: resume `state` on the source."""

    state: GenerationState
    reason: str


@dataclass
class HandoverEvent(TokenEvent):
    """The last event of a moved request's source stream (finish_reason "migrated")."""

    handover: pb.Handover | None = None


@dataclass(eq=False)
class TrackedRequest:
    instance_id: str
    request_id: str
    backend: Backend
    # Set by the migration right before stop_and_export; resolved with Handover or StayHere.
    outcome: asyncio.Future | None = None
    migrating: bool = False
    closed: bool = False
    parked: ParkedStream | None = None  # a migrated-in stream nobody attached to yet


class RequestRegistry:
    """Running requests per (instance, request id): what MigrateOut can move."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], TrackedRequest] = {}

    def get(self, instance_id: str, request_id: str) -> TrackedRequest | None:
        return self._entries.get((instance_id, request_id))

    def for_instance(self, instance_id: str) -> list[TrackedRequest]:
        return [e for (iid, _), e in self._entries.items() if iid == instance_id]

    def __len__(self) -> int:
        return len(self._entries)

    def track(self, instance_id: str, backend: Backend, request_id: str, stream: AsyncIterator[TokenEvent]) -> TrackedStream:
        """Register a backend stream that has not started yet (backends submit on the first step)."""
        key = (instance_id, request_id)
        if key in self._entries:
            raise InvalidRequestError(
                f"request id {request_id!r} is already running on instance {instance_id!r}",
                hint="use a unique request id per request",
            )
        entry = TrackedRequest(instance_id, request_id, backend)
        self._entries[key] = entry
        return TrackedStream(self, entry, stream)

    def _remove(self, entry: TrackedRequest) -> None:
        entry.closed = True
        key = (entry.instance_id, entry.request_id)
        if self._entries.get(key) is entry:
            del self._entries[key]


class TrackedStream:
    """An async iterator of TokenEvents that survives a failed migration (see module doc)."""

    def __init__(self, registry: RequestRegistry, entry: TrackedRequest, stream: AsyncIterator[TokenEvent]) -> None:
        self._registry = registry
        self.entry = entry
        self._stream = stream
        self._done = False

    def __aiter__(self) -> TrackedStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        try:
            while True:
                event = await self._stream.__anext__()
                if event.finish_reason != "migrated":
                    if event.finish_reason is not None:
                        self._finish()
                    return event
                outcome = await self._outcome()
                if isinstance(outcome, Handover):
                    self._finish()
                    return HandoverEvent(
                        event.token_ids, event.text, event.finish_reason, event.prompt_tokens,
                        event.completion_tokens, handover=outcome.proto,
                    )
                log.info("request %s stays on instance %s: %s", self.entry.request_id, self.entry.instance_id,
                         outcome.reason)
                await _aclose(self._stream)
                self._stream = self.entry.backend.resume(outcome.state)
        except BaseException:
            self._finish()
            raise

    async def _outcome(self) -> Handover | StayHere:
        future = self.entry.outcome
        if future is None:
            raise InferenceError(
                f"request {self.entry.request_id!r} was stopped for a migration this worker does not know of",
                hint="retry the request",
            )
        try:
            return await future
        finally:
            self.entry.outcome = None
            self.entry.migrating = False

    async def aclose(self) -> None:
        self._finish()
        await _aclose(self._stream)

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._registry._remove(self.entry)


async def _aclose(stream: Any) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


_END = object()


class ParkedStream:
    """A migrated-in request decoding on the destination, buffered until its client attaches."""

    def __init__(self, resume_id: str, stream: TrackedStream, *, timeout_s: float = PARK_TIMEOUT_S,
                 on_done: Callable[[], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.resume_id = resume_id
        self.stream = stream
        self.attached = False
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        # (event, None) or (None, exception): the destination's acknowledgement waits on it.
        self.first: asyncio.Future[tuple[TokenEvent | None, BaseException | None]] = loop.create_future()
        self._on_done = on_done
        self._task = asyncio.create_task(self._pump(), name=f"ember-parked-{resume_id}")
        self._expiry = loop.call_later(timeout_s, self._expire)
        stream.entry.parked = self

    @property
    def done(self) -> bool:
        return self._task.done()

    async def _pump(self) -> None:
        try:
            async for event in self.stream:
                self._queue.put_nowait(event)
                if not self.first.done():
                    self.first.set_result((event, None))
        except asyncio.CancelledError:
            if not self.first.done():
                self.first.set_result((None, InferenceError("the resumed request was cancelled")))
            raise
        except Exception as exc:
            self._queue.put_nowait(exc)
            if not self.first.done():
                self.first.set_result((None, exc))
        finally:
            await self.stream.aclose()
            self._queue.put_nowait(_END)

    def _expire(self) -> None:
        """Nobody attached in time: drop the request and what it buffered."""
        if self.attached:
            return
        if not self.done:
            log.warning("migrated-in request %s: no client attached in time; cancelling it", self.resume_id)
            self._task.cancel()
        if self._on_done is not None:
            self._on_done()

    def cancel(self) -> None:
        self._expiry.cancel()
        self._task.cancel()

    async def cancel_and_wait(self) -> None:
        self.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def attach(self) -> AsyncIterator[TokenEvent]:
        """The buffered and following events; leaving early cancels the request."""
        self.attached = True
        self._expiry.cancel()
        self.stream.entry.parked = None
        try:
            while True:
                item = await self._queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not self.done:
                self.cancel()
