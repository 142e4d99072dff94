"""Heartbeats against a real gRPC NodeRegistry server (a recording stand-in for the controller)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from ember.api import worker_pb2 as pb
from ember.api import worker_pb2_grpc as pb_grpc
from ember.worker.heartbeat import HeartbeatSender


class RecordingRegistry(pb_grpc.NodeRegistryServicer):
    """Remembers every call; forgets the node once when told to (a controller restart)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, pb.NodeStatus, dict[str, str]]] = []
        self.known: set[str] = set()
        self.arrived = asyncio.Event()

    def _record(self, kind: str, status: pb.NodeStatus, context) -> None:
        self.calls.append((kind, status, dict(context.invocation_metadata())))
        self.arrived.set()

    async def RegisterNode(self, request, context):
        self._record("register", request.status, context)
        self.known.add(request.status.node_id)
        return pb.RegisterNodeResponse(node_id=request.status.node_id)

    async def Heartbeat(self, request, context):
        self._record("heartbeat", request.status, context)
        return pb.HeartbeatResponse(known=request.status.node_id in self.known)

    async def wait_calls(self, n: int) -> None:
        while len(self.calls) < n:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), timeout=30)


async def start_registry() -> tuple[grpc.aio.Server, RecordingRegistry, str]:
    server = grpc.aio.server()
    registry = RecordingRegistry()
    pb_grpc.add_NodeRegistryServicer_to_server(registry, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, registry, f"127.0.0.1:{port}"


def test_registers_beats_on_change_and_reregisters_when_forgotten() -> None:
    async def scenario() -> None:
        server, registry, address = await start_registry()
        changed = asyncio.Event()
        counter = {"n": 0}

        def status() -> pb.NodeStatus:
            counter["n"] += 1
            return pb.NodeStatus(node_id="node-a", address="10.0.0.1:50061", queued_requests=counter["n"])

        # A long interval: any beat after the first comes from a state change, not the timer.
        sender = HeartbeatSender(address, status, changed, token="s3cret", interval_s=3600)
        task = asyncio.create_task(sender.run())
        try:
            await registry.wait_calls(1)
            assert registry.calls[0][0] == "register"
            assert registry.calls[0][2]["authorization"] == "Bearer s3cret"
            changed.set()
            await registry.wait_calls(2)
            assert registry.calls[1][0] == "heartbeat"
            assert registry.calls[1][1].queued_requests > registry.calls[0][1].queued_requests

            registry.known.clear()  # the controller restarted without state
            changed.set()
            await registry.wait_calls(4)
            assert [c[0] for c in registry.calls[2:4]] == ["heartbeat", "register"]
            while not sender.registered:  # the reply may still be on its way back
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await server.stop(None)

    asyncio.run(scenario())


def test_keeps_retrying_while_the_controller_is_down() -> None:
    async def scenario() -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        changed = asyncio.Event()
        sender = HeartbeatSender(f"127.0.0.1:{port}", lambda: pb.NodeStatus(node_id="n"), changed, interval_s=0.2)
        task = asyncio.create_task(sender.run())
        while sender.last_error is None:
            await asyncio.sleep(0.05)
        assert "UNAVAILABLE" in sender.last_error and not sender.registered
        # The controller comes up on that port: the sender registers without being restarted.
        server = grpc.aio.server()
        registry = RecordingRegistry()
        pb_grpc.add_NodeRegistryServicer_to_server(registry, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        try:
            await registry.wait_calls(1)
            assert registry.calls[0][0] == "register"
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await server.stop(None)

    asyncio.run(scenario())
