"""Instance lifecycle on real workers: start (Load stream), stop (Unload), adopt after a restart,
and clean-up when a node goes down.

Each start follows one scheduler placement: the instance is registered with the router as
"starting" before the Load call (so further requests count it as capacity instead of starting
another), progress events are relayed to the requests waiting for it, and the READY event's
timings feed the cold-start metrics and the scheduler's bandwidth and init-time estimates.
A failed load frees its reservation; a failure of the node (or of its room) excludes that node
for a while and lets the autoscaler try elsewhere, a failure of the checkpoint fails the
waiting requests with the worker's own message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ember.api import worker_pb2 as pb
from ember.controller.errors import Unavailable
from ember.controller.models import InstanceRecord
from ember.controller.recent_events import ColdStart
from ember.controller.router import DeploymentState, InstanceSlot
from ember.controller.scheduler import ModelInfo, Placement
from ember.controller.worker_client import WorkerCallError

if TYPE_CHECKING:
    from ember.controller.app import Controller

log = logging.getLogger("ember.controller.instances")

FAILED_NODE_BACKOFF_S = 30.0
PHASE_NAMES = {pb.LOAD_PHASE_FETCH: "fetch", pb.LOAD_PHASE_LOAD: "load", pb.LOAD_PHASE_INIT: "init",
               pb.LOAD_PHASE_READY: "ready"}


@dataclass(eq=False)
class Managed:
    """The controller's side of one instance: its router slot, its record, its load."""

    slot: InstanceSlot
    record: InstanceRecord
    reserved_bytes: int = 0
    load_task: asyncio.Task | None = None
    unloading: bool = False
    started_at: float = 0.0  # clock time of the Load call
    queue_wait_s: float = 0.0
    scheduling_s: float = 0.0


def load_percent(event: pb.LoadProgress, elapsed_s: float, estimate_s: float) -> float:
    """How far a load is, from its bytes when the worker reports them, else from the estimate."""
    if event.phase == pb.LOAD_PHASE_READY:
        return 100.0
    by_time = 95.0 * min(1.0, elapsed_s / estimate_s) if estimate_s > 0 else 0.0
    if event.phase == pb.LOAD_PHASE_FETCH and event.bytes_total > 0:
        return max(by_time, 5.0 + 65.0 * event.bytes_done / event.bytes_total)
    if event.phase in (pb.LOAD_PHASE_LOAD, pb.LOAD_PHASE_INIT) and event.source_tier == "s3":
        return max(by_time, 70.0)
    return by_time


