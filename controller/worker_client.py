"""The controller's side of ember.v1.Worker: one gRPC channel per worker, typed calls, clear errors.

Channels are long-lived (HTTP/2, multiplexed), so a warm request costs one stream on an open
connection. gRPC failures become WorkerCallError, which says which node failed, how (the status
code name) and whether trying elsewhere can help — the router retries a request on another
instance only when nothing was sent to the client yet and the failure was the node's, not the
request's.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from ember.api import worker_pb2 as pb
from ember.api import worker_pb2_grpc as pb_grpc

# Failures of the node or the connection, not of the request or checkpoint: another node may do.
NODE_FAILURES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN", "INTERNAL", "ABORTED"})
# Failures of capacity on that node: another node may have room.
CAPACITY_FAILURES = frozenset({"RESOURCE_EXHAUSTED"})
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 << 20),
]


class WorkerCallError(Exception):
    def __init__(self, node: str, code: str, details: str) -> None:
        super().__init__(f"worker {node}: {code}: {details}")
        self.node = node
        self.code = code
        self.details = details

    @property
    def node_failure(self) -> bool:
        return self.code in NODE_FAILURES

    @property
    def capacity_failure(self) -> bool:
        return self.code in CAPACITY_FAILURES


@dataclass
class GenerateInput:
    """One request's input, exactly one of prompt / messages / prompt_token_ids set."""

    prompt: str | None = None
    messages: list[tuple[str, str]] | None = None
    prompt_token_ids: list[int] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    request_id: str = ""
    # Live migration: attach to a request moved to this instance (Handover.resume_id; nothing
    # else is sent), or restart it after the tokens and text the client already has.
    resume_id: str = ""
    continue_token_ids: list[int] | None = None
    continue_text: str = ""

    def to_proto(self, instance_id: str) -> pb.GenerateRequest:
        if self.resume_id:
            return pb.GenerateRequest(instance_id=instance_id, request_id=self.request_id, resume_id=self.resume_id)
        sampling = pb.SamplingParams(stop=self.stop)
        for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
            value = getattr(self, name)
            if value is not None:
                setattr(sampling, name, value)
        request = pb.GenerateRequest(instance_id=instance_id, request_id=self.request_id, sampling=sampling)
        if self.prompt is not None:
            request.prompt = self.prompt
        elif self.messages is not None:
            request.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in self.messages)
        elif self.prompt_token_ids is not None:
            request.prompt_token_ids.extend(self.prompt_token_ids)
        if self.continue_token_ids is not None:
            request.continue_from.CopyFrom(
                pb.Continuation(output_token_ids=self.continue_token_ids, text_emitted=self.continue_text))
        return request


class WorkerClient:
    """Calls workers by address; one instance per controller (tests may pass a fake of this shape)."""

    def __init__(self, token: str | None = None) -> None:
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, pb_grpc.WorkerStub] = {}

    def _stub(self, address: str) -> pb_grpc.WorkerStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channels[address] = channel
            stub = self._stubs[address] = pb_grpc.WorkerStub(channel)
        return stub

    async def load(self, node: str, address: str, request: pb.LoadRequest,
                   timeout_s: float) -> AsyncIterator[pb.LoadProgress]:
        call = self._stub(address).Load(request, metadata=self._metadata, timeout=timeout_s)
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as exc:
            raise _error(node, exc) from None
        finally:
            call.cancel()

    async def unload(self, node: str, address: str, instance_id: str, timeout_s: float = 60.0) -> int:
        try:
            reply = await self._stub(address).Unload(
                pb.UnloadRequest(instance_id=instance_id), metadata=self._metadata, timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise _error(node, exc) from None
        return reply.freed_bytes

    async def generate(self, node: str, address: str, instance_id: str, inp: GenerateInput,
                       timeout_s: float | None = None) -> AsyncIterator[pb.GenerateChunk]:
        """Streams chunks; closing the iterator (client gone) cancels the worker's stream."""
        call = self._stub(address).Generate(inp.to_proto(instance_id), metadata=self._metadata, timeout=timeout_s)
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as exc:
            raise _error(node, exc) from None
        finally:
            call.cancel()

    async def migrate_out(self, node: str, address: str, request: pb.MigrateOutRequest,
                          timeout_s: float | None = None) -> AsyncIterator[pb.MigrateOutEvent]:
        """Move requests of an instance on `node` to another worker; streams per-request progress."""
        call = self._stub(address).MigrateOut(request, metadata=self._metadata, timeout=timeout_s)
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as exc:
            raise _error(node, exc) from None
        finally:
            call.cancel()

    async def inventory(self, node: str, address: str, timeout_s: float = 10.0) -> pb.NodeStatus:
        try:
            return await self._stub(address).Inventory(pb.InventoryRequest(), metadata=self._metadata,
                                                       timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise _error(node, exc) from None

    async def close(self) -> None:
        for channel in self._channels.values():
            with contextlib.suppress(Exception):
                await channel.close()
        self._channels.clear()
        self._stubs.clear()


def _error(node: str, exc: grpc.aio.AioRpcError) -> WorkerCallError:
    return WorkerCallError(node, exc.code().name, exc.details() or "")
