"""The destination side of a live migration: receive one request's state and resume it.

The destination checks everything it can before the source stops the request (instance ready,
same checkpoint, same KV layout, the request id free), answering `ready` with its recompute
cost; KV blocks go straight into preallocated buffers (ember.migration.protocol.KVAssembler).
On commit it resumes the request on its backend and acknowledges with `accepted` only after the
first token exists, so "accepted" means "running here". Until the source half-closes after that
acknowledgement, a broken stream cancels the resumed request: the source still owns it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from ember.api import worker_pb2 as pb
from ember.migration.protocol import KVAssembler, layout_proto, layouts_differ
from ember.worker.backend import KVState
from ember.worker.migration_costs import RecomputeProfile
from ember.worker.migration_state import state_from_proto
from ember.worker.migration_streams import ParkedStream, RequestRegistry

log = logging.getLogger(__name__)

#: Seconds from commit to the resumed request's first token before the destination gives up.
FIRST_TOKEN_TIMEOUT_S = 60.0


class SinkError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class SinkContext:
    """What the sink needs from the agent, without depending on the agent module."""

    registry: RequestRegistry
    parked: dict[str, ParkedStream]
    get_instance: Callable[[str], Any]  # raises the agent's NOT_FOUND error
    profile_for: Callable[[str], RecomputeProfile]


@dataclass
class SinkProgress:
    """What one MigrateIn call got to, for the caller's metrics and logs."""

    request_id: str = ""
    mode: str = "auto"  # "kv" | "tokens" once the commit arrived
    bytes_received: int = 0
    accepted: bool = False


async def receive(
    ctx: SinkContext, messages: AsyncIterator[pb.MigrateInMessage], progress: SinkProgress
) -> AsyncIterator[pb.MigrateInReply]:
    """The reply stream of one MigrateIn call (raises SinkError, BackendError or ProtocolError to refuse)."""
    it = messages.__aiter__()
    first = await _next(it)
    if first is None or first.WhichOneof("body") != "begin":
        raise SinkError(grpc.StatusCode.INVALID_ARGUMENT, "a MigrateIn stream must start with begin")
    begin = first.begin
    progress.request_id = begin.request_id
    instance = ctx.get_instance(begin.instance_id)
    backend = instance.backend
    if instance.state != "ready":
        raise SinkError(grpc.StatusCode.UNAVAILABLE, f"instance {instance.id!r} is {instance.state}, not ready")
    if begin.checkpoint and begin.checkpoint != instance.checkpoint:
        raise SinkError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"instance {instance.id!r} serves {instance.checkpoint!r}, the request runs on {begin.checkpoint!r}: "
            "migrate to an instance of the same deployment",
        )
    local = backend.kv_layout()
    local_proto = layout_proto(local.num_layers, local.num_kv_heads, local.head_dim, local.dtype)
    if begin.HasField("layout"):
        diff = layouts_differ(begin.layout, local_proto)
        if diff:
            raise SinkError(grpc.StatusCode.FAILED_PRECONDITION, f"KV layouts differ (source vs here: {diff})")
    if not begin.request_id:
        raise SinkError(grpc.StatusCode.INVALID_ARGUMENT, "begin.request_id is empty")
    if ctx.registry.get(instance.id, begin.request_id) is not None:
        raise SinkError(
            grpc.StatusCode.ALREADY_EXISTS,
            f"request {begin.request_id!r} is already running on instance {instance.id!r}",
        )
    profile = ctx.profile_for(instance.id)
    cost = await profile.ensure(backend) if begin.mode == pb.MIGRATION_MODE_AUTO else profile.cost()
    ready = pb.MigrationReady()
    if cost is not None:
        ready = pb.MigrationReady(recompute_a_s_per_token=cost.a_s_per_token, recompute_b_s=cost.b_s,
                                  samples=cost.samples)
    yield pb.MigrateInReply(ready=ready)

    assembler: KVAssembler | None = None
    commit: pb.MigrationCommit | None = None
    while commit is None:
        message = await _next(it)
        if message is None:
            return  # the source gave up before its stop: it still runs the request
        kind = message.WhichOneof("body")
        if kind == "kv":
            if assembler is None:
                capacity = max(begin.max_tokens, 1)
                assembler = KVAssembler(begin.layout if begin.HasField("layout") else local_proto, capacity)
            assembler.add(message.kv)
            progress.bytes_received = assembler.bytes_received
            if message.kv.round_end:
                yield pb.MigrateInReply(
                    kv_ack=pb.KVAck(tokens_received=assembler.tokens, bytes_received=assembler.bytes_received)
                )
        elif kind == "commit":
            commit = message.commit
        else:
            raise SinkError(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected {kind} after begin")

    state_msg = commit.state
    progress.mode = "kv" if state_msg.kv_tokens > 0 else "tokens"
    progress.bytes_received += commit.ByteSize()
    if state_msg.request_id != begin.request_id:
        raise SinkError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"commit is for {state_msg.request_id!r}, begin was for {begin.request_id!r}")
    kv = None
    if state_msg.kv_tokens > 0:
        if assembler is None:
            raise SinkError(grpc.StatusCode.INVALID_ARGUMENT, f"commit names {state_msg.kv_tokens} KV tokens; none were sent")
        keys, values = assembler.tensors(state_msg.kv_tokens)
        kv = KVState(keys=keys, values=values, num_tokens=state_msg.kv_tokens)
    state = state_from_proto(state_msg, kv)
    tokens = len(state.prompt_token_ids) + len(state.output_token_ids)
    started = time.perf_counter()
    stream = backend.resume(state)  # validates eagerly: a refusal reaches the source before any token
    tracked = ctx.registry.track(instance.id, backend, state.request_id, stream)
    resume_id = uuid.uuid4().hex
    parked = ParkedStream(resume_id, tracked, on_done=lambda: ctx.parked.pop(resume_id, None))
    ctx.parked[resume_id] = parked
    try:
        try:
            event, error = await asyncio.wait_for(asyncio.shield(parked.first), FIRST_TOKEN_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise SinkError(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"the resumed request produced no token within {FIRST_TOKEN_TIMEOUT_S:.0f} s") from None
        if error is not None:
            raise error
        if kv is None:
            profile.observe(tokens, time.perf_counter() - started)
        yield pb.MigrateInReply(
            accepted=pb.MigrationAccepted(resume_id=resume_id, tokens_generated=len(event.token_ids))
        )
        if await _next(it) is not None:
            raise SinkError(grpc.StatusCode.INVALID_ARGUMENT, "messages after commit")
        progress.accepted = True
        log.info("request %s migrated into %s (%s mode, %d tokens); resume id %s",
                 state.request_id, instance.id, progress.mode, tokens, resume_id)
    finally:
        if not progress.accepted:  # the source did not confirm: it still owns the request
            ctx.parked.pop(resume_id, None)
            parked.cancel()


async def _next(it: AsyncIterator[pb.MigrateInMessage]) -> pb.MigrateInMessage | None:
    try:
        return await it.__anext__()
    except StopAsyncIteration:
        return None
