"""The controller's gRPC NodeRegistry: registration, heartbeats, the worker token; and that the
controller side never imports torch (it must run with the base install)."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from controller_fakes import FakeWorkers, close, make_controller, node_status, run

from ember.api import worker_pb2 as pb
from ember.api import worker_pb2_grpc as pb_grpc
from ember.controller.grpc_api import add_services


async def registry(ctl) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    add_services(server, ctl)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_register_heartbeat_and_forgotten_nodes() -> None:
    async def body() -> None:
        ctl = await make_controller(workers=FakeWorkers(), heartbeat_interval_s=1.5)
        server, address = await registry(ctl)
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = pb_grpc.NodeRegistryStub(channel)
                beat = await stub.Heartbeat(pb.HeartbeatRequest(status=node_status("w1")))
                assert beat.known is False  # never registered: the worker will register
                reply = await stub.RegisterNode(pb.RegisterNodeRequest(status=node_status("w1")))
                assert reply.node_id == "w1" and reply.heartbeat_interval_s == 1.5
                beat = await stub.Heartbeat(pb.HeartbeatRequest(status=node_status("w1", free_gb=3)))
                assert beat.known is True
                assert ctl.cluster.nodes["w1"].free_bytes == 3 * 10**9
                assert [n.id for n in await ctl.store.list_nodes()] == ["w1"]
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.RegisterNode(pb.RegisterNodeRequest(status=pb.NodeStatus(node_id="")))
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            await server.stop(None)
            await close(ctl)

    run(body)


def test_the_worker_token_is_required_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_WORKER_TOKEN", "s3cret")

    async def body() -> None:
        ctl = await make_controller(workers=FakeWorkers())
        server, address = await registry(ctl)
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = pb_grpc.NodeRegistryStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.RegisterNode(pb.RegisterNodeRequest(status=node_status("w1")))
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "EMBER_WORKER_TOKEN" in info.value.details()
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.RegisterNode(pb.RegisterNodeRequest(status=node_status("w1")),
                                            metadata=(("authorization", "Bearer wrong"),))
                await stub.RegisterNode(pb.RegisterNodeRequest(status=node_status("w1")),
                                        metadata=(("authorization", "Bearer s3cret"),))
                assert "w1" in ctl.node_records
        finally:
            await server.stop(None)
            await close(ctl)

    run(body)


def test_the_controller_and_its_cli_never_import_torch() -> None:
    code = (
        "import sys\n"
        "import ember.controller.server, ember.controller.serve, ember.api.client\n"
        "import ember.cli.main\n"
        "from ember.cli.errors import user_error_types\n"
        "user_error_types()\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
