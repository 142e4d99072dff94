"""One inference request through the controller: admit, wait for a slot, stream from the worker.

`admit()` answers at once what can be answered at once — unknown model (404), full queue (429)
— so an HTTP handler can still send a proper status before it starts a stream. `events()` then
yields load progress while the request waits for a cold start (for SSE comments), and token
chunks from the worker. A failure of the instance is retried on another instance: before any
token from scratch, after tokens were sent by restarting the request after exactly the tokens
the client has (the worker's continue_from), so the stream neither repeats nor drops a token.
A live migration ends the worker's stream with "migrated" and a hand-over: the request follows
it to the destination instance (same lease, moved) and the client sees one continuous stream.
Closing the iterator — the client went away — cancels the worker's Generate stream and frees the slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ember.controller.errors import BadRequest, ControllerError, Unavailable, WorkerFailed
from ember.controller.router import Lease
from ember.controller.worker_client import GenerateInput, WorkerCallError

if TYPE_CHECKING:
    from ember.controller.app import Controller

log = logging.getLogger("ember.controller.inference")

REQUEST_ERRORS = frozenset({"INVALID_ARGUMENT", "OUT_OF_RANGE"})
INSTANCE_GONE = frozenset({"NOT_FOUND", "UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED", "UNKNOWN", "ABORTED"})


@dataclass
class Progress:
    percent: float
    message: str


@dataclass
class Tokens:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class Generation:
    def __init__(self, ctl: Controller, deployment: str, inp: GenerateInput, *, progress: bool = False,
                 keepalive_s: float = 5.0) -> None:
        self.ctl = ctl
        self.deployment = deployment
        self.inp = inp
        self.want_progress = progress
        self.keepalive_s = keepalive_s
        self.lease: Lease | None = None
        self.cold_start = False
        self.node: str | None = None
        self.instance: str | None = None
        self.arrived = 0.0
        self._waiter: asyncio.Future[Lease] | None = None
        self._progress: asyncio.Queue[Progress] | None = None
        # Live migration: what the client has received (a restart continues after it), the input
        # of the next worker call (attach to a moved request, or continue from tokens), where a
        # hand-over said the stream goes on, and the client-seen pause being measured.
        self.delivered_ids: list[int] = []
        self.delivered_text = ""
        self.prompt_tokens = 0
        self.next_input: GenerateInput | None = None
        self.target: tuple[str, str, str] | None = None  # (node, address, instance id)
        self.last_token_at: float | None = None
        self.switch: tuple[float, str] | None = None  # (last token before the switch, mode)

    async def admit(self) -> None:
        """Take a slot or a place in the queue; raises ModelNotFound / QueueFull right away."""
        router = self.ctl.router
        router.get(self.deployment)
        self.arrived = self.ctl.clock()
        lease = router.try_acquire(self.deployment)
        if lease is not None:
            self.lease = lease
            return
        self._start_waiting()
        await asyncio.sleep(0)  # let acquire() run up to its first wait: enqueued or refused
        if self._waiter is not None and self._waiter.done():
            self._waiter.result()  # raises QueueFull / ModelNotFound; a lease is picked up by events()

    def _start_waiting(self) -> None:
        on_progress = None
        if self.want_progress:
            queue: asyncio.Queue[Progress] = asyncio.Queue()
            self._progress = queue
            on_progress = lambda percent, message: queue.put_nowait(Progress(percent, message))  # noqa: E731
        self._waiter = asyncio.ensure_future(self.ctl.router.acquire(self.deployment, on_progress))

    async def _wait(self) -> AsyncIterator[Progress]:
        """Wait for the lease, yielding progress (and a keep-alive every keepalive_s) meanwhile."""
        waiter = self._waiter
        assert waiter is not None
        if self._progress is None:
            self.lease = await waiter
            return
        while not waiter.done():
            getter = asyncio.ensure_future(self._progress.get())
            done, _ = await asyncio.wait({waiter, getter}, timeout=self.keepalive_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield getter.result()
            else:
                getter.cancel()
                if not done:
                    yield self.ctl_progress()
        self.lease = waiter.result()

    def ctl_progress(self) -> Progress:
        """The most advanced start of this deployment, refreshed from its estimate."""
        state = self.ctl.router.deployments.get(self.deployment)
        now = self.ctl.clock()
        best = Progress(0.0, "waiting for an instance")
        if state is not None:
            for slot in state.slots.values():
                if slot.state in ("starting", "loading") and slot.expected_ready_at:
                    span = max(1e-3, slot.expected_ready_at - slot.created_at)
                    percent = max(slot.progress, min(95.0, 95.0 * (now - slot.created_at) / span))
                    if percent >= best.percent:
                        best = Progress(percent, f"loading on {slot.node}")
        return best

    async def events(self) -> AsyncIterator[Progress | Tokens]:
        ctl = self.ctl
        metrics = ctl.metrics
        attempts = 0
        try:
            while True:
                if self.lease is None:
                    if self._waiter is None:
                        self._start_waiting()
                    async for progress in self._wait():
                        yield progress
                    self._waiter = None
                lease = self.lease
                assert lease is not None
                slot = lease.slot
                node, address, instance_id = self.target or (slot.node, slot.address, slot.id)
                self.target = None
                self.node, self.instance = node, instance_id
                self.cold_start = self.cold_start or lease.cold_start
                last = self.last_token_at
                started = ctl.clock()
                if not lease.queued and last is None:
                    metrics.overhead.labels(self.deployment).observe(started - self.arrived)
                inp, self.next_input = self.next_input or self.inp, None
                moved = False
                try:
                    ctl.migrations.track(self, instance_id)
                    stream = ctl.workers.generate(node, address, instance_id, inp)
                    async with contextlib.aclosing(stream):
                        async for chunk in stream:
                            if chunk.finish_reason == "migrated" and chunk.HasField("handover"):
                                ctl.migrations.follow(self, lease, chunk.handover)
                                moved = True
                                break
                            now = ctl.clock()
                            if last is None:
                                metrics.ttft.labels(self.deployment).observe(now - self.arrived)
                                if lease.cold_start and slot.ready_at is not None:
                                    managed = ctl.instances.managed.get(slot.id)
                                    tier = managed.record.source_tier if managed is not None else None
                                    metrics.cold_start_phase.labels(tier or "unknown", "first_token").observe(
                                        now - slot.ready_at)
                            else:
                                metrics.inter_token.labels(self.deployment).observe(now - last)
                            last = now
                            ctl.migrations.delivered(self, chunk, now)
                            yield Tokens(chunk.text, list(chunk.token_ids), chunk.finish_reason or None,
                                         chunk.prompt_tokens, chunk.completion_tokens)
                    if moved:
                        continue  # the stream goes on where the hand-over said, with the same lease
                    metrics.requests.labels(self.deployment, "ok").inc()
                    return
                except WorkerCallError as exc:
                    if exc.code in REQUEST_ERRORS:
                        metrics.requests.labels(self.deployment, "invalid").inc()
                        raise BadRequest(f"the model refused the request: {exc.details}") from None
                    if inp.resume_id and exc.code == "NOT_FOUND" and attempts < ctl.config.dispatch_retries:
                        # The moved request is no longer parked there: restart it there from the tokens.
                        attempts += 1
                        self.next_input = ctl.migrations.continuation(self, "restart")
                        self.target, moved = (node, address, instance_id), True
                        continue
                    if exc.code in INSTANCE_GONE and attempts < ctl.config.dispatch_retries:
                        # Nothing sent yet: retry elsewhere. Tokens sent (e.g. the source of a migration
                        # died mid-copy): restart elsewhere after exactly what the client has received.
                        self.next_input = ctl.migrations.continuation(self, "restart")
                        attempts += 1
                        log.warning("request on %s failed after %d token(s) (%s); retrying elsewhere", instance_id,
                                    len(self.delivered_ids), exc)
                        await self._instance_failed(instance_id)
                        self._release(None)
                        continue
                    metrics.requests.labels(self.deployment, "error").inc()
                    if exc.code in INSTANCE_GONE:
                        await self._instance_failed(instance_id)
                        raise Unavailable(f"the instance serving {self.deployment!r} failed: {exc}") from None
                    raise WorkerFailed(str(exc)) from None
                finally:
                    ctl.migrations.untrack(self, instance_id)
                    if self.lease is lease and not moved:
                        self._release(ctl.clock() - started)
        except ControllerError:
            raise
        except (asyncio.CancelledError, GeneratorExit):
            metrics.requests.labels(self.deployment, "cancelled").inc()
            raise
        finally:
            self.close()

    async def _instance_failed(self, instance_id: str) -> None:
        managed = self.ctl.instances.managed.get(instance_id)
        if managed is not None and managed.load_task is None:
            await self.ctl.instances.lost(managed)

    def _release(self, duration_s: float | None) -> None:
        if self.lease is not None:
            self.ctl.router.release(self.lease, duration_s)
            self.lease = None

    def close(self) -> None:
        """Give back whatever the request holds (idempotent)."""
        if self._waiter is not None:
            if not self._waiter.done():
                self._waiter.cancel()
            elif not self._waiter.cancelled() and self._waiter.exception() is None:
                self.lease = self._waiter.result()
            self._waiter = None
        self._release(None)

    async def collect(self) -> tuple[str, str, int, int]:
        """Run to the end: (text, finish_reason, prompt_tokens, completion_tokens)."""
        parts: list[str] = []
        finish, prompt_tokens, completion_tokens = "stop", 0, 0
        async for event in self.events():
            if isinstance(event, Tokens):
                parts.append(event.text)
                prompt_tokens = max(prompt_tokens, event.prompt_tokens)
                completion_tokens = max(completion_tokens, event.completion_tokens)
                if event.finish_reason:
                    finish = event.finish_reason
        return "".join(parts), finish, prompt_tokens, completion_tokens
