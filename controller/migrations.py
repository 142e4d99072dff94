"""Live migration, the controller's side: move an instance, drain a node, make room for a model.

Three triggers share one procedure (DESIGN.md, "Live migration"):
- an operator: `POST /v1/instances/{id}/migrate` (`ember migrate INSTANCE --to NODE`);
- a drain: `POST /v1/nodes/{id}/drain` (`ember drain NODE`) and a Kubernetes cordon (scale-in):
  every instance on the node moves, or its requests finish there, then the node is "drained";
- the scheduler: when a full node holds a model in a faster tier and freeing it wins by the
  migration planner's estimate (controller/migration_planner.py, fed with the cost constants the
  workers measure and report in their heartbeats).

Moving one instance: start its replacement on the destination through the normal Load path
(with a hold lease so the autoscaler does not scale the idle newcomer in), retire the source (no
new requests), then MigrateOut on the source worker moves every running request (KV blocks or
tokens, per the cost model). Each client's stream follows its hand-over inside inference.py
(the lease moves with it); once the last request left, the retired source is unloaded by the
ordinary reconcile. A request the destination refuses stays and finishes at the source; a
source that dies mid-copy is restarted by inference.py from the tokens its client has.

Metrics: migrations per request by reason, mode and outcome; bytes moved; the stream pause as
the client sees it (last token from the source to the first from the destination).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ConfigDict, Field

from ember.api import worker_pb2 as pb
from ember.controller.errors import BadRequest, Conflict, NotFound
from ember.controller.migration_planner import (
    MigrationConfig,
    MigrationPlan,
    MigrationPlanner,
    RequestProgress,
    RunningInstance,
)
from ember.controller.router import InstanceSlot
from ember.controller.scheduler import ModelInfo, Placement
from ember.migration.cost_model import MigrationCostModel

if TYPE_CHECKING:
    from ember.controller.app import Controller
    from ember.controller.inference import Generation
    from ember.controller.instances import Managed
    from ember.controller.router import DeploymentState, Lease
    from ember.controller.worker_client import GenerateInput

log = logging.getLogger("ember.controller.migrations")

MODES = {"auto": pb.MIGRATION_MODE_AUTO, "kv": pb.MIGRATION_MODE_KV, "tokens": pb.MIGRATION_MODE_TOKENS}
MODE_NAMES = {pb.MIGRATION_MODE_KV: "kv", pb.MIGRATION_MODE_TOKENS: "tokens", pb.MIGRATION_MODE_AUTO: "auto"}
PHASES = {pb.MIGRATION_PHASE_HANDED_OVER: "handed_over", pb.MIGRATION_PHASE_STAYED: "stayed",
          pb.MIGRATION_PHASE_FINISHED: "finished"}
PAUSE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
#: How long a scheduler-triggered plan waits for its moved instances to be gone before giving up.
MAKE_ROOM_TIMEOUT_S = 300.0
KEEP_RECORDS = 200

MigrationState = Literal["starting", "moving", "done", "failed"]


class MigrateBody(BaseModel):
    """POST /v1/instances/{id}/migrate: all optional; the scheduler picks the node when none is given."""

    model_config = ConfigDict(extra="forbid")

    node: str | None = Field(None, min_length=1)
    mode: Literal["auto", "kv", "tokens"] = "auto"


class MigrationRecord(BaseModel):
    """One instance's migration (the API view)."""

    id: str
    instance: str
    deployment: str
    reason: str  # "operator" | "drain" | "scheduler"
    source_node: str
    destination_node: str
    destination_instance: str
    mode: str = "auto"
    state: MigrationState = "starting"
    started_at: float = 0.0
    finished_at: float | None = None
    requests: dict[str, int] = Field(default_factory=dict)  # handed_over | stayed | finished -> count
    modes: dict[str, int] = Field(default_factory=dict)  # kv | tokens -> requests handed over that way
    bytes: int = 0
    max_stop_s: float = 0.0
    message: str = ""


