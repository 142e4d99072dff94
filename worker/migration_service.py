"""Live migration on one worker: the agent's MigrateOut / MigrateIn and the streams that can move.

The agent delegates three things here and keeps its own job (instances, loads, statuses):
- opening every Generate stream (plain, attached to a migrated-in request with resume_id, or
  restarted from the tokens a client already has with continue_from), so that each running
  request is tracked and can be moved;
- MigrateOut: one OutboundMigration per request, run concurrently (MAX_PARALLEL at a time) as
  tasks of their own, so a controller that goes away mid-migration never leaves a stopped
  request without an outcome;
- MigrateIn: the destination side (migration_sink.receive).
Metrics: migrations by direction, mode and outcome; bytes moved; the source's stop-to-first-token
time and total migration time per mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from ember.api import worker_pb2 as pb
from ember.api import worker_pb2_grpc as pb_grpc
from ember.worker.auth import bearer_metadata
from ember.worker.backend import (
    AlreadyFinishedError,
    GenerationState,
    InvalidRequestError,
    TokenEvent,
    UnknownRequestError,
)
from ember.worker.migration_costs import RecomputeProfile, TransferProfile
from ember.worker.migration_sink import SinkContext, SinkProgress, receive
from ember.worker.migration_source import Destination, OutboundMigration, mode_name
from ember.worker.migration_state import rng_state_after
from ember.worker.migration_streams import ParkedStream, RequestRegistry

if TYPE_CHECKING:
    from ember.worker.agent import Instance, WorkerAgent

log = logging.getLogger(__name__)

MAX_PARALLEL = 8
CALIBRATION_IDLE_POLL_S = 0.5
CALIBRATION_DELAY_S = 5.0
PEER_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
]
_OUTCOMES = {
    pb.MIGRATION_PHASE_HANDED_OVER: "handed_over",
    pb.MIGRATION_PHASE_STAYED: "stayed",
    pb.MIGRATION_PHASE_FINISHED: "finished",
}
_MODES = (pb.MIGRATION_MODE_AUTO, pb.MIGRATION_MODE_KV, pb.MIGRATION_MODE_TOKENS)


class MigrationService:
    def __init__(self, agent: WorkerAgent, *, token: str | None = None) -> None:
        self.agent = agent
        self.registry = RequestRegistry()
        self.parked: dict[str, ParkedStream] = {}
        self.transfer = TransferProfile()
        self._profiles: dict[str, RecomputeProfile] = {}
        self._metadata = bearer_metadata(token)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tasks: set[asyncio.Task] = set()
        self._background: set[asyncio.Task] = set()
        self._inbound = 0

    @property
    def in_flight(self) -> int:
        return len(self._tasks) + self._inbound

    def profile_for(self, instance_id: str) -> RecomputeProfile:
        for gone in [i for i in self._profiles if i not in self.agent.instances]:
            del self._profiles[gone]
        return self._profiles.setdefault(instance_id, RecomputeProfile())

    # -- cost model inputs ---------------------------------------------------------------------

    def instance_ready(self, instance: Instance) -> None:
        """Measure the cost model's inputs for a new instance in the background, once it is idle:
        the scheduler plans migrations with them before any migration has happened."""
        task = asyncio.create_task(self._calibrate(instance), name=f"ember-calibrate-{instance.id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _calibrate(self, instance: Instance) -> None:
        try:
            await asyncio.sleep(CALIBRATION_DELAY_S)  # after the burst of work around a cold start
            await self.transfer.ensure_prior()
            while instance.backend.active_requests() or instance.backend.queue_depth():
                await asyncio.sleep(CALIBRATION_IDLE_POLL_S)  # never compete with the first requests
            if self.agent.instances.get(instance.id) is not instance or instance.state != "ready":
                return
            await self.profile_for(instance.id).ensure(instance.backend)
            self.agent._changed()
        except Exception as exc:  # calibration is an optimisation; a failure must not hurt serving
            log.warning("calibration of instance %s failed: %s", instance.id, exc)

    def annotate(self, status: pb.NodeStatus) -> None:
        """Add the cost model's inputs to a NodeStatus (heartbeats carry them to the scheduler)."""
        status.migrations_in_flight = self.in_flight
        fit = self.transfer.fit()
        if fit is not None:
            status.migration_net_gbps, status.migration_overhead_s = fit
        for proto in status.instances:
            instance = self.agent.instances.get(proto.id)
            if instance is None or instance.state != "ready":
                continue
            with contextlib.suppress(Exception):
                proto.kv_bytes_per_token = instance.backend.kv_layout().bytes_per_token
            profile = self._profiles.get(proto.id)
            cost = profile.cost() if profile is not None else None
            if cost is not None:
                proto.recompute_s_per_token, proto.recompute_overhead_s = cost.a_s_per_token, cost.b_s

    # -- Generate streams ----------------------------------------------------------------------

    async def open_stream(self, instance: Instance, request: pb.GenerateRequest) -> tuple[str, AsyncIterator[TokenEvent]]:
        """(request id, events) for a Generate call; raises BackendError subclasses to refuse."""
        if request.resume_id:
            return self._attach(instance, request)
        gen_request = self.agent._generation_request(request)
        request_id = gen_request.request_id
        backend = instance.backend
        if request.HasField("continue_from"):
            existing = self.registry.get(instance.id, request_id)
            if existing is not None and existing.parked is not None:
                # Its source died before handing it over: the client's tokens are the truth now.
                self.parked.pop(existing.parked.resume_id, None)
                await existing.parked.cancel_and_wait()
            prompt_ids = backend.prompt_token_ids(gen_request)
            output = list(request.continue_from.output_token_ids)
            params = gen_request.params
            state = GenerationState(
                request_id=request_id,
                prompt_token_ids=prompt_ids,
                output_token_ids=output,
                params=params,
                rng_state=rng_state_after(params, len(output)),
                text_emitted=request.continue_from.text_emitted,
                kv=None,
            )
            try:
                stream = backend.resume(state)
            except AlreadyFinishedError as exc:
                return request_id, _ended(exc.finish_reason, len(prompt_ids), len(output))
        else:
            stream = backend.generate(gen_request)
        return request_id, self.registry.track(instance.id, backend, request_id, stream)

    def _attach(self, instance: Instance, request: pb.GenerateRequest) -> tuple[str, AsyncIterator[TokenEvent]]:
        if request.HasField("prompt") or request.messages or request.prompt_token_ids or request.HasField(
            "continue_from"
        ):
            raise InvalidRequestError(
                "resume_id attaches to a migrated request: send no prompt, messages, prompt_token_ids or continue_from"
            )
        parked = self.parked.get(request.resume_id)
        if parked is None:
            raise UnknownRequestError(
                f"no migrated request with resume id {request.resume_id!r} waits on this worker",
                hint="it was attached already, or nobody attached within the time limit and it was cancelled; "
                "restart it with continue_from",
            )
        entry = parked.stream.entry
        if entry.instance_id != instance.id:
            raise InvalidRequestError(
                f"resume id {request.resume_id!r} belongs to instance {entry.instance_id!r}, not {instance.id!r}"
            )
        if request.request_id and request.request_id != entry.request_id:
            raise InvalidRequestError(
                f"resume id {request.resume_id!r} is request {entry.request_id!r}, not {request.request_id!r}"
            )
        del self.parked[request.resume_id]
        return entry.request_id, parked.attach()

    # -- MigrateOut (source) -------------------------------------------------------------------

    async def migrate_out(self, request: pb.MigrateOutRequest) -> AsyncIterator[pb.MigrateOutEvent]:
        instance = self.agent._get(request.instance_id)
        if instance.state != "ready":
            raise InvalidRequestError(f"instance {instance.id!r} is {instance.state}; only a ready instance migrates")
        address = request.destination_address.strip()
        host, sep, port = address.rpartition(":")
        if not (sep and host and port.isdigit()):
            raise InvalidRequestError(f"destination_address must be HOST:PORT, got {address!r}")
        dest_instance = request.destination_instance_id.strip()
        if not dest_instance:
            raise InvalidRequestError("destination_instance_id is empty: name a ready instance on the destination")
        if address == self.agent.config.address and dest_instance == instance.id:
            raise InvalidRequestError("the destination is the source instance itself")
        if request.mode not in _MODES:
            raise InvalidRequestError(f"unknown migration mode {request.mode}")
        migration_id = request.migration_id or uuid.uuid4().hex[:12]
        destination = Destination(
            migration_id=migration_id,
            address=address,
            instance_id=dest_instance,
            node_id=request.destination_node_id,
            checkpoint=instance.checkpoint,
            stub=self._stub(address),
            metadata=self._metadata,
        )
        events: asyncio.Queue[pb.MigrateOutEvent | None] = asyncio.Queue()
        entries = []
        for request_id in request.request_ids or [e.request_id for e in self.registry.for_instance(instance.id)]:
            entry = self.registry.get(instance.id, request_id)
            if entry is None:
                events.put_nowait(pb.MigrateOutEvent(request_id=request_id, phase=pb.MIGRATION_PHASE_FINISHED,
                                                     message="not running on this instance"))
            else:
                entries.append(entry)
        if request.mode == pb.MIGRATION_MODE_AUTO and entries:
            await self.transfer.ensure_prior()
        log.info("migration %s: %d request(s) of %s to %s/%s", migration_id, len(entries), instance.id, address,
                 dest_instance)
        limit = asyncio.Semaphore(MAX_PARALLEL)
        pending = len(entries)
        if pending == 0:
            events.put_nowait(None)

        async def one(entry: Any) -> None:
            nonlocal pending
            try:
                async with limit:
                    move = OutboundMigration(entry, destination, request.mode, self.transfer, events.put_nowait)
                    final = await move.run()
                self._record(final)
                events.put_nowait(final)
            finally:
                pending -= 1
                if pending == 0:
                    events.put_nowait(None)

        for entry in entries:
            task = asyncio.create_task(one(entry), name=f"ember-migrate-{migration_id}-{entry.request_id}")
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
        self.agent._changed()
        while True:
            event = await events.get()
            if event is None:
                return
            yield event

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("migration task failed", exc_info=task.exception())
        self.agent._changed()

    def _record(self, final: pb.MigrateOutEvent) -> None:
        metrics = self.agent.metrics
        mode = mode_name(final.mode)
        outcome = _OUTCOMES.get(final.phase, "finished")
        metrics.migrations.labels("out", mode, outcome).inc()
        metrics.migration_bytes.labels("out", mode).inc(final.bytes)
        if final.phase == pb.MIGRATION_PHASE_HANDED_OVER:
            metrics.migration_stop_seconds.labels(mode).observe(final.stop_s)
            metrics.migration_seconds.labels(mode).observe(final.total_s)
        log.info("request %s: %s (%s mode, %d bytes, stop %.3f s, total %.3f s)%s", final.request_id, outcome, mode,
                 final.bytes, final.stop_s, final.total_s, f": {final.message}" if final.message else "")

    def _stub(self, address: str) -> pb_grpc.WorkerStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address, options=PEER_CHANNEL_OPTIONS)
        return pb_grpc.WorkerStub(channel)

    # -- MigrateIn (destination) ---------------------------------------------------------------

    async def migrate_in(self, messages: AsyncIterator[pb.MigrateInMessage]) -> AsyncIterator[pb.MigrateInReply]:
        ctx = SinkContext(self.registry, self.parked, self.agent._get, self.profile_for)
        progress = SinkProgress()
        self._inbound += 1
        metrics = self.agent.metrics
        try:
            async for reply in receive(ctx, messages, progress):
                yield reply
        finally:
            self._inbound -= 1
            outcome = "accepted" if progress.accepted else "refused"
            metrics.migrations.labels("in", progress.mode, outcome).inc()
            if progress.accepted:
                metrics.migration_bytes.labels("in", progress.mode).inc(progress.bytes_received)
            self.agent._changed()

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        for parked in list(self.parked.values()):
            parked.cancel()
        self.parked.clear()
        for channel in self._channels.values():
            with contextlib.suppress(Exception):
                await channel.close()
        self._channels.clear()


async def _ended(finish_reason: str, prompt_tokens: int, completion_tokens: int) -> AsyncIterator[TokenEvent]:
    """A restarted request whose client already had every token: only its end is left to send."""
    yield TokenEvent([], "", finish_reason, prompt_tokens, completion_tokens)
