"""The controller: wires the store, registry, cluster view, scheduler, autoscaler, router and
workers together, and runs the HTTP and gRPC servers on one event loop.

Everything that decides is pure (scheduler.py, autoscaler.py) and runs synchronously inside
`reconcile(deployment)`, which is called on events only: a request queued or finished, an
instance ready, failed or gone, a node up or down, a keep-alive timer. Nothing here polls on
the request path; the one periodic task is the node health sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from ember.api import worker_pb2 as pb
from ember.controller.autoscaler import Autoscaler, DeploymentLoad, InstanceLoad
from ember.controller.config import ControllerConfig
from ember.controller.errors import BadRequest, ControllerError, NotFound, Unavailable
from ember.controller.instances import Instances
from ember.controller.metrics import ControllerMetrics
from ember.controller.migrations import Migrations
from ember.controller.models import (
    CachedCheckpoint,
    Deployment,
    DeploymentSpec,
    DeploymentUpdate,
    DeviceInfo,
    Instance,
    InstanceRecord,
    InventoryRecord,
    Node,
    NodeRecord,
    TierInfo,
)
from ember.controller.nodes import ClusterView, NodeStatusView, TierView
from ember.controller.recent_events import RecentEvents
from ember.controller.auth import Authenticator
from ember.controller.checkpoint_policy import CheckpointPolicy
from ember.controller.limits import KeyLimiter
from ember.controller.registry import DeploymentRegistry, canonical_uri
from ember.controller.router import DeploymentState, Router
from ember.controller.scheduler import ModelInfo, Scheduler
from ember.controller.state import StateStore, StoreDown
from ember.controller.worker_client import WorkerClient

log = logging.getLogger("ember.controller")

NODE_PERSIST_EVERY_S = 30.0


class Controller:
    def __init__(self, config: ControllerConfig, store: StateStore, workers: WorkerClient | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.config = config
        self.store = store
        self.workers = workers or WorkerClient(config.resolved_worker_token())
        self._clock = clock
        self.metrics = ControllerMetrics()
        self.recent = RecentEvents()  # last cold starts and migrations, for the status page
        self.registry = DeploymentRegistry(store, CheckpointPolicy(config.checkpoint_roots, config.allowed_buckets))
        self.auth = Authenticator(store, config.admin_key() if config.auth else None, config.auth)
        self.limiter = KeyLimiter(config.limits)
        self.cluster = ClusterView(config.scheduler.ewma_alpha)
        self.scheduler = Scheduler(config.scheduler)
        self.autoscaler = Autoscaler()
        self.router = Router(self.clock, self.reconcile)
        self.instances = Instances(self)
        self.migrations = Migrations(self)
        self.node_records: dict[str, NodeRecord] = {}
        self._node_persisted: dict[str, tuple[str, float]] = {}
        self._starved: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self._health_task: asyncio.Task | None = None
        self.started_at = 0.0
        self.ready = False
        # Model initialisation time across all loads: the estimate for a model never loaded yet.
        self.init_ewma_s: float | None = None

    def clock(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Rebuild the view from the store, apply the deployments file, start the health sweep."""
        self.started_at = self.clock()
        for record in await self.store.list_deployments():
            self.router.add(record)
        inventories = {i.node: i for i in await self.store.list_inventory()}
        for node in await self.store.list_nodes():
            self.node_records[node.id] = node
            if node.state == "up":
                # Trusted until it misses heartbeats for node_timeout_s (the restart grace period).
                self.cluster.observe(self._view_from_records(node, inventories.get(node.id)), self.clock())
        for record in await self.store.list_instances():
            node = self.node_records.get(record.node)
            if node is None or node.state != "up" or self.instances.restore(record, node.address) is None:
                await self.store.delete_instance(record.id)
        if self.config.deployments_file is not None:
            await self.apply_deployments_file(Path(self.config.deployments_file))
        self._health_task = asyncio.create_task(self._health_loop(), name="node-health")
        self.ready = True
        for name in list(self.router.deployments):
            self.reconcile(name)
        log.info("controller started: %d deployment(s), %d node(s), %d instance(s) restored from %s",
                 len(self.router.deployments), len(self.node_records), len(self.instances.managed), self.store.url)

    async def stop(self) -> None:
        self.ready = False
        if self._health_task is not None:
            self._health_task.cancel()
        for state in self.router.deployments.values():
            if state.timer is not None:
                state.timer.cancel()
            self.router.fail_queued(state, Unavailable("the controller is shutting down"))
        for managed in list(self.instances.managed.values()):
            if managed.load_task is not None:
                managed.load_task.cancel()
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        for task in [*tasks, *(m.load_task for m in self.instances.managed.values() if m.load_task)]:
            with contextlib.suppress(BaseException):
                await task
        await self.workers.close()

    def spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    async def apply_deployments_file(self, path: Path) -> None:
        """Create (or bring up to date) every deployment the file lists: safe to apply at every start."""
        from ember.controller.deployments_file import read_deployments_file

        for spec in read_deployments_file(path):
            try:
                existing = await self.store.get_deployment(spec.name)
                if existing is None:
                    await self.create_deployment(spec)
                    log.info("deployments file: created %s", spec.name)
                    continue
                wanted = spec.model_dump(exclude={"name", "checkpoint"})
                have = existing.model_dump(include=set(wanted))
                checkpoint, _ = canonical_uri(spec.checkpoint)
                if have != wanted or checkpoint != existing.checkpoint:
                    await self.update_deployment(spec.name, DeploymentUpdate(**wanted, checkpoint=spec.checkpoint))
                    log.info("deployments file: updated %s", spec.name)
            except ControllerError as exc:
                # One bad entry (e.g. S3 unreachable right now) must not keep the others down.
                log.error("deployments file %s: %s: %s", path, spec.name, exc.message)

    # -- persistence helpers --------------------------------------------------------------------

    async def persist_instance(self, record: InstanceRecord) -> None:
        try:
            await self.store.put_instance(record)
        except StoreDown as exc:  # memory stays right; a restart rebuilds instances from heartbeats
            log.warning("instance %s (%s) not persisted: %s", record.id, record.state, exc.message)

    # -- deployments ----------------------------------------------------------------------------

    async def create_deployment(self, spec: DeploymentSpec) -> Deployment:
        record = await self.registry.create(spec)
        self.router.add(record)
        log.info("deployed %s (%s, %.1f MB)", record.name, record.checkpoint, record.checkpoint_bytes / 1e6)
        self.reconcile(record.name)
        return self.deployment_view(record.name)

    async def update_deployment(self, name: str, update: DeploymentUpdate) -> Deployment:
        old, new = await self.registry.update(name, update)
        self.router.add(new)
        if (old.checkpoint, old.backend) != (new.checkpoint, new.backend):
            self.instances.retire_all(name)
        self.reconcile(name)
        return self.deployment_view(name)

    async def delete_deployment(self, name: str) -> Deployment:
        view = self.deployment_view(name) if name in self.router.deployments else None
        record = await self.registry.delete(name)
        state = self.router.remove(name)
        self.metrics.forget_deployment(name)
        if state is not None:
            for slot in list(state.slots.values()):
                managed = self.instances.managed.get(slot.id)
                if managed is None:
                    continue
                if managed.load_task is not None:
                    managed.load_task.cancel()
                    self.spawn(self._unload_after_cancel(managed), f"unload-{slot.id}")
                else:
                    self.spawn(self.instances.stop(managed), f"stop-{slot.id}")
        return view or Deployment(**record.model_dump())

    async def _unload_after_cancel(self, managed) -> None:
        """A load cancelled mid-way leaves nothing on the worker; unload in case it had finished."""
        with contextlib.suppress(BaseException):
            await managed.load_task
        with contextlib.suppress(Exception):
            await self.workers.unload(managed.slot.node, managed.slot.address, managed.slot.id)

    def deployment_view(self, name: str) -> Deployment:
        state = self.router.get(name)
        return Deployment(
            **state.record.model_dump(), instances=state.counts(),
            queued=sum(1 for t in state.queue if not t.future.done()), in_flight=state.in_flight,
            last_error=state.last_error,
        )

    def list_deployments(self) -> list[Deployment]:
        return [self.deployment_view(name) for name in sorted(self.router.deployments)]

    # -- instances and nodes (views) --------------------------------------------------------------

    def list_instances(self, deployment: str | None = None) -> list[Instance]:
        out = []
        for managed in self.instances.managed.values():
            slot = managed.slot
            if deployment is not None and slot.deployment != deployment:
                continue
            record = managed.record.model_copy(update={"state": slot.state})
            out.append(Instance(**record.model_dump(), address=slot.address, in_flight=slot.in_flight))
        return sorted(out, key=lambda i: (i.deployment, i.created_at, i.id))

    def get_instance(self, instance_id: str) -> Instance:
        for instance in self.list_instances():
            if instance.id == instance_id:
                return instance
        raise NotFound(f"no instance {instance_id!r}", param="id", code="instance_not_found")

    def list_nodes(self) -> list[Node]:
        out = []
        for node_id, record in sorted(self.node_records.items()):
            view = self.cluster.nodes.get(node_id)
            tiers = {}
            if view is not None:
                tiers = {
                    name: TierInfo(capacity_bytes=t.capacity_bytes, used_bytes=t.used_bytes, read_gbps=t.gbps,
                                   checkpoints=[CachedCheckpoint(uri=u, bytes=b) for u, b in t.checkpoints.items()])
                    for name, t in view.tiers.items()
                }
            instances = [m.slot.id for m in self.instances.on_node(node_id)]
            state = view.state if view is not None else record.state
            if view is not None and view.up and view.cordoned:
                state = self.migrations.node_state(node_id, bool(instances)) or "draining"
            out.append(Node(**record.model_copy(update={"state": state}).model_dump(), tiers=tiers,
                            instances=instances))
        return out

    def get_node(self, node_id: str) -> Node:
        for node in self.list_nodes():
            if node.id == node_id:
                return node
        raise NotFound(f"no node {node_id!r}", param="id", code="node_not_found")

    # -- nodes: registration, heartbeats, health ------------------------------------------------

    async def node_report(self, status: pb.NodeStatus, register: bool) -> bool:
        """Apply a RegisterNode or Heartbeat; False when a heartbeat names a node we do not know."""
        node_id = status.node_id.strip()
        if not node_id or not status.address:
            raise BadRequest("a node status needs node_id and address")
        known = node_id in self.node_records
        if not register and not known:
            return False
        self.metrics.heartbeats.inc()
        now, wall = self.clock(), time.time()
        was_up = known and self.cluster.nodes.get(node_id) is not None and self.cluster.nodes[node_id].up
        old = self.cluster.nodes.get(node_id)
        old_room = old.available_bytes if old is not None else None
        view = self.cluster.observe(view_from_status(status), now)
        self.migrations.observe(status)
        record = self.node_records.get(node_id) or NodeRecord(id=node_id, address=status.address, registered_at=wall)
        record = record.model_copy(update={
            "address": status.address, "state": "up", "last_heartbeat": wall, "version": status.version,
            "devices": [DeviceInfo(name=d.name, total_memory_bytes=d.total_memory_bytes,
                                   free_memory_bytes=d.free_memory_bytes, description=d.description)
                        for d in status.devices],
            "s3_read_gbps": status.s3_read_gbps, "queued_requests": status.queued_requests,
            "active_requests": status.active_requests,
        })
        if register and not known:
            record.registered_at = wall
        self.node_records[node_id] = record
        if register or not was_up:
            log.info("node %s %s at %s", node_id, "registered" if register else "is back", status.address)
        await self._persist_node(record, view, force=register or not was_up)
        await self.instances.reconcile_node(node_id, status.address, list(status.instances), status.timestamp_unix)
        if not was_up or old_room != view.available_bytes:
            self.capacity_changed()
        self._update_node_metrics()
        return True

    async def _persist_node(self, record: NodeRecord, view, force: bool) -> None:
        inventory = InventoryRecord(
            node=record.id, updated_at=record.last_heartbeat,
            tiers={name: TierInfo(capacity_bytes=t.capacity_bytes, used_bytes=t.used_bytes, read_gbps=t.gbps,
                                  checkpoints=[CachedCheckpoint(uri=u, bytes=b) for u, b in t.checkpoints.items()])
                   for name, t in view.tiers.items()},
        )
        fingerprint = record.model_dump_json(exclude={"last_heartbeat"}) + inventory.model_dump_json(
            exclude={"updated_at"})
        last = self._node_persisted.get(record.id)
        now = self.clock()
        if force or last is None or last[0] != fingerprint or now - last[1] > NODE_PERSIST_EVERY_S:
            try:
                await self.store.put_node(record)
                await self.store.put_inventory(inventory)
            except StoreDown as exc:  # the heartbeat still counts: a store outage must not take nodes down
                log.warning("node %s not persisted (retried on its next heartbeat): %s", record.id, exc.message)
                return
            self._node_persisted[record.id] = (fingerprint, now)

    async def _health_loop(self) -> None:
        """The one periodic task: mark nodes down whose heartbeats stopped."""
        interval = min(self.config.heartbeat_interval_s, self.config.node_timeout_s / 2)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check_nodes()
            except Exception:
                log.exception("node health check failed")

    async def check_nodes(self) -> list[str]:
        down = self.cluster.stale(self.clock(), self.config.node_timeout_s)
        for node_id in down:
            await self.mark_node_down(node_id, f"no heartbeat for {self.config.node_timeout_s:g} s")
        return down

    async def mark_node_down(self, node_id: str, reason: str) -> None:
        if self.cluster.mark_down(node_id) is None:
            return
        log.warning("node %s is down: %s; rescheduling its instances", node_id, reason)
        record = self.node_records.get(node_id)
        if record is not None:
            record = self.node_records[node_id] = record.model_copy(update={"state": "down"})
            await self.store.put_node(record)
        await self.instances.node_down(node_id)
        self._update_node_metrics()

    def cordon(self, node_id: str) -> None:
        """The node is being drained (Kubernetes cordon, e.g. scale-in): no new instances there;
        its instances move elsewhere with their running requests (live migration, see
        migrations.py), or, where nothing can take them, take no new requests and are unloaded
        when their last request is done."""
        if node_id in self.cluster.cordoned:
            return
        if node_id in self.node_records:
            self.migrations.drain(node_id, reason="cordon")
        else:
            self.cluster.set_cordoned(node_id, True)  # drained already: it has not even registered

    def uncordon(self, node_id: str) -> None:
        if node_id not in self.cluster.cordoned:
            return
        self.cluster.set_cordoned(node_id, False)
        log.info("node %s is schedulable again", node_id)
        self.capacity_changed()

    def _update_node_metrics(self) -> None:
        up = sum(1 for n in self.cluster.nodes.values() if n.up)
        self.metrics.nodes.labels("up").set(up)
        self.metrics.nodes.labels("down").set(len(self.node_records) - up)

    def _view_from_records(self, node: NodeRecord, inventory: InventoryRecord | None) -> NodeStatusView:
        tiers = {}
        if inventory is not None:
            tiers = {name: TierView(t.read_gbps, {c.uri: c.bytes for c in t.checkpoints}, t.capacity_bytes,
                                    t.used_bytes) for name, t in inventory.tiers.items()}
        return NodeStatusView(
            id=node.id, address=node.address, tiers=tiers, s3_gbps=node.s3_read_gbps,
            free_bytes=max((d.free_memory_bytes for d in node.devices), default=0),
            total_bytes=max((d.total_memory_bytes for d in node.devices), default=0),
        )

    # -- scaling ----------------------------------------------------------------------------------

    def capacity_changed(self) -> None:
        """Room appeared somewhere: deployments waiting for capacity try again."""
        for name in list(self._starved):
            self._starved.discard(name)
            self.reconcile(name)

    def model_info(self, state: DeploymentState) -> ModelInfo:
        uri = state.record.checkpoint
        init_s = state.init_ewma_s if state.init_ewma_s is not None else self.init_ewma_s
        return ModelInfo(uri=uri, size_bytes=state.record.checkpoint_bytes, init_s=init_s, local="://" not in uri,
                         memory_bytes=state.memory_bytes)

    def reconcile(self, name: str) -> None:
        """Run the autoscaler for one deployment and act on its decision (synchronously)."""
        state = self.router.deployments.get(name)
        if state is None or not self.ready:
            return
        now = self.clock()
        queued = [t for t in state.queue if not t.future.done()]
        load = DeploymentLoad(
            name=name, min_instances=state.record.min_instances, max_instances=state.record.max_instances,
            target_concurrency=state.record.target_concurrency, keep_alive_s=state.record.keep_alive_s,
            queued=len(queued),
            instances=[InstanceLoad(s.id, s.state, s.in_flight, s.idle_since) for s in state.slots.values()],
        )
        decision = self.autoscaler.decide(load, now)
        for instance_id in decision.stop:
            managed = self.instances.managed.get(instance_id)
            if managed is not None:
                self.router.retire(managed.slot)
                self.spawn(self.instances.stop(managed), f"stop-{instance_id}")
        for slot in list(state.slots.values()):  # retired instances go once their last request is done
            managed = self.instances.managed.get(slot.id)
            if (slot.state == "stopping" and slot.in_flight == 0 and managed is not None
                    and managed.load_task is None and not managed.unloading):
                self.spawn(self.instances.stop(managed), f"stop-{slot.id}")
        next_check = decision.next_check_at
        if decision.start and not queued and now < state.backoff_until:
            next_check = state.backoff_until if next_check is None else min(next_check, state.backoff_until)
        elif decision.start:
            queue_wait = now - queued[0].enqueued_at if queued else 0.0
            started = self._start(state, decision.start, queue_wait)
            if started < decision.start:
                retry_at = self._starving(state, queued)
                if retry_at is not None:
                    next_check = retry_at if next_check is None else min(next_check, retry_at)
        else:
            self._starved.discard(name)
        self._arm(state, next_check)
        self._update_deployment_metrics(state)

    def _start(self, state: DeploymentState, count: int, queue_wait_s: float) -> int:
        now = self.clock()
        model = self.model_info(state)
        state.failed_nodes = {n: t for n, t in state.failed_nodes.items() if t > now}
        exclude = set(state.failed_nodes)
        started = 0
        for _ in range(count):
            t0 = time.perf_counter()
            placement = self.scheduler.place(self.cluster, model, now, exclude)
            decision_s = time.perf_counter() - t0
            self.metrics.scheduling_seconds.observe(decision_s)
            if self.migrations.make_room(state, model, placement, exclude):
                started += 1  # a full node with the model local is freed by migration, then used
                continue
            if placement is None:
                break
            self.instances.start(state, placement, model, queue_wait_s, decision_s)
            started += 1
        return started

    def _starving(self, state: DeploymentState, queued: list) -> float | None:
        """No node could take a needed instance: wait for room, or fail the queue when none can come.

        Returns when to try again (a failed node's back-off ending), if that is the only hope."""
        self._starved.add(state.name)
        alive = any(s.state in ("starting", "loading", "ready") for s in state.slots.values())
        up = [self.cluster.nodes[n] for n in self.cluster.up_nodes()]
        need = self.scheduler.memory_needed(self.model_info(state))
        error: str | None = None
        if not up:
            in_grace = self.node_records and self.clock() - self.started_at < self.config.node_timeout_s
            if not in_grace:
                error = (f"no worker node is up to run {state.name!r}; start one with "
                         "`ember worker --controller HOST:PORT --cache-dir DIR` (or run `ember serve`)")
        elif max(n.total_bytes for n in up) < need:
            error = (f"{state.name!r} needs {need / 1e9:.2f} GB of memory per instance but the largest node has "
                     f"{max(n.total_bytes for n in up) / 1e9:.2f} GB")
        elif state.failed_nodes and all(n.id in state.failed_nodes for n in up) and not alive:
            error = f"every node failed to start {state.name!r}; last error: {state.last_error}"
            retry = min(state.failed_nodes.values())
            if queued:
                self.router.fail_queued(state, Unavailable(error))
            return retry if state.record.min_instances > 0 else None
        if error is not None and not alive and queued:
            state.last_error = error
            self.router.fail_queued(state, Unavailable(error))
        return None

    def _arm(self, state: DeploymentState, when: float | None) -> None:
        """One timer per deployment, for the next keep-alive expiry (or retry): no polling."""
        if state.timer is not None:
            state.timer.cancel()
            state.timer = None
        if when is not None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, when - self.clock())
            state.timer = loop.call_later(delay + 0.001, self.reconcile, state.name)

    def refresh_metrics(self) -> None:
        """Gauges as of now (called before /metrics renders them)."""
        for state in self.router.deployments.values():
            self._update_deployment_metrics(state)
        self._update_node_metrics()

    def _update_deployment_metrics(self, state: DeploymentState) -> None:
        m = self.metrics
        m.queue_length.labels(state.name).set(sum(1 for t in state.queue if not t.future.done()))
        m.in_flight.labels(state.name).set(state.in_flight)
        counts = state.counts()
        for s in ("starting", "loading", "ready", "stopping"):
            m.instances.labels(state.name, s).set(counts.get(s, 0))


def view_from_status(status: pb.NodeStatus) -> NodeStatusView:
    """The scheduler's view of one wire NodeStatus."""
    tiers = {
        name: TierView(tier.read_gbps, {c.uri: c.bytes for c in tier.checkpoints}, tier.capacity_bytes,
                       tier.used_bytes)
        for name, tier in status.tiers.items()
    }
    return NodeStatusView(
        id=status.node_id, address=status.address,
        free_bytes=max((d.free_memory_bytes for d in status.devices), default=0),
        total_bytes=max((d.total_memory_bytes for d in status.devices), default=0),
        tiers=tiers, s3_gbps=status.s3_read_gbps,
        instance_ids=frozenset(i.id for i in status.instances),
        active_requests=status.active_requests, queued_requests=status.queued_requests,
    )
