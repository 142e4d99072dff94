"""Keeps the controller's view of this worker current: register, then heartbeat.

A heartbeat carries the full NodeStatus (it is small: devices, instances, cached checkpoints),
so the controller never has to merge deltas and a restarted controller is whole again after one
beat. Beats go out every interval and at once when the agent signals a state change (an instance
became ready or went away, a cache entry appeared), which is what the scheduler's locality
decisions need to be fresh. The controller answers known=false when it has forgotten the node
(restart without state): the worker registers again.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

import grpc

from ember.api import worker_pb2 as pb
from ember.api import worker_pb2_grpc as pb_grpc
from ember.worker.auth import bearer_metadata
from ember.worker.config import WorkerConfigError

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 2.0
RPC_TIMEOUT_S = 5.0
MAX_BACKOFF_S = 10.0
# The controller sets it for `ember serve --tls-cert`; in clusters, set it to the CA's PEM file.
CONTROLLER_CA_ENV = "EMBER_CONTROLLER_CA"


def controller_channel(address: str) -> grpc.aio.Channel:
    """TLS when EMBER_CONTROLLER_CA names the PEM the controller's certificate chains to."""
    ca = os.environ.get(CONTROLLER_CA_ENV)
    if not ca:
        return grpc.aio.insecure_channel(address)
    try:
        roots = Path(ca).read_bytes()
    except OSError as exc:
        raise WorkerConfigError(f"{CONTROLLER_CA_ENV}={ca} cannot be read: {exc.strerror}") from exc
    return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=roots))


class HeartbeatSender:
    def __init__(
        self,
        controller: str,
        status: Callable[[], pb.NodeStatus],
        changed: asyncio.Event,
        *,
        token: str | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
    ) -> None:
        self.controller = controller
        self._status = status
        self._changed = changed
        self._metadata = bearer_metadata(token)
        self.interval_s = interval_s
        self.registered = False
        self.beats_sent = 0
        self.last_error: str | None = None

    async def run(self) -> None:
        """Runs until cancelled; controller outages are logged and retried with backoff."""
        async with controller_channel(self.controller) as channel:
            stub = pb_grpc.NodeRegistryStub(channel)
            backoff = 0.5
            while True:
                self._changed.clear()
                try:
                    await self._beat(stub)
                    backoff = 0.5
                    wait_s = self.interval_s
                except grpc.aio.AioRpcError as exc:
                    message = f"{exc.code().name}: {exc.details()}"
                    if message != self.last_error:
                        log.warning("controller %s: %s (retrying)", self.controller, message)
                    self.last_error = message
                    if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                        log.error("the controller refused this worker's token: check EMBER_WORKER_TOKEN")
                    wait_s = backoff
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout=wait_s)
                except asyncio.TimeoutError:
                    pass

    async def _beat(self, stub: pb_grpc.NodeRegistryStub) -> None:
        status = self._status()
        if not self.registered:
            reply = await stub.RegisterNode(
                pb.RegisterNodeRequest(status=status), metadata=self._metadata, timeout=RPC_TIMEOUT_S
            )
            self.registered = True
            log.info("registered with controller %s as %s", self.controller, reply.node_id or status.node_id)
        else:
            reply = await stub.Heartbeat(
                pb.HeartbeatRequest(status=status), metadata=self._metadata, timeout=RPC_TIMEOUT_S
            )
            if not reply.known:
                log.info("controller %s does not know this node any more: registering again", self.controller)
                self.registered = False
                await self._beat(stub)
                return
        if reply.heartbeat_interval_s > 0:
            self.interval_s = reply.heartbeat_interval_s
        self.beats_sent += 1
        self.last_error = None