class Instances:
    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl
        self.managed: dict[str, Managed] = {}
        self._by_node: dict[str, set[str]] = {}  # heartbeats touch one node's instances, not all

    def _add(self, managed: Managed) -> None:
        self.managed[managed.slot.id] = managed
        self._by_node.setdefault(managed.slot.node, set()).add(managed.slot.id)

    def on_node(self, node_id: str) -> list[Managed]:
        return [self.managed[i] for i in sorted(self._by_node.get(node_id, ())) if i in self.managed]

    # -- start --------------------------------------------------------------------------------

    def start(self, state: DeploymentState, placement: Placement, model: ModelInfo,
              queue_wait_s: float, scheduling_s: float) -> Managed:
        ctl = self.ctl
        now = ctl.clock()
        estimate = placement.estimate
        instance_id = f"{state.name}-{uuid.uuid4().hex[:10]}"
        slot = InstanceSlot(
            id=instance_id, deployment=state.name, node=placement.node_id, address=placement.address,
            state="starting", created_at=now, expected_ready_at=now + estimate.total_s,
        )
        record = InstanceRecord(
            id=instance_id, deployment=state.name, node=placement.node_id, state="starting",
            checkpoint=state.record.checkpoint, backend=state.record.backend, created_at=time.time(),
            estimated_ready_s=estimate.total_s,
        )
        managed = Managed(slot, record, placement.reserved_bytes, started_at=now, queue_wait_s=queue_wait_s,
                          scheduling_s=scheduling_s)
        self._add(managed)
        ctl.router.add_slot(slot)
        ctl.cluster.reserve(placement.node_id, instance_id, placement.reserved_bytes, now + estimate.total_s)
        log.info(
            "start %s on %s (%s policy): estimated time to ready %.2f s = queue %.2f + %s %.2f + init %.2f; "
            "%d node(s) examined in %.3f ms",
            instance_id, placement.node_id, placement.policy, estimate.total_s, estimate.queue_wait_s,
            estimate.tier, estimate.transfer_s, estimate.init_s, placement.examined, scheduling_s * 1e3,
        )
        managed.load_task = asyncio.create_task(self._load(state, managed, model), name=f"load-{instance_id}")
        return managed

    async def _load(self, state: DeploymentState, managed: Managed, model: ModelInfo) -> None:
        ctl = self.ctl
        slot, record = managed.slot, managed.record
        estimate = record.estimated_ready_s or 0.0
        request = pb.LoadRequest(instance_id=slot.id, deployment=slot.deployment,
                                 checkpoint_uri=record.checkpoint, backend=record.backend)
        final: pb.LoadProgress | None = None
        try:
            await ctl.persist_instance(record)
            async for event in ctl.workers.load(slot.node, slot.address, request, ctl.config.load_timeout_s):
                if slot.state == "starting":
                    slot.state = record.state = "loading"
                percent = load_percent(event, ctl.clock() - managed.started_at, estimate)
                slot.progress = max(slot.progress, percent)
                phase = PHASE_NAMES.get(event.phase, "load")
                where = f" from {event.source_tier}" if event.source_tier else ""
                ctl.router.progress(state, slot.progress, f"{phase}{where} on {slot.node}")
                if event.phase == pb.LOAD_PHASE_READY:
                    final = event
            if final is None:
                raise WorkerCallError(slot.node, "INTERNAL", "the Load stream ended without a READY event")
        except WorkerCallError as exc:
            await self._failed(state, managed, exc)
            return
        except asyncio.CancelledError:
            self._forget(managed)
            with contextlib.suppress(Exception):
                await ctl.store.delete_instance(slot.id)
            raise
        await self._ready(state, managed, final, model)

    async def _ready(self, state: DeploymentState, managed: Managed, event: pb.LoadProgress, model: ModelInfo) -> None:
        ctl = self.ctl
        slot, record = managed.slot, managed.record
        actual = ctl.clock() - managed.started_at
        tier = event.source_tier or "unknown"
        record.state = "ready"
        record.ready_at = time.time()
        record.source_tier = tier
        record.actual_ready_s = actual
        ctl.cluster.finish(slot.node, slot.id)
        if event.bytes_total > 0 and event.load_s > 0 and tier in ("dram", "disk"):
            ctl.cluster.observe_load(slot.node, tier, event.bytes_total, event.load_s)
        if event.fetch_s > 0:
            ctl.cluster.observe_load(slot.node, "s3", model.size_bytes, event.fetch_s)
            ctl.cluster.add_holding(slot.node, "disk", model.uri, model.size_bytes)
        if event.memory_bytes > 0:  # what it really holds, for later placements and migration plans
            state.memory_bytes = managed.reserved_bytes = event.memory_bytes
        if event.init_s > 0:
            old = state.init_ewma_s
            state.init_ewma_s = event.init_s if old is None else 0.7 * old + 0.3 * event.init_s
            old = ctl.init_ewma_s
            ctl.init_ewma_s = event.init_s if old is None else 0.7 * old + 0.3 * event.init_s
        m = ctl.metrics
        m.cold_starts.labels(slot.deployment, tier).inc()
        for phase, seconds in (("queue_wait", managed.queue_wait_s), ("scheduling", managed.scheduling_s),
                               ("fetch", event.fetch_s), ("load", event.load_s), ("init", event.init_s)):
            m.cold_start_phase.labels(tier, phase).observe(seconds)
        estimated = record.estimated_ready_s or 0.0
        m.time_to_ready.labels(tier, "estimated").observe(estimated)
        m.time_to_ready.labels(tier, "actual").observe(actual)
        if estimated > 0:
            m.time_to_ready_ratio.labels(tier).observe(actual / estimated)
        log.info("instance %s ready on %s from %s in %.2f s (estimated %.2f s; fetch %.2f, load %.2f, init %.2f)",
                 slot.id, slot.node, tier, actual, estimated, event.fetch_s, event.load_s, event.init_s)
        ctl.recent.cold_start(ColdStart(
            instance=slot.id, deployment=slot.deployment, node=slot.node, tier=tier,
            estimated_s=record.estimated_ready_s, actual_s=actual, fetch_s=event.fetch_s, load_s=event.load_s,
            init_s=event.init_s, bytes=event.bytes_total or model.size_bytes, finished_at=record.ready_at))
        state.last_error = None
        state.backoff_until = 0.0
        managed.load_task = None
        if ctl.router.deployments.get(slot.deployment) is not state or slot.state == "stopping":
            await self.stop(managed)  # deleted or retired while it loaded
            return
        ctl.router.slot_ready(slot)
        await ctl.persist_instance(record)
        ctl.reconcile(slot.deployment)

    async def _failed(self, state: DeploymentState, managed: Managed, exc: WorkerCallError) -> None:
        ctl = self.ctl
        slot = managed.slot
        self._forget(managed)
        with contextlib.suppress(Exception):
            await ctl.store.delete_instance(slot.id)
        ctl.metrics.load_failures.labels(slot.deployment, exc.code).inc()
        message = f"loading {state.record.checkpoint} on node {slot.node} failed: {exc.code}: {exc.details}"
        state.last_error = message
        log.warning("instance %s: %s", slot.id, message)
        if exc.node_failure or exc.capacity_failure:
            state.failed_nodes[slot.node] = ctl.clock() + FAILED_NODE_BACKOFF_S
        else:
            # The checkpoint itself is the problem: every node would fail the same way.
            state.backoff_until = ctl.clock() + FAILED_NODE_BACKOFF_S
            if not any(s.state in ("ready", "starting", "loading") for s in state.slots.values()):
                ctl.router.fail_queued(state, Unavailable(f"could not start an instance of {state.name!r}: {message}"))
        ctl.capacity_changed()
        ctl.reconcile(state.name)

    def _forget(self, managed: Managed) -> None:
        ctl = self.ctl
        self.managed.pop(managed.slot.id, None)
        on_node = self._by_node.get(managed.slot.node)
        if on_node is not None:
            on_node.discard(managed.slot.id)
            if not on_node:
                del self._by_node[managed.slot.node]
        ctl.router.remove_slot(managed.slot)
        ctl.cluster.finish(managed.slot.node, managed.slot.id)

    # -- stop ---------------------------------------------------------------------------------

    async def stop(self, managed: Managed) -> None:
        """Unload an instance with no requests in flight (the router sends it none any more)."""
        if managed.unloading:
            return
        ctl = self.ctl
        slot = managed.slot
        managed.unloading = True
        ctl.router.retire(slot)
        managed.record.state = "stopping"
        log.info("stopping instance %s on %s", slot.id, slot.node)
        freed = 0
        try:
            await ctl.persist_instance(managed.record)
            node = ctl.cluster.nodes.get(slot.node)
            if node is not None and node.up:
                freed = await ctl.workers.unload(slot.node, slot.address, slot.id)
        except WorkerCallError as exc:
            if exc.code != "NOT_FOUND":
                log.warning("unloading %s: %s", slot.id, exc)
        finally:
            self._forget(managed)
            ctl.cluster.release_memory(slot.node, freed or managed.reserved_bytes)
            with contextlib.suppress(Exception):
                await ctl.store.delete_instance(slot.id)
        ctl.capacity_changed()
        ctl.reconcile(slot.deployment)

    def stop_soon(self, managed: Managed) -> None:
        asyncio.create_task(self.stop(managed), name=f"stop-{managed.slot.id}")

    def retire_all(self, deployment: str) -> None:
        """Instances of an old spec take no new requests; each is unloaded once idle."""
        for managed in list(self.managed.values()):
            if managed.slot.deployment == deployment and managed.slot.state != "stopping":
                self.ctl.router.retire(managed.slot)
                if managed.load_task is None and managed.slot.in_flight == 0:
                    self.stop_soon(managed)

    # -- restart and node health --------------------------------------------------------------

    def restore(self, record: InstanceRecord, address: str) -> Managed | None:
        """An instance the store remembers: not dispatchable until its node's heartbeat says ready."""
        if record.deployment not in self.ctl.router.deployments:
            return None
        slot = InstanceSlot(id=record.id, deployment=record.deployment, node=record.node, address=address,
                            state="loading", created_at=self.ctl.clock())
        managed = Managed(slot, record)
        self._add(managed)
        self.ctl.router.add_slot(slot)
        return managed

    async def reconcile_node(self, node_id: str, address: str, reported: list[pb.InstanceStatus],
                             reported_at_unix: float) -> None:
        """Make the controller's instances on a node match what the node reports."""
        ctl = self.ctl
        seen = set()
        for status in reported:
            seen.add(status.id)
            managed = self.managed.get(status.id)
            if managed is not None:
                # Only a restored instance ("loading" until its node reports it) is adopted; a retired
                # one ("stopping", e.g. migrating away or draining) must stay retired.
                if (managed.load_task is None and not managed.unloading and managed.slot.state == "loading"
                        and status.state == pb.INSTANCE_STATE_READY):
                    managed.slot.address = address
                    managed.record.state = "ready"
                    ctl.router.slot_ready(managed.slot)
                    await ctl.persist_instance(managed.record)
                    log.info("instance %s on %s adopted from its node's report", status.id, node_id)
                    ctl.reconcile(managed.slot.deployment)
                continue
            if status.state != pb.INSTANCE_STATE_READY:
                continue
            if status.deployment in ctl.router.deployments:
                record = InstanceRecord(id=status.id, deployment=status.deployment, node=node_id, state="ready",
                                        checkpoint=status.checkpoint, backend=status.backend or "transformers",
                                        created_at=time.time(), ready_at=status.ready_at_unix or None,
                                        source_tier=status.source_tier or None)
                adopted = self.restore(record, address)
                if adopted is not None:
                    ctl.router.slot_ready(adopted.slot)
                    await ctl.persist_instance(record)
                    log.info("instance %s on %s (unknown to the store) adopted", status.id, node_id)
                    ctl.reconcile(status.deployment)
            else:
                log.info("unloading orphan instance %s on %s (deployment %r does not exist)",
                         status.id, node_id, status.deployment)
                asyncio.create_task(self._unload_orphan(node_id, address, status.id))
        for managed in self.on_node(node_id):
            slot = managed.slot
            if slot.id in seen or managed.load_task is not None or managed.unloading:
                continue
            if managed.record.ready_at is not None and managed.record.ready_at > reported_at_unix:
                continue  # the report predates the instance
            log.warning("instance %s is gone from node %s", slot.id, node_id)
            await self.lost(managed)

    async def _unload_orphan(self, node_id: str, address: str, instance_id: str) -> None:
        try:
            await self.ctl.workers.unload(node_id, address, instance_id)
        except WorkerCallError as exc:
            log.warning("unloading orphan %s on %s: %s", instance_id, node_id, exc)

    async def lost(self, managed: Managed) -> None:
        """The instance no longer exists (node down or restarted): forget it, start others."""
        if managed.load_task is not None:
            managed.load_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await managed.load_task
        self._forget(managed)
        with contextlib.suppress(Exception):
            await self.ctl.store.delete_instance(managed.slot.id)
        self.ctl.reconcile(managed.slot.deployment)

    async def node_down(self, node_id: str) -> None:
        for managed in self.on_node(node_id):
            await self.lost(managed)
