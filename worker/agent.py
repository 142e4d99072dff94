"""The gRPC servicer of ember.v1.Worker: instances, loads through the tiers, token streams.

The agent turns wire messages into backend calls and backend/store errors into gRPC statuses;
it owns the bookkeeping the controller relies on (instances and their state, memory held per
device, what each cache tier holds, measured tier bandwidths) and reports it as one NodeStatus,
both to Inventory callers and in heartbeats. A failing request never takes the worker down: each
RPC ends with a status that names what was wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from ember.api import worker_pb2 as pb
from ember.api import worker_pb2_grpc as pb_grpc
from ember.worker.backend import (
    Backend,
    BackendError,
    ContextTooLongError,
    GenerationRequest,
    InvalidRequestError,
    LoadReport,
    NotLoadedError,
    SamplingParams,
    UnknownRequestError,
)
from ember.worker.memory import DeviceUnavailable, MemoryBudget, MemoryExhausted
from ember.worker.metrics import TierBandwidth, WorkerMetrics
from ember.worker.migration_service import MigrationService
from ember.worker.model_store import Inspection, LocatedCheckpoint, ModelStore, parse_checkpoint_uri
from ember.worker.store_errors import ErrorKind, StoreError

log = logging.getLogger(__name__)

VERSION = "0.1.0"
DEFAULT_BACKEND = "transformers"
DEFAULT_MAX_TOKENS = SamplingParams.max_tokens

_STORE_CODES = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}
_STATES = {
    "loading": pb.INSTANCE_STATE_LOADING,
    "ready": pb.INSTANCE_STATE_READY,
    "unloading": pb.INSTANCE_STATE_UNLOADING,
}


class RpcError(Exception):
    """An error with the status code it is reported as."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _with_hint(exc: BaseException) -> str:
    hint = getattr(exc, "hint", None)
    text = str(exc)
    return f"{text} (hint: {hint})" if hint and hint not in text else text


