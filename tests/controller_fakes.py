"""Test helpers for the controller's unit tests: a recording fake worker client, a fake clock,
node statuses, and a controller served over real HTTP on a free loopback port.

Only the layer above the workers is tested with these (test_controller_*.py); tests with real
worker processes are test_e2e_*.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

from ember.api import worker_pb2 as pb
from ember.controller.app import Controller
from ember.controller.config import ControllerConfig
from ember.controller.state import open_store
from ember.controller.worker_client import WorkerCallError

GB = 10**9


class FakeWorkers:
    """Records calls; loads and generations can be held open by tests."""

    def __init__(self) -> None:
        self.loads: list[tuple[str, str]] = []
        self.unloads: list[str] = []
        self.load_errors: dict[str, WorkerCallError] = {}
        self.generate_errors: dict[str, WorkerCallError] = {}
        self.hold_loads = False
        self.load_gates: dict[str, asyncio.Event] = {}
        self.hold_generation: asyncio.Event | None = None
        self.generating = 0
        self.cancelled = 0
        self.tokens = 3
        self.memory_bytes = 0  # what READY says the instance holds (0: not reported)

    async def load(self, node, address, request, timeout_s):
        self.loads.append((node, request.instance_id))
        if node in self.load_errors:
            raise self.load_errors[node]
        yield pb.LoadProgress(phase=pb.LOAD_PHASE_FETCH, instance_id=request.instance_id, message="inspecting")
        yield pb.LoadProgress(phase=pb.LOAD_PHASE_LOAD, instance_id=request.instance_id, source_tier="disk")
        if self.hold_loads:
            gate = self.load_gates[request.instance_id] = asyncio.Event()
            await gate.wait()
        yield pb.LoadProgress(phase=pb.LOAD_PHASE_READY, instance_id=request.instance_id, source_tier="disk",
                              bytes_done=10**6, bytes_total=10**6, load_s=0.01, init_s=0.02,
                              memory_bytes=self.memory_bytes)

    def release_loads(self) -> None:
        """Let held loads finish, and loads that start from now on run straight through (the
        autoscaler may start another instance after the release; holding it would hang it)."""
        self.hold_loads = False
        for gate in self.load_gates.values():
            gate.set()

    async def unload(self, node, address, instance_id, timeout_s=60.0):
        self.unloads.append(instance_id)
        return 0

    async def generate(self, node, address, instance_id, inp, timeout_s=None):
        if instance_id in self.generate_errors:
            raise self.generate_errors.pop(instance_id)
        self.generating += 1
        try:
            for i in range(self.tokens):
                if self.hold_generation is not None and i == 1:
                    await self.hold_generation.wait()
                last = i == self.tokens - 1
                yield pb.GenerateChunk(text=f"t{i} ", token_ids=[i], prompt_tokens=2, completion_tokens=i + 1,
                                       finish_reason="length" if last else "")
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise
        finally:
            self.generating -= 1

    async def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def node_status(node_id: str, *, instances=(), free_gb: float = 16, disk: dict | None = None) -> pb.NodeStatus:
    return pb.NodeStatus(
        node_id=node_id, address=f"{node_id}.fake:1",
        devices=[pb.DeviceStatus(name="cpu", total_memory_bytes=32 * GB, free_memory_bytes=int(free_gb * GB))],
        tiers={"disk": pb.Tier(capacity_bytes=100 * GB,
                               checkpoints=[pb.CachedCheckpoint(uri=u, bytes=b) for u, b in (disk or {}).items()]),
               "dram": pb.Tier(capacity_bytes=8 * GB)},
        instances=list(instances),
    )


def ready_instance(instance_id: str, deployment: str = "demo") -> pb.InstanceStatus:
    return pb.InstanceStatus(id=instance_id, deployment=deployment, state=pb.INSTANCE_STATE_READY)


async def make_controller(state: str = "sqlite:///:memory:", workers: FakeWorkers | None = None,
                          clock: Clock | None = None, **config) -> Controller:
    cfg = ControllerConfig(state=state, **config)
    ctl = Controller(cfg, await open_store(state), workers or FakeWorkers(), clock=clock)
    await ctl.start()
    return ctl


async def close(ctl: Controller) -> None:
    await ctl.stop()
    await ctl.store.close()


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout=60))


async def until(condition: Callable[[], bool], what: str) -> None:
    """Yield to the loop until the condition holds (events drive it; no wall-clock assertion)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"never happened: {what}")




@contextlib.asynccontextmanager
async def http_server(ctl: Controller) -> AsyncIterator[str]:
    """The controller's FastAPI app on uvicorn (a real server, so streams and disconnects are real)."""
    import uvicorn

    from ember.controller.http_api import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(ctl), log_level="warning", lifespan="off"))
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()
