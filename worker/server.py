"""The worker process: gRPC server for ember.v1.Worker, heartbeats, Prometheus metrics.

`ember worker …` builds a WorkerConfig and calls run(). Everything the process needs is created
here and passed down (vLLM-style config objects, no globals), so tests can run several workers
side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from pathlib import Path

import grpc

from ember.api import worker_pb2_grpc as pb_grpc
from ember.worker.agent import AgentConfig, WorkerAgent
from ember.worker.auth import TOKEN_ENV, BearerTokenInterceptor
from ember.worker.config import GB, WorkerConfig, WorkerConfigError
from ember.worker.heartbeat import HeartbeatSender
from ember.worker.memory import MemoryBudget
from ember.worker.metrics import TierBandwidth, WorkerMetrics
from ember.worker.model_store import ModelStore
from ember.worker.s3_source import S3Source
from ember.worker.transformers_backend import import_libraries

log = logging.getLogger("ember.worker")

SHUTDOWN_GRACE_S = 5.0


def make_dram_pool(capacity_bytes: int):
    """The loader's DRAM tier, or None when disabled (capacity 0)."""
    if capacity_bytes <= 0:
        return None
    from ember.loader import DramPool

    return DramPool(capacity_bytes)


async def warm_up(agent: WorkerAgent, idle_poll_s: float = 1.0) -> None:
    """Preload the libraries, then move every object alive so far out of the collector's sight.

    Unloading a model runs a full gc.collect() (transformers modules hold reference cycles, and
    their memory must be back before the next load is admitted). With torch and transformers
    imported, a full collection walks ~350k objects: 0.175 s on the event loop, measured, which
    delayed the next cold start on the worker by as much (bench/coldstart.py's "cold from DRAM"
    came out slower than "cold from disk" for this reason). After gc.freeze() of the startup
    objects the same collection takes 0.010 s. Frozen objects are never collected, so the freeze
    waits for a moment with no instance (a model's objects must stay collectable) and collects
    first.
    """
    await asyncio.to_thread(import_libraries)  # now, not during the first cold start
    while agent.instances:
        await asyncio.sleep(idle_poll_s)
    gc.collect()
    gc.freeze()
    log.info("preloaded torch and transformers; %d startup objects frozen out of garbage collection", gc.get_freeze_count())


async def serve(config: WorkerConfig, *, ready: asyncio.Event | None = None) -> None:
    config.validate()
    token = config.token if config.token is not None else os.environ.get(TOKEN_ENV) or None
    cache_dir = Path(config.cache_dir).expanduser()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WorkerConfigError(f"cannot create --cache-dir {cache_dir}: {exc.strerror}") from exc
    dram_bytes = config.dram_cache_bytes
    budget = MemoryBudget.detect(config.device, dram_cache_bytes=dram_bytes if config.device == "cpu" else 0)
    store = ModelStore(cache_dir, int(config.disk_cache_gb * GB), dram_pool=make_dram_pool(dram_bytes),
                       s3=S3Source(settings=config.s3_settings()))
    for dropped in store.disk.dropped_at_start:
        log.warning("disk cache: dropped broken entry %s", dropped)
    metrics = WorkerMetrics()
    if config.metrics_port is not None:
        metrics.serve(config.host, config.metrics_port)

    interceptors = [BearerTokenInterceptor(token)] if token else []
    # Migration chunks are ~1 MiB; the limit leaves room for a long prompt's commit message.
    server = grpc.aio.server(interceptors=interceptors, options=[("grpc.max_receive_message_length", 64 << 20)])
    bind = f"{config.host}:{config.port}" if ":" not in config.host else f"[{config.host}]:{config.port}"
    port = server.add_insecure_port(bind)
    if port == 0:
        raise WorkerConfigError(f"cannot listen on {bind}", "pick another --port or --host")
    agent = WorkerAgent(
        AgentConfig(node_id=config.resolved_node_id(), address=config.resolved_address(port), device=config.device),
        store,
        budget,
        metrics=metrics,
        bandwidth=TierBandwidth(),
        peer_token=token,
    )
    pb_grpc.add_WorkerServicer_to_server(agent, server)
    await server.start()
    log.info(
        "worker %s listening on %s (advertised %s); disk cache %s (%.1f GB, %d entries), DRAM tier %.1f GB, device %s",
        agent.config.node_id, bind.rsplit(":", 1)[0] + f":{port}", agent.config.address, store.disk.root,
        config.disk_cache_gb, len(store.disk.entries()), dram_bytes / GB, config.device,
    )
    print(f"ember worker listening on {config.host}:{port}", flush=True)

    warm_up_task = asyncio.create_task(warm_up(agent), name="ember-warm-up")
    heartbeat_task = None
    if config.controller:
        sender = HeartbeatSender(config.controller, agent.node_status, agent.state_changed, token=token)
        heartbeat_task = asyncio.create_task(sender.run())

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("worker %s shutting down", agent.config.node_id)
        if heartbeat_task is not None:
            heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat_task
        await server.stop(SHUTDOWN_GRACE_S)
        await agent.shutdown()
        warm_up_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await warm_up_task


def run(config: WorkerConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(config))