def to_rpc_error(exc: BaseException) -> RpcError | None:
    """The status a known failure is reported with; None for anything else (a bug)."""
    from ember.ckpt_format.errors import CheckpointError, CorruptChunkError

    if isinstance(exc, RpcError):
        return exc
    if isinstance(exc, StoreError):
        return RpcError(_STORE_CODES[exc.kind], _with_hint(exc))
    if isinstance(exc, MemoryExhausted):
        return RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, DeviceUnavailable):
        return RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, ContextTooLongError):
        return RpcError(grpc.StatusCode.OUT_OF_RANGE, _with_hint(exc))
    if isinstance(exc, UnknownRequestError):
        return RpcError(grpc.StatusCode.NOT_FOUND, _with_hint(exc))
    if isinstance(exc, NotLoadedError):
        return RpcError(grpc.StatusCode.UNAVAILABLE, _with_hint(exc))
    if isinstance(exc, (InvalidRequestError, BackendError)):
        return RpcError(grpc.StatusCode.INVALID_ARGUMENT, _with_hint(exc))
    if isinstance(exc, CorruptChunkError):
        return RpcError(grpc.StatusCode.DATA_LOSS, _with_hint(exc))
    if isinstance(exc, CheckpointError):
        return RpcError(grpc.StatusCode.INVALID_ARGUMENT, _with_hint(exc))
    from ember.migration.protocol import ProtocolError
    from ember.worker.migration_sink import SinkError

    if isinstance(exc, SinkError):
        return RpcError(exc.code, str(exc))
    if isinstance(exc, ProtocolError):
        return RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"migration protocol: {exc}")
    from ember.loader.errors import InsufficientMemoryError, LoaderError

    if isinstance(exc, InsufficientMemoryError):
        return RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, _with_hint(exc))
    if isinstance(exc, LoaderError):
        return RpcError(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    return None


@dataclass
class Instance:
    id: str
    deployment: str
    checkpoint: str
    backend_name: str
    backend: Backend
    device: str = ""
    state: str = "loading"
    memory_bytes: int = 0
    source_tier: str = ""
    peak_batch_size: int = 0
    generated_tokens: int = 0
    ready_at: float = 0.0

    def to_proto(self) -> pb.InstanceStatus:
        active = queued = 0
        if self.state == "ready":
            active, queued = self.backend.active_requests(), self.backend.queue_depth()
        return pb.InstanceStatus(
            id=self.id,
            deployment=self.deployment,
            checkpoint=self.checkpoint,
            state=_STATES.get(self.state, pb.INSTANCE_STATE_UNSPECIFIED),
            active_requests=active,
            queued_requests=queued,
            backend=self.backend_name,
            device=self.device,
            memory_bytes=self.memory_bytes,
            source_tier=self.source_tier,
            peak_batch_size=self.peak_batch_size,
            generated_tokens=self.generated_tokens,
            ready_at_unix=self.ready_at,
        )


@dataclass
class AgentConfig:
    node_id: str
    address: str
    device: str = "cpu"  # default device kind for loads that name none


@dataclass
class _LoadTimings:
    started: float = field(default_factory=time.perf_counter)
    fetch_s: float = 0.0


class WorkerAgent(pb_grpc.WorkerServicer):
    def __init__(
        self,
        config: AgentConfig,
        store: ModelStore,
        budget: MemoryBudget,
        *,
        metrics: WorkerMetrics | None = None,
        bandwidth: TierBandwidth | None = None,
        backend_factory: Callable[[str], Backend] | None = None,
        peer_token: str | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.budget = budget
        self.metrics = metrics or WorkerMetrics()
        self.bandwidth = bandwidth or TierBandwidth()
        self._backend_factory = backend_factory
        self.instances: dict[str, Instance] = {}
        self.loads_by_tier: dict[str, int] = {}
        self.started = time.time()
        # Set whenever what the controller sees changes; the heartbeat sender waits on it.
        self.state_changed = asyncio.Event()
        # Live migration; peer_token authenticates this worker's MigrateIn calls to other workers.
        self.migration = MigrationService(self, token=peer_token)

    def _changed(self) -> None:
        self.state_changed.set()
        self.metrics.instances.set(sum(1 for i in self.instances.values() if i.state == "ready"))

    def _make_backend(self, name: str) -> Backend:
        if self._backend_factory is not None:
            return self._backend_factory(name)
        from ember.worker.backends import make_backend

        try:
            return make_backend(name)
        except (KeyError, ValueError, BackendError) as exc:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, _with_hint(exc)) from exc

    # -- Load ----------------------------------------------------------------------------------

    async def Load(self, request: pb.LoadRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.LoadProgress]:
        events: asyncio.Queue[pb.LoadProgress | BaseException | None] = asyncio.Queue()
        task = asyncio.create_task(self._load(request, events))
        try:
            while True:
                item = await events.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        except BaseException as exc:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            err = to_rpc_error(exc)
            if err is None:
                if not isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                    log.exception("load of %s failed", request.instance_id)
                    await context.abort(grpc.StatusCode.INTERNAL, f"load failed: {type(exc).__name__}: {exc}")
                raise
            await context.abort(err.code, str(err))
        await task

    async def _load(self, request: pb.LoadRequest, events: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self._load_steps(request, events.put_nowait, loop)
            events.put_nowait(None)
        except BaseException as exc:
            events.put_nowait(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def _load_steps(
        self, request: pb.LoadRequest, emit: Callable[[pb.LoadProgress], None], loop: asyncio.AbstractEventLoop
    ) -> None:
        instance_id = request.instance_id.strip()
        if not instance_id:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "instance_id is empty; the caller names each instance")
        if instance_id in self.instances:
            raise RpcError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"instance {instance_id!r} already exists on this worker (state {self.instances[instance_id].state})",
            )
        uri = parse_checkpoint_uri(request.checkpoint_uri)
        backend_name = request.backend.strip() or DEFAULT_BACKEND
        device_request = request.device.strip() or self.config.device
        self.budget.resolve(device_request, 0)  # unknown device: refuse before any I/O
        backend = self._make_backend(backend_name)
        instance = Instance(
            id=instance_id,
            deployment=request.deployment,
            checkpoint=request.checkpoint_uri,
            backend_name=backend_name,
            backend=backend,
        )
        self.instances[instance_id] = instance
        self._changed()
        timings = _LoadTimings()
        located: LocatedCheckpoint | None = None
        try:
            emit(pb.LoadProgress(phase=pb.LOAD_PHASE_FETCH, instance_id=instance_id, message="inspecting checkpoint"))
            inspection = await self.store.inspect(uri)
            needed = backend.memory_needed(inspection.index, device_request)
            device = self.budget.resolve(device_request, needed)
            self.budget.reserve(device, instance_id, needed)
            instance.device, instance.memory_bytes = device, needed
            located = await self._locate(inspection, instance_id, emit, loop)
            timings.fetch_s = located.fetch.seconds if located.fetch else 0.0
            report, located = await self._load_backend(instance, located, emit, loop)
        except BaseException:
            self.instances.pop(instance_id, None)
            self.budget.release(instance_id)
            with contextlib.suppress(Exception):
                await backend.unload()
            self.metrics.load_failures.inc()
            self._changed()
            raise
        finally:
            if located is not None:
                self.store.release(located)
        source_tier = "s3" if located.tier == "s3" else report.tier
        instance.source_tier = source_tier
        instance.state = "ready"
        instance.ready_at = time.time()
        total_s = time.perf_counter() - timings.started
        self.loads_by_tier[source_tier] = self.loads_by_tier.get(source_tier, 0) + 1
        self.metrics.loads.labels(source_tier).inc()
        self.metrics.load_seconds.labels(source_tier).observe(total_s)
        self.metrics.load_bytes.labels(report.tier).inc(report.bytes)
        # A disk load right after an S3 fetch reads pages the fetch just wrote (page cache): not a disk
        # rate. A DRAM hit after a fetch (it wrote through into the pool) is a DRAM read like any other.
        if located.tier != "s3" or report.tier == "dram":
            stats = report.stats  # the loader's LoadStats: its own clock, without tokenizer/engine start
            self._observe_bandwidth(report.tier, report.bytes, stats.seconds if stats is not None else report.load_s)
        self._changed()
        self.migration.instance_ready(instance)
        emit(
            pb.LoadProgress(
                phase=pb.LOAD_PHASE_READY,
                instance_id=instance_id,
                source_tier=source_tier,
                bytes_done=report.bytes,
                bytes_total=report.bytes,
                message=f"ready on {instance.device} in {total_s:.2f} s (from {source_tier})",
                fetch_s=timings.fetch_s,
                load_s=report.load_s,
                init_s=report.init_s,
                memory_bytes=instance.memory_bytes,
            )
        )

    async def _locate(
        self,
        inspection: Inspection,
        instance_id: str,
        emit: Callable[[pb.LoadProgress], None],
        loop: asyncio.AbstractEventLoop,
    ) -> LocatedCheckpoint:
        last = [0.0]

        def progress(done: int, total: int) -> None:  # called from download threads
            now = time.monotonic()
            if done < total and now - last[0] < 0.25:
                return
            last[0] = now
            event = pb.LoadProgress(
                phase=pb.LOAD_PHASE_FETCH,
                instance_id=instance_id,
                source_tier="s3",
                bytes_done=done,
                bytes_total=total,
                message="downloading from S3 into the disk cache",
            )
            loop.call_soon_threadsafe(emit, event)

        located = await self.store.locate(inspection, progress)
        if located.fetch is not None:
            self._observe_bandwidth("s3", located.fetch.bytes, located.fetch.seconds)
            self.metrics.load_bytes.labels("s3").inc(located.fetch.bytes)
            self._changed()  # a new disk cache entry
        return located

    async def _load_backend(
        self,
        instance: Instance,
        located: LocatedCheckpoint,
        emit: Callable[[pb.LoadProgress], None],
        loop: asyncio.AbstractEventLoop,
    ) -> tuple[LoadReport, LocatedCheckpoint]:
        from ember.ckpt_format.errors import CorruptChunkError

        emit(
            pb.LoadProgress(
                phase=pb.LOAD_PHASE_LOAD,
                instance_id=instance.id,
                source_tier=self._expected_tier(located),
                message=f"loading onto {instance.device}",
            )
        )
        try:
            return await instance.backend.load(located.path, instance.device, pool=self.store.dram_pool), located
        except CorruptChunkError as exc:
            if not located.cached:
                raise  # a local checkpoint has no other source: DATA_LOSS, naming the chunk
            log.warning("corrupt chunk in disk cache entry %s: %s; fetching it again", located.uri.canonical, exc)
            emit(
                pb.LoadProgress(
                    phase=pb.LOAD_PHASE_FETCH,
                    instance_id=instance.id,
                    source_tier="s3",
                    message=f"disk cache entry is corrupt ({exc}); dropped, fetching again from S3",
                )
            )
            self.store.forget_dram(located.path)
            with contextlib.suppress(Exception):
                await instance.backend.unload()
            located = await self.store.refetch(located, self._refetch_progress(instance.id, emit, loop))
            if located.fetch is not None:
                self._observe_bandwidth("s3", located.fetch.bytes, located.fetch.seconds)
            self._changed()
            return await instance.backend.load(located.path, instance.device, pool=self.store.dram_pool), located

    @staticmethod
    def _refetch_progress(
        instance_id: str, emit: Callable[[pb.LoadProgress], None], loop: asyncio.AbstractEventLoop
    ) -> Callable[[int, int], None]:
        def progress(done: int, total: int) -> None:
            if done == total:
                event = pb.LoadProgress(
                    phase=pb.LOAD_PHASE_FETCH, instance_id=instance_id, source_tier="s3",
                    bytes_done=done, bytes_total=total, message="re-downloaded from S3",
                )
                loop.call_soon_threadsafe(emit, event)

        return progress

    def _expected_tier(self, located: LocatedCheckpoint) -> str:
        return "dram" if self.store.in_dram(located.path) else "disk"

    def _observe_bandwidth(self, tier: str, nbytes: int, seconds: float) -> None:
        gbps = self.bandwidth.observe(tier, nbytes, seconds)
        if gbps is not None:
            self.metrics.tier_read_gbps.labels(tier).set(gbps)

    # -- Unload --------------------------------------------------------------------------------

    async def Unload(self, request: pb.UnloadRequest, context: grpc.aio.ServicerContext) -> pb.UnloadResponse:
        try:
            instance = self._get(request.instance_id)
            if instance.state != "ready":
                raise RpcError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"instance {instance.id!r} is {instance.state}; unload it once it is ready "
                    "(cancel its Load call to stop a load)",
                )
            instance.state = "unloading"
            self._changed()
            try:
                await instance.backend.unload()
            finally:
                self.instances.pop(instance.id, None)
                freed = self.budget.release(instance.id)
                self._changed()
            return pb.UnloadResponse(instance_id=instance.id, freed_bytes=freed)
        except RpcError as exc:
            await context.abort(exc.code, str(exc))
            raise  # unreachable: abort raises

    def _get(self, instance_id: str) -> Instance:
        instance = self.instances.get(instance_id)
        if instance is None:
            known = ", ".join(sorted(self.instances)) or "none"
            raise RpcError(
                grpc.StatusCode.NOT_FOUND,
                f"no instance {instance_id!r} on worker {self.config.node_id} (instances: {known})",
            )
        return instance

    # -- Generate ------------------------------------------------------------------------------

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        outcome = "error"
        try:
            instance = self._get(request.instance_id)
            if instance.state != "ready":
                raise RpcError(grpc.StatusCode.UNAVAILABLE, f"instance {instance.id!r} is {instance.state}, not ready")
            request_id, stream = await self.migration.open_stream(instance, request)
            async with contextlib.aclosing(stream):
                async for event in stream:
                    instance.peak_batch_size = max(instance.peak_batch_size, instance.backend.active_requests())
                    self.metrics.peak_batch_size.set(max((i.peak_batch_size for i in self.instances.values()), default=0))
                    if event.token_ids:
                        instance.generated_tokens += len(event.token_ids)
                        self.metrics.generated_tokens.inc(len(event.token_ids))
                    if event.finish_reason is not None:
                        outcome = event.finish_reason
                        self.metrics.prompt_tokens.inc(event.prompt_tokens)
                    yield pb.GenerateChunk(
                        text=event.text,
                        token_ids=event.token_ids,
                        finish_reason=event.finish_reason or "",
                        prompt_tokens=event.prompt_tokens,
                        completion_tokens=event.completion_tokens,
                        request_id=request_id,
                        handover=getattr(event, "handover", None),
                    )
        except (asyncio.CancelledError, GeneratorExit):  # the client went away: the backend slot is freed
            self.metrics.generate_requests.labels("client_cancelled").inc()
            raise
        except (RpcError, BackendError, StoreError) as exc:
            err = to_rpc_error(exc)
            assert err is not None
            outcome = "invalid" if err.code != grpc.StatusCode.UNAVAILABLE else "unavailable"
            self.metrics.generate_requests.labels(outcome).inc()
            await context.abort(err.code, str(err))
        except Exception as exc:  # a bug in a backend: report it, keep serving
            log.exception("generate on %s failed", request.instance_id)
            self.metrics.generate_requests.labels("error").inc()
            await context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {type(exc).__name__}: {exc}")
        else:
            self.metrics.generate_requests.labels(outcome).inc()

    @staticmethod
    def _generation_request(request: pb.GenerateRequest) -> GenerationRequest:
        given = [
            name
            for name, present in (
                ("prompt", request.HasField("prompt")),
                ("messages", len(request.messages) > 0),
                ("prompt_token_ids", len(request.prompt_token_ids) > 0),
            )
            if present
        ]
        if len(given) != 1:
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "set exactly one of prompt, messages, prompt_token_ids"
                + (f" (got {', '.join(given)})" if given else " (got none)"),
            )
        s = request.sampling
        params = SamplingParams(
            max_tokens=s.max_tokens if s.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
            temperature=s.temperature if s.HasField("temperature") else 1.0,
            top_p=s.top_p if s.HasField("top_p") else 1.0,
            top_k=s.top_k if s.HasField("top_k") else 0,
            seed=s.seed if s.HasField("seed") else None,
            stop=tuple(s.stop),
        )
        return GenerationRequest(
            request_id=request.request_id or uuid.uuid4().hex,
            prompt=request.prompt if request.HasField("prompt") else None,
            messages=[{"role": m.role, "content": m.content} for m in request.messages] or None,
            prompt_token_ids=list(request.prompt_token_ids) or None,
            params=params,
        )

    # -- live migration ------------------------------------------------------------------------

    async def MigrateOut(
        self, request: pb.MigrateOutRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.MigrateOutEvent]:
        try:
            async for event in self.migration.migrate_out(request):
                yield event
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            await self._abort(context, exc, f"migration of {request.instance_id}")

    async def MigrateIn(
        self, request_iterator: AsyncIterator[pb.MigrateInMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.MigrateInReply]:
        try:
            async for reply in self.migration.migrate_in(request_iterator):
                yield reply
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            await self._abort(context, exc, "incoming migration")

    async def _abort(self, context: grpc.aio.ServicerContext, exc: Exception, what: str) -> None:
        err = to_rpc_error(exc)
        if err is None:
            log.exception("%s failed", what)
            err = RpcError(grpc.StatusCode.INTERNAL, f"{what} failed: {type(exc).__name__}: {exc}")
        await context.abort(err.code, str(err))

    # -- status --------------------------------------------------------------------------------

    async def ListInstances(
        self, request: pb.ListInstancesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListInstancesResponse:
        return pb.ListInstancesResponse(instances=[i.to_proto() for i in self.instances.values()])

    async def Inventory(self, request: pb.InventoryRequest, context: grpc.aio.ServicerContext) -> pb.NodeStatus:
        return self.node_status()

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        return pb.HealthResponse(
            ok=True,
            node_id=self.config.node_id,
            uptime_s=time.time() - self.started,
            version=VERSION,
            instances=len(self.instances),
        )

    def node_status(self) -> pb.NodeStatus:
        instances = [i.to_proto() for i in self.instances.values()]
        devices = [
            pb.DeviceStatus(
                name=d.name,
                total_memory_bytes=d.total_bytes,
                free_memory_bytes=d.free_bytes,
                description=d.description,
            )
            for d in self.budget.snapshot()
        ]
        disk = self.store.disk
        disk_tier = pb.Tier(
            capacity_bytes=disk.capacity_bytes,
            used_bytes=disk.used_bytes,
            checkpoints=[
                pb.CachedCheckpoint(uri=e.uri, bytes=e.bytes, last_used_unix=e.last_used) for e in disk.entries()
            ],
            read_gbps=self.bandwidth.gbps("disk"),
        )
        dram = self.store.dram_inventory()
        dram_tier = pb.Tier(
            capacity_bytes=dram.capacity_bytes,
            used_bytes=dram.used_bytes,
            checkpoints=[pb.CachedCheckpoint(uri=uri, bytes=nbytes) for uri, nbytes in dram.checkpoints],
            read_gbps=self.bandwidth.gbps("dram"),
        )
        self.metrics.cache_bytes.labels("disk").set(disk_tier.used_bytes)
        self.metrics.cache_bytes.labels("dram").set(dram_tier.used_bytes)
        status = pb.NodeStatus(
            node_id=self.config.node_id,
            address=self.config.address,
            devices=devices,
            instances=instances,
            tiers={"disk": disk_tier, "dram": dram_tier},
            queued_requests=sum(i.queued_requests for i in instances),
            active_requests=sum(i.active_requests for i in instances),
            s3_read_gbps=self.bandwidth.gbps("s3"),
            timestamp_unix=time.time(),
            version=VERSION,
            loads_by_tier=self.loads_by_tier,
        )
        self.migration.annotate(status)
        return status

    async def shutdown(self) -> None:
        """Unload every instance (process exit): backends free device memory and end their streams."""
        await self.migration.close()
        for instance in list(self.instances.values()):
            with contextlib.suppress(Exception):
                await instance.backend.unload()
            self.instances.pop(instance.id, None)
            self.budget.release(instance.id)
        self._changed()