class DrainRecord(BaseModel):
    node: str
    state: Literal["draining", "drained"] = "draining"
    reason: str = "operator"
    started_at: float = 0.0
    finished_at: float | None = None
    migrations: list[str] = Field(default_factory=list)
    stopped: list[str] = Field(default_factory=list)  # instances with nothing to move, unloaded
    finishing: list[str] = Field(default_factory=list)  # could not move: their requests finish there


@dataclasses.dataclass
class CostInputs:
    """What a node's heartbeat says about migrating off it (worker.proto fields 20-22)."""

    net_gbps: float = 0.0
    overhead_s: float = 0.0
    per_instance: dict[str, tuple[int, float, float]] = dataclasses.field(default_factory=dict)  # kv B/token, a, b


class Migrations:
    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl
        self.records: dict[str, MigrationRecord] = {}
        self.drains: dict[str, DrainRecord] = {}
        self.moving: dict[str, str] = {}  # source instance id -> migration id
        self.streams: dict[str, set[Generation]] = {}  # instance id -> generations streaming from it
        self.costs: dict[str, CostInputs] = {}  # node id -> cost inputs
        self.planner = MigrationPlanner(ctl.scheduler, MigrationConfig(min_gain_s=ctl.config.migration_min_gain_s))
        self.planned: dict[str, str] = {}  # deployment -> placeholder slot id of a start waiting for room
        self._done: dict[str, asyncio.Event] = {}
        r, p = ctl.metrics.registry, "ember_controller_"
        self.m_requests = Counter(p + "migrated_requests_total", "Requests in instance migrations by outcome",
                                  ["reason", "mode", "outcome"], registry=r)
        self.m_bytes = Counter(p + "migration_bytes_total", "Bytes of request state moved between workers",
                               ["mode"], registry=r)
        self.m_instances = Counter(p + "instance_migrations_total", "Instance migrations by reason and result",
                                   ["reason", "state"], registry=r)
        self.m_pause = Histogram(p + "migration_stream_pause_seconds",
                                 "Client-seen pause of a moved stream: last token from the source to the first "
                                 "from the destination (mode restart: continued from tokens after a failure)",
                                 ["mode"], buckets=PAUSE_BUCKETS, registry=r)

    # -- the request side (called by inference.Generation) --------------------------------------

    def track(self, gen: Generation, instance_id: str) -> None:
        self.streams.setdefault(instance_id, set()).add(gen)

    def untrack(self, gen: Generation, instance_id: str) -> None:
        streams = self.streams.get(instance_id)
        if streams is not None:
            streams.discard(gen)
            if not streams:
                del self.streams[instance_id]

    def delivered(self, gen: Generation, chunk: pb.GenerateChunk, now: float) -> None:
        """A chunk reached the client: remember it (a restart continues after it), time a switch."""
        gen.prompt_tokens = max(gen.prompt_tokens, chunk.prompt_tokens)
        if chunk.token_ids:
            gen.delivered_ids.extend(chunk.token_ids)
            if gen.switch is not None:
                last, mode = gen.switch
                self.m_pause.labels(mode).observe(max(0.0, now - last))
                gen.switch = None
            gen.last_token_at = now
        gen.delivered_text += chunk.text

    def follow(self, gen: Generation, lease: Lease, handover: pb.Handover) -> None:
        """The source handed the request over: the next call attaches at the destination."""
        managed = self.ctl.instances.managed.get(handover.instance_id)
        if managed is not None:
            self.ctl.router.move(lease, managed.slot)
            gen.target = (managed.slot.node, managed.slot.address, managed.slot.id)
        else:  # moved by someone else (a worker-level MigrateOut): follow the address given
            gen.target = (handover.node_id or "unknown", handover.address, handover.instance_id)
        gen.next_input = dataclasses.replace(gen.inp, resume_id=handover.resume_id)
        gen.switch = (gen.last_token_at or self.ctl.clock(), MODE_NAMES.get(handover.mode, "auto"))

    def continuation(self, gen: Generation, mode: str) -> GenerateInput | None:
        """The input that restarts the request after what its client has (None: nothing sent yet)."""
        if not gen.delivered_ids and not gen.delivered_text:
            return None
        gen.switch = (gen.last_token_at or self.ctl.clock(), mode)
        return dataclasses.replace(gen.inp, resume_id="", continue_token_ids=list(gen.delivered_ids),
                                   continue_text=gen.delivered_text)

    # -- cost inputs from heartbeats ------------------------------------------------------------

    def observe(self, status: pb.NodeStatus) -> None:
        self.costs[status.node_id] = CostInputs(
            status.migration_net_gbps, status.migration_overhead_s,
            {i.id: (i.kv_bytes_per_token, i.recompute_s_per_token, i.recompute_overhead_s) for i in status.instances},
        )

    def cost_model(self, node_id: str, instance_id: str) -> MigrationCostModel | None:
        inputs = self.costs.get(node_id)
        if inputs is None:
            return None
        _, a, b = inputs.per_instance.get(instance_id, (0, 0.0, 0.0))
        methods = tuple(m for m, known in (("recompute", a > 0), ("kv", inputs.net_gbps > 0)) if known)
        if not methods:
            return None
        return MigrationCostModel(a, b, inputs.net_gbps if inputs.net_gbps > 0 else 1.0, inputs.overhead_s, methods)

    # -- moving one instance --------------------------------------------------------------------

    def migrate(self, instance_id: str, node: str | None = None, mode: str = "auto",
                reason: str = "operator", exclude: Iterable[str] = ()) -> MigrationRecord:
        """Start moving an instance (its replacement first); returns at once with the record."""
        ctl = self.ctl
        managed = ctl.instances.managed.get(instance_id)
        if managed is None:
            raise NotFound(f"no instance {instance_id!r}", param="id", code="instance_not_found")
        slot = managed.slot
        if instance_id in self.moving:
            raise Conflict(f"instance {instance_id!r} is already migrating (migration {self.moving[instance_id]})",
                           code="migration_in_progress")
        if slot.state != "ready" or managed.load_task is not None or managed.unloading:
            raise Conflict(f"instance {instance_id!r} is {slot.state}; only a ready instance can migrate",
                           code="instance_not_ready")
        if mode not in MODES:
            raise BadRequest(f"mode must be one of {', '.join(MODES)}, got {mode!r}", param="mode")
        state = ctl.router.get(slot.deployment)
        model = ctl.model_info(state)
        placement = self._placement(model, slot.node, node, exclude)
        record = MigrationRecord(
            id=f"mig-{uuid.uuid4().hex[:10]}", instance=instance_id, deployment=slot.deployment, reason=reason,
            source_node=slot.node, destination_node=placement.node_id, destination_instance="", mode=mode,
            started_at=time.time(),
        )
        destination = ctl.instances.start(state, placement, model, 0.0, 0.0)
        hold = ctl.router.hold(destination.slot)
        record.destination_instance = destination.slot.id
        self._remember(record)
        self.moving[instance_id] = record.id
        log.info("migration %s (%s): %s on %s -> new instance %s on %s", record.id, reason, instance_id, slot.node,
                 destination.slot.id, placement.node_id)
        self._publish(record)
        ctl.spawn(self._run(record, managed, destination, hold), f"migrate-{instance_id}")
        return record

    def _publish(self, record: MigrationRecord) -> None:
        """The status page's ring of recent migrations (controller/recent_events.py)."""
        from ember.controller.recent_events import Migration

        kinds = [name for key, name in (("kv", "kv"), ("tokens", "recompute")) if record.modes.get(key)]
        self.ctl.recent.migration(Migration(
            id=record.id, instance=record.instance, deployment=record.deployment, source=record.source_node,
            target=record.destination_node, mode="+".join(kinds) or record.mode, reason=record.reason,
            state={"done": "done", "failed": "failed"}.get(record.state, "running"),
            requests=record.requests.get("handed_over", 0), started_at=record.started_at,
            finished_at=record.finished_at, error=record.message if record.state == "failed" else None,
        ))

    def _placement(self, model: ModelInfo, source_node: str, node: str | None, exclude: Iterable[str]) -> Placement:
        ctl = self.ctl
        scheduler, cluster, now = ctl.scheduler, ctl.cluster, ctl.clock()
        if node is None:
            placement = scheduler.place(cluster, model, now, {source_node, *exclude})
            if placement is None:
                raise Conflict("no other node has room for this instance's model; add a node or free one",
                               code="no_destination")
            return placement
        view = cluster.nodes.get(node)
        if view is None:
            raise NotFound(f"no node {node!r} (nodes: {', '.join(sorted(cluster.nodes)) or 'none'})", param="node",
                           code="node_not_found")
        if node == source_node:
            raise BadRequest(f"the instance already runs on node {node!r}; name another node", param="node")
        if not view.up or view.cordoned:
            raise Conflict(f"node {node!r} is {'draining' if view.cordoned else 'down'}: it takes no new instances",
                           code="node_unavailable")
        if not scheduler.fits(view, model):
            raise Conflict(
                f"node {node!r} has {view.available_bytes / 1e9:.2f} GB free; the instance needs "
                f"{scheduler.memory_needed(model) / 1e9:.2f} GB", code="no_room")
        estimate = scheduler.time_to_ready(cluster, view, model, now)
        return Placement(view.id, view.address, estimate, "migration", 1, scheduler.memory_needed(model))

    async def _run(self, record: MigrationRecord, source: Managed, destination: Managed, hold: Lease) -> None:
        ctl = self.ctl
        try:
            if destination.load_task is not None:
                try:
                    await asyncio.shield(destination.load_task)
                except asyncio.CancelledError:
                    if asyncio.current_task().cancelling():
                        raise  # the controller is stopping, not just the load
            if ctl.instances.managed.get(destination.slot.id) is not destination or destination.slot.state != "ready":
                state = ctl.router.deployments.get(record.deployment)
                raise _Failed(f"the destination instance did not start: {state.last_error if state else 'deleted'}")
            if ctl.instances.managed.get(source.slot.id) is not source or source.unloading:
                raise _Failed("the source instance went away before its requests could move")
            record.state = "moving"
            self._publish(record)
            ctl.router.retire(source.slot)  # new requests go elsewhere from now on
            await self._move_requests(record, source, destination)
            record.state = "done"
        except _Failed as exc:
            record.state, record.message = "failed", str(exc)
        except Exception as exc:  # a failed MigrateOut must never lose requests: they finish at the source
            log.warning("migration %s: %s", record.id, exc)
            record.state, record.message = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            record.finished_at = time.time()
            self._publish(record)
            self.moving.pop(source.slot.id, None)
            node = ctl.cluster.nodes.get(source.slot.node)
            if record.state == "failed" and node is not None and node.cordoned:
                ctl.router.retire(source.slot)  # draining: no new requests; the running ones finish there
            ctl.router.release(hold)
            self.m_instances.labels(record.reason, record.state).inc()
            event = self._done.pop(record.id, None)
            if event is not None:
                event.set()
            log.info("migration %s %s: %s%s", record.id, record.state, record.requests,
                     f" ({record.message})" if record.message else "")
            ctl.reconcile(record.deployment)

    async def _move_requests(self, record: MigrationRecord, source: Managed, destination: Managed) -> None:
        ctl = self.ctl
        slot = source.slot
        request = pb.MigrateOutRequest(
            instance_id=slot.id, destination_address=destination.slot.address,
            destination_instance_id=destination.slot.id, destination_node_id=destination.slot.node,
            mode=MODES[record.mode], migration_id=record.id,
        )
        async for event in ctl.workers.migrate_out(slot.node, slot.address, request, ctl.config.load_timeout_s):
            outcome = PHASES.get(event.phase)
            if outcome is None:
                continue  # progress
            mode = MODE_NAMES.get(event.mode, "auto")
            record.requests[outcome] = record.requests.get(outcome, 0) + 1
            record.bytes += event.bytes
            self.m_requests.labels(record.reason, mode, outcome).inc()
            self.m_bytes.labels(mode).inc(event.bytes)
            if outcome == "handed_over":
                record.modes[mode] = record.modes.get(mode, 0) + 1
                record.max_stop_s = max(record.max_stop_s, event.stop_s)
            elif outcome == "stayed":
                record.message = f"request {event.request_id} stays on the source: {event.message}"

    async def wait(self, migration_id: str, timeout_s: float | None = None) -> MigrationRecord:
        record = self.records[migration_id]
        if record.finished_at is None:
            event = self._done.setdefault(migration_id, asyncio.Event())
            await asyncio.wait_for(event.wait(), timeout_s)
        return record

    def get(self, migration_id: str) -> MigrationRecord:
        record = self.records.get(migration_id)
        if record is None:
            raise NotFound(f"no migration {migration_id!r}", param="id", code="migration_not_found")
        return record

    def _remember(self, record: MigrationRecord) -> None:
        self.records[record.id] = record
        while len(self.records) > KEEP_RECORDS:
            oldest = next(iter(self.records))
            if self.records[oldest].finished_at is None:
                break
            del self.records[oldest]

    # -- draining a node ------------------------------------------------------------------------

    def drain(self, node_id: str, reason: str = "operator") -> DrainRecord:
        """Cordon the node and move everything off it; returns at once (the drain runs in the background)."""
        ctl = self.ctl
        if node_id not in ctl.node_records:
            raise NotFound(f"no node {node_id!r} (nodes: {', '.join(sorted(ctl.node_records)) or 'none'})",
                           param="id", code="node_not_found")
        record = self.drains.get(node_id)
        if record is not None and record.finished_at is None:
            return record  # already draining
        record = self.drains[node_id] = DrainRecord(node=node_id, reason=reason, started_at=time.time())
        ctl.cluster.set_cordoned(node_id, True)
        log.warning("draining node %s (%s)", node_id, reason)
        ctl.spawn(self._drain(record), f"drain-{node_id}")
        return record

    async def _drain(self, record: DrainRecord) -> None:
        ctl = self.ctl
        node_id = record.node
        affected = set()
        for managed in ctl.instances.on_node(node_id):
            slot = managed.slot
            affected.add(slot.deployment)
            if slot.id in self.moving or managed.unloading:
                continue
            if slot.state == "ready" and managed.load_task is None and slot.in_flight > 0:
                try:
                    moved = self.migrate(slot.id, reason="drain")
                    record.migrations.append(moved.id)
                    continue
                except Exception as exc:  # no destination: its requests finish where they are
                    log.warning("drain %s: instance %s cannot move (%s); its requests finish there",
                                node_id, slot.id, exc)
                    record.finishing.append(slot.id)
            else:
                record.stopped.append(slot.id)
            ctl.router.retire(slot)  # idle or loading: stopped once idle / loaded (reconcile)
        for name in affected:
            ctl.reconcile(name)
        while ctl.instances.on_node(node_id) and ctl.cluster.nodes.get(node_id) is not None \
                and ctl.cluster.nodes[node_id].cordoned:
            await asyncio.sleep(0.2)
        if node_id in ctl.cluster.cordoned:
            record.state = "drained"
            record.finished_at = time.time()
            log.warning("node %s is drained", node_id)

    def undrain(self, node_id: str) -> None:
        if node_id not in self.ctl.node_records:
            raise NotFound(f"no node {node_id!r}", param="id", code="node_not_found")
        self.drains.pop(node_id, None)
        self.ctl.uncordon(node_id)

    def node_state(self, node_id: str, has_instances: bool) -> str | None:
        """"drained" once a drain finished and the node stayed empty (None: not this module's say)."""
        record = self.drains.get(node_id)
        if record is not None and record.state == "drained" and not has_instances:
            return "drained"
        return None

    # -- the scheduler's trigger ----------------------------------------------------------------

    def make_room(self, state: DeploymentState, model: ModelInfo, placement: Placement | None,
                  exclude: Iterable[str]) -> bool:
        """Whether a plan to free a better node for `model` was started (it then counts as the start)."""
        ctl = self.ctl
        if state.name in self.planned:
            return False
        try:
            plan = self.planner.plan(ctl.cluster, model, ctl.clock(), self._movable, placement, exclude)
        except Exception:  # a planning bug must never block ordinary starts
            log.exception("migration planning for %s failed", state.name)
            return False
        if plan is None:
            return False
        placeholder = InstanceSlot(id=f"{state.name}-planned-{uuid.uuid4().hex[:8]}", deployment=state.name,
                                   node=plan.node_id, address=plan.address, state="starting",
                                   created_at=ctl.clock(), expected_ready_at=ctl.clock() + plan.total_s)
        ctl.router.add_slot(placeholder)  # counts as capacity: the autoscaler starts no second instance
        ctl.cluster.reserve(plan.node_id, placeholder.id, ctl.scheduler.memory_needed(model),
                            ctl.clock() + plan.total_s)
        self.planned[state.name] = placeholder.id
        log.info("making room on %s for %s: %d move(s), ready in %.2f s (best node with room: %s)", plan.node_id,
                 state.name, len(plan.moves), plan.total_s,
                 "none" if plan.alternative_s is None else f"{plan.alternative_s:.2f} s")
        ctl.spawn(self._make_room(state, model, plan, placeholder), f"make-room-{state.name}")
        return True

    def _movable(self, node_id: str) -> list[RunningInstance]:
        ctl = self.ctl
        out = []
        for managed in ctl.instances.on_node(node_id):
            slot = managed.slot
            if slot.state != "ready" or managed.load_task is not None or slot.id in self.moving:
                continue
            state = ctl.router.deployments.get(slot.deployment)
            if state is None:
                continue
            streams = self.streams.get(slot.id, set())
            cost = self.cost_model(node_id, slot.id)
            if cost is None:
                if streams:
                    continue  # nothing measured yet: its requests' migration time is unknown
                cost = MigrationCostModel(0.0, 0.0, 1.0, 0.0, ("recompute",))
            kv_per_token = self.costs.get(node_id, CostInputs()).per_instance.get(slot.id, (0, 0.0, 0.0))[0]
            requests = tuple(RequestProgress(g.prompt_tokens, len(g.delivered_ids),
                                             (g.prompt_tokens + len(g.delivered_ids)) * kv_per_token)
                             for g in streams)
            out.append(RunningInstance(slot.id, node_id, ctl.model_info(state), managed.reserved_bytes, cost, requests))
        return out

    async def _make_room(self, state: DeploymentState, model: ModelInfo, plan: MigrationPlan,
                         placeholder: InstanceSlot) -> None:
        ctl = self.ctl
        try:
            ids = []
            for move in plan.moves:
                managed = ctl.instances.managed.get(move.instance_id)
                if managed is None:
                    continue
                if move.method == "none":  # idle: nothing to move, its replacement starts elsewhere
                    ctl.router.retire(managed.slot)
                    ctl.spawn(ctl.instances.stop(managed), f"stop-{move.instance_id}")
                    continue
                ids.append(self.migrate(move.instance_id, node=move.destination.node_id, reason="scheduler",
                                        exclude=[plan.node_id]).id)
            results = [await self.wait(migration_id) for migration_id in ids]
            if all(r.state == "done" for r in results):
                moved = {m.instance_id for m in plan.moves}
                deadline = ctl.clock() + MAKE_ROOM_TIMEOUT_S
                while ctl.clock() < deadline and any(
                        i in ctl.instances.managed and ctl.instances.managed[i].slot.state == "stopping" for i in moved):
                    await asyncio.sleep(0.1)  # sources are unloaded once their last stream switched
        except Exception:
            log.exception("making room on %s for %s failed", plan.node_id, state.name)
        finally:
            ctl.router.remove_slot(placeholder)
            ctl.cluster.finish(plan.node_id, placeholder.id)
            self.planned.pop(state.name, None)
        view = ctl.cluster.nodes.get(plan.node_id)
        if ctl.router.deployments.get(state.name) is state and view is not None and ctl.scheduler.fits(view, model):
            estimate = ctl.scheduler.time_to_ready(ctl.cluster, view, model, ctl.clock())
            placement = Placement(view.id, view.address, estimate, "migration", 1, ctl.scheduler.memory_needed(model))
            ctl.instances.start(state, placement, model, 0.0, 0.0)
        else:
            log.warning("room on %s for %s did not materialise; the scheduler places it elsewhere",
                        plan.node_id, state.name)
        ctl.reconcile(state.name)


class _Failed(Exception):
    """The migration cannot go on; its requests stay where they are."""


__all__ = ["DrainRecord", "MigrateBody", "MigrationRecord", "Migrations"]
