"""The discrete-event simulation: a virtual clock, a heap of events, the controller's decisions.

What decides is the controller's own code, unchanged and unaware of the simulation:
ClusterView (fed with heartbeats built from the simulated nodes), Scheduler.place,
Autoscaler.decide and MigrationPlanner.plan, all called with the virtual `now`. What this
module adds is the glue the real controller does with asyncio and gRPC, mirrored step by step:
- the router (controller/router.py): a bounded FIFO queue per deployment, at most
  target_concurrency requests per instance, the free instance with the fewest requests first
  (oldest on ties), 429 when the queue is full, a timeout for requests that wait too long;
- reconcile (controller/app.py): run the autoscaler on every queued request, finished request
  that leaves an instance idle, instance ready or gone, and keep-alive timer; stop what it says,
  start what it says through the scheduler, retry starved deployments when room appears;
- the worker: GPUs, serial loads from the fastest tier holding the checkpoint (size / bandwidth
  + init — the scheduler's own formula), tier caches filled by loads, requests that take
  prefill + decode time, and live migration as DESIGN.md describes it.

Nodes report their state to the ClusterView at once when instances or caches change (the real
controller learns those from its own calls within the same event) and their request counts
every heartbeat interval.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ember.controller.autoscaler import Autoscaler, DeploymentLoad, InstanceLoad
from ember.controller.config import SchedulerConfig
from ember.controller.migration_planner import (
    MigrationConfig,
    MigrationPlan,
    MigrationPlanner,
    RequestProgress,
    RunningInstance,
)
from ember.controller.nodes import ClusterView, NodeStatusView, TierView
from ember.controller.scheduler import ModelInfo, Scheduler
from ember.migration.cost_model import MigrationCostModel
from ember.sim.catalog import ModelSpec
from ember.sim.config import SimConfig
from ember.sim.hardware import SimNode, TierCache
from ember.sim.profiles import PolicyProfile
from ember.sim.workload import Workload

# Event kinds (the heap holds (time, sequence, kind, a, b); the sequence keeps ties in FIFO order).
DONE, LOAD_DONE, EXPIRE, TIMER, POLL, FREE, HEARTBEAT, CAPACITY = range(8)

PENDING, COMPLETED, REJECTED = 0, 1, 2
REJECT_REASONS = ("queue_full", "timeout")


class Request:
    __slots__ = ("idx", "dep", "arrival", "tokens_in", "tokens_out", "instance", "first_token_at", "done_at",
                 "version", "finished")

    def __init__(self, idx: int, dep: Deployment, arrival: float, tokens_in: int, tokens_out: int) -> None:
        self.idx = idx
        self.dep = dep
        self.arrival = arrival
        self.tokens_in = tokens_in
        self.tokens_out = tokens_out
        self.instance: Instance | None = None
        self.first_token_at = 0.0
        self.done_at = 0.0
        self.version = 0
        self.finished = False  # completed or rejected


@dataclass(eq=False)
class Instance:
    id: str
    dep: Deployment
    node: SimNode
    order: int
    created_at: float
    estimate_s: float
    state: str = "starting"  # starting | loading | ready | stopping (the autoscaler's states)
    gpus_held: int = 0
    in_flight: dict[int, Request] = field(default_factory=dict)
    idle_since: float | None = None
    tier: str = ""
    gone: bool = False
    migrate_to: Instance | None = None  # set on a migration source
    migrating_from: Instance | None = None  # set on its destination
    pinned_dram: bool = False


@dataclass(eq=False)
class Deployment:
    spec: ModelSpec
    cost: MigrationCostModel | None
    queue: deque[Request] = field(default_factory=deque)
    queued_live: int = 0
    instances: dict[str, Instance] = field(default_factory=dict)
    init_ewma_s: float | None = None
    timer_version: int = 0
    poll_pending: bool = False
    next_order: int = 0

    @property
    def name(self) -> str:
        return self.spec.name

    def free_instance(self, limit: int) -> Instance | None:
        """The router's rule: the ready instance with the fewest requests below target, oldest on ties."""
        best: Instance | None = None
        for inst in self.instances.values():
            if inst.state == "ready" and len(inst.in_flight) < limit:
                if best is None or (len(inst.in_flight), inst.order) < (len(best.in_flight), best.order):
                    best = inst
        return best


@dataclass
class Counters:
    cold_starts: dict[str, int] = field(default_factory=lambda: {"dram": 0, "disk": 0, "s3": 0})
    migrations: int = 0  # instances moved to free a GPU
    migration_plans: int = 0
    migrated_requests: dict[str, int] = field(default_factory=lambda: {"recompute": 0, "kv": 0})
    rejected: dict[str, int] = field(default_factory=lambda: {r: 0 for r in REJECT_REASONS})
    estimate_ratios: list[float] = field(default_factory=list)  # actual / estimated time to ready
    placements: int = 0  # Scheduler.place calls (each cold start, and each retry of a starved one)
    events: int = 0


class Simulation:
    def __init__(self, config: SimConfig, profile: PolicyProfile, catalog: list[ModelSpec],
                 workload: Workload) -> None:
        self.config = config
        self.profile = profile
        self.workload = workload
        self.now = 0.0
        self._heap: list[tuple] = []
        self._seq = 0
        cluster_cfg = config.cluster
        self.gpu_bytes = int(cluster_cfg.gpu_memory_gb * 1e9)
        self.limit = config.deployment.target_concurrency
        nominal = profile.tier_gbps(cluster_cfg)
        sched_config = SchedulerConfig(
            policy=profile.scheduler_policy,
            default_gbps={"dram": nominal.get("dram", cluster_cfg.dram_gbps),
                          "disk": nominal.get("disk", cluster_cfg.disk_gbps), "s3": nominal["s3"]},
            # Examine every holder: the controller caps this at 16 for speed at 10k nodes, but the
            # first 16 of a set depend on the process's string hashing, and a simulation must give
            # the same result for the same seed in every process.
            holder_candidates=max(16, cluster_cfg.nodes),
            memory_factor=config.memory_factor,
            seed=config.seed,
        )
        self.cluster = ClusterView(sched_config.ewma_alpha)
        self.scheduler = Scheduler(sched_config)
        self.autoscaler = Autoscaler()
        self.planner = None
        if profile.migration:
            m = config.migration
            self.planner = MigrationPlanner(self.scheduler, MigrationConfig(
                max_targets=m.max_targets, min_gain_s=m.min_gain_s, scan_limit=max(32, cluster_cfg.nodes)))
        self.nodes = self._build_nodes()
        by_name = {spec.name: spec for spec in catalog}
        self.deployments = [Deployment(by_name[name], self._cost_model(by_name[name])) for name in workload.model_names]
        n = len(workload)
        self.status = np.zeros(n, dtype=np.int8)
        self.ttft = np.full(n, np.nan)
        self.e2e = np.full(n, np.nan)
        self.queued = np.zeros(n, dtype=bool)
        self.counters = Counters()
        self._starved: dict[str, Deployment] = {}
        self._dirty: dict[str, SimNode] = {}
        self._heartbeat_armed = False
        self._capacity_armed = False
        self._instance_seq = 0
        self._prestage()
        for node in self.nodes.values():
            self._report(node)

    # -- setup --------------------------------------------------------------------------------

    def _build_nodes(self) -> dict[str, SimNode]:
        c = self.config.cluster
        rng = np.random.default_rng([self.config.seed, 29])
        width = max(3, len(str(c.nodes - 1)))
        nodes = {}
        for i in range(c.nodes):
            factor = 1.0 + c.bandwidth_jitter * (2 * rng.random() - 1)
            node_id = f"node-{i:0{width}d}"
            nodes[node_id] = SimNode(
                id=node_id, gpus_total=c.gpus_per_node, gpu_bytes=self.gpu_bytes,
                gbps=self.profile.tier_gbps(c, factor),
                dram=TierCache(int(c.dram_gb * 1e9)) if self.profile.dram_tier else None,
                disk=TierCache(int(c.disk_gb * 1e9)) if self.profile.disk_tier else None,
            )
        return nodes

    def _prestage(self) -> None:
        """Put each checkpoint on the disk of `prestaged_disk_copies` nodes, the same nodes for
        every policy (a seeded shuffle, then round-robin), so runs start from a warm cluster."""
        copies = self.config.cluster.prestaged_disk_copies
        if not copies or not self.profile.disk_tier:
            return
        order = list(self.nodes.values())
        np.random.default_rng([self.config.seed, 31]).shuffle(order)
        slot = 0
        for dep in self.deployments:
            for _ in range(copies):
                disk = order[slot % len(order)].disk
                assert disk is not None
                disk.insert(dep.spec.uri, dep.spec.size_bytes)
                slot += 1

    def _cost_model(self, spec: ModelSpec) -> MigrationCostModel | None:
        if not self.profile.migration:
            return None
        m = self.config.migration
        return MigrationCostModel(recompute_s_per_token=spec.prefill_s_per_token,
                                  recompute_overhead_s=m.recompute_overhead_s,
                                  net_gbps=self.config.cluster.network_gbps, kv_overhead_s=m.kv_overhead_s,
                                  methods=self.profile.migration)

    def model_info(self, dep: Deployment) -> ModelInfo:
        spec = dep.spec
        return ModelInfo(uri=spec.uri, size_bytes=spec.size_bytes, init_s=dep.init_ewma_s)

    # -- the event loop -----------------------------------------------------------------------

    def _push(self, when: float, kind: int, a: object = None, b: object = None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, a, b))

    def run(self, progress: Callable[[float], None] | None = None) -> Simulation:
        times = self.workload.times
        models = self.workload.models
        tokens_in = self.workload.tokens_in
        tokens_out = self.workload.tokens_out
        n = len(times)
        heap = self._heap
        handlers = {DONE: self._on_done, LOAD_DONE: self._on_load_done, EXPIRE: self._on_expire,
                    TIMER: self._on_timer, POLL: self._on_poll, FREE: self._on_free, HEARTBEAT: self._on_heartbeat,
                    CAPACITY: self._on_capacity}
        i = 0
        events = 0
        tick = max(1, n // 100)
        while True:
            next_arrival = times[i] if i < n else math.inf
            if heap and heap[0][0] <= next_arrival:
                when, _, kind, a, b = heapq.heappop(heap)
                self.now = when
                handlers[kind](a, b)
            elif i < n:
                self.now = float(next_arrival)
                self._arrive(Request(i, self.deployments[models[i]], self.now, int(tokens_in[i]), int(tokens_out[i])))
                i += 1
                if progress is not None and i % tick == 0:
                    progress(i / n)
            else:
                break
            events += 1
        for node in self.nodes.values():
            node.account(self.now)
        self.counters.events = events
        return self

    # -- requests (the router) ----------------------------------------------------------------

    def _arrive(self, req: Request) -> None:
        dep = req.dep
        inst = None if dep.queued_live else dep.free_instance(self.limit)
        if inst is not None:
            self._dispatch(req, inst)
            return
        if dep.queued_live >= self.config.deployment.queue_limit:
            self._reject(req, "queue_full")
            return
        self.queued[req.idx] = True
        dep.queue.append(req)
        dep.queued_live += 1
        self._push(self.now + self.config.deployment.request_timeout_s, EXPIRE, req)
        self._on_demand(dep)
        self._pump(dep)

    def _dispatch(self, req: Request, inst: Instance) -> None:
        spec = inst.dep.spec
        inst.in_flight[req.idx] = req
        inst.idle_since = None
        req.instance = inst
        req.first_token_at = self.now + req.tokens_in * spec.prefill_s_per_token
        req.done_at = req.first_token_at + req.tokens_out * spec.decode_s_per_token
        self._push(req.done_at, DONE, req, req.version)
        self._count_active(inst.node, +1)

    def _pump(self, dep: Deployment) -> None:
        while dep.queue:
            if dep.queue[0].finished:
                dep.queue.popleft()
                continue
            inst = dep.free_instance(self.limit)
            if inst is None:
                return
            req = dep.queue.popleft()
            dep.queued_live -= 1
            self._dispatch(req, inst)

    def _on_done(self, req: Request, version: int) -> None:
        if version != req.version:
            return  # rescheduled by a migration
        inst = req.instance
        assert inst is not None
        del inst.in_flight[req.idx]
        self._count_active(inst.node, -1)
        req.finished = True
        self.status[req.idx] = COMPLETED
        self.ttft[req.idx] = req.first_token_at - req.arrival
        self.e2e[req.idx] = self.now - req.arrival
        dep = inst.dep
        if inst.in_flight:
            self._pump(dep)
            return
        inst.idle_since = self.now
        if inst.migrate_to is not None:
            self._free(inst)  # its last request finished before the destination was ready
        self._pump(dep)
        self._on_demand(dep)

    def _on_expire(self, req: Request, _: object) -> None:
        if req.finished or req.instance is not None:
            return
        dep = req.dep
        dep.queued_live -= 1
        self._reject(req, "timeout")
        self._on_demand(dep)

    def _reject(self, req: Request, reason: str) -> None:
        req.finished = True
        self.status[req.idx] = REJECTED
        self.counters.rejected[reason] += 1

    def _count_active(self, node: SimNode, delta: int) -> None:
        node.active_requests += delta
        self._dirty[node.id] = node
        if not self._heartbeat_armed:
            self._heartbeat_armed = True
            self._push(self.now + self.config.heartbeat_interval_s, HEARTBEAT)

    # -- reconcile (the controller's app.py) --------------------------------------------------

    def _on_demand(self, dep: Deployment) -> None:
        poll = self.profile.poll_s
        if poll <= 0:
            self._reconcile(dep)
        elif not dep.poll_pending:
            dep.poll_pending = True
            self._push((math.floor(self.now / poll) + 1) * poll, POLL, dep)

    def _on_poll(self, dep: Deployment, _: object) -> None:
        dep.poll_pending = False
        self._reconcile(dep)

    def _on_timer(self, dep: Deployment, version: int) -> None:
        if version == dep.timer_version:
            self._reconcile(dep)

    def _reconcile(self, dep: Deployment) -> None:
        d = self.config.deployment
        load = DeploymentLoad(
            name=dep.name, min_instances=d.min_instances, max_instances=d.max_instances,
            target_concurrency=d.target_concurrency, keep_alive_s=d.keep_alive_s, queued=dep.queued_live,
            instances=[InstanceLoad(i.id, i.state, len(i.in_flight), i.idle_since) for i in dep.instances.values()],
        )
        decision = self.autoscaler.decide(load, self.now)
        for instance_id in decision.stop:
            inst = dep.instances.get(instance_id)
            if inst is not None:
                inst.state = "stopping"
        for inst in list(dep.instances.values()):
            if inst.state == "stopping" and not inst.in_flight and inst.migrate_to is None and not inst.gone:
                self._unload(inst)
        next_check = decision.next_check_at
        if decision.start:
            started = self._start(dep, decision.start)
            if started < decision.start:
                self._starved[dep.name] = dep
        else:
            self._starved.pop(dep.name, None)
        dep.timer_version += 1
        if next_check is not None:
            self._push(max(self.now, next_check) + 0.001, TIMER, dep, dep.timer_version)

    def _capacity_changed(self) -> None:
        """Room appeared: starved deployments try again — after the current event, as the
        controller's unload task does, so no reconcile runs inside another."""
        if not self._capacity_armed:
            self._capacity_armed = True
            self._push(self.now, CAPACITY)

    def _on_capacity(self, _a: object, _b: object) -> None:
        self._capacity_armed = False
        starved = list(self._starved.values())
        self._starved.clear()
        for dep in starved:
            self._reconcile(dep)

    def _start(self, dep: Deployment, count: int) -> int:
        model = self.model_info(dep)
        started = 0
        for _ in range(count):
            self.counters.placements += 1
            placement = self.scheduler.place(self.cluster, model, self.now)
            if self.planner is not None:
                plan = self.planner.plan(self.cluster, model, self.now, self._movable, placement)
                if plan is not None:
                    self._migrate(dep, model, plan)
                    started += 1
                    continue
            if placement is None:
                break
            self._launch(dep, self.nodes[placement.node_id], placement.estimate.total_s, placement.reserved_bytes)
            started += 1
        return started

    # -- instances (the controller's instances.py and the worker) -----------------------------

    def _launch(self, dep: Deployment, node: SimNode, estimate_s: float, reserved_bytes: int) -> Instance:
        self._instance_seq += 1
        inst = Instance(f"{dep.name}-{self._instance_seq}", dep, node, dep.next_order, self.now, estimate_s)
        dep.next_order += 1
        dep.instances[inst.id] = inst
        node.instances[inst.id] = inst
        self.cluster.reserve(node.id, inst.id, reserved_bytes, self.now + estimate_s)
        take = min(node.gpus_free, dep.spec.gpus)
        node.account(self.now)
        node.gpus_free -= take
        inst.gpus_held = take
        if take < dep.spec.gpus:
            node.gpu_waiters.append(inst)
        else:
            node.load_queue.append(inst)
            self._pump_loads(node)
        self._report(node)
        return inst

    def _pump_loads(self, node: SimNode) -> None:
        if node.loading is not None or not node.load_queue:
            return
        inst = node.load_queue[0]
        spec = inst.dep.spec
        uri = spec.uri
        tier = node.best_tier(uri)
        if self.profile.pinned_dram_pool:
            dram = node.dram
            assert dram is not None
            if not dram.insert(uri, spec.size_bytes):
                return  # the pinned pool is full of running models: wait until one stops
            dram.pin(uri)
            inst.pinned_dram = True
        node.load_queue.popleft()
        for cache in (node.dram, node.disk):
            if cache is not None and uri in cache:
                cache.touch(uri)
        node.loading = inst
        inst.state = "loading"
        inst.tier = tier
        self._push(self.now + load_seconds(spec, node.gbps[tier]), LOAD_DONE, node, inst)
        if self.profile.pinned_dram_pool:
            self._report(node)

    def _on_load_done(self, node: SimNode, inst: Instance) -> None:
        node.loading = None
        spec = inst.dep.spec
        dep = inst.dep
        self.cluster.finish(node.id, inst.id)
        transfer_s = spec.size_bytes / (node.gbps[inst.tier] * 1e9)
        self.cluster.observe_load(node.id, inst.tier, spec.size_bytes, transfer_s)
        if node.disk is not None:
            node.disk.insert(spec.uri, spec.size_bytes)
        if node.dram is not None and not self.profile.pinned_dram_pool:
            node.dram.insert(spec.uri, spec.size_bytes)
        dep.init_ewma_s = spec.init_s if dep.init_ewma_s is None else 0.7 * dep.init_ewma_s + 0.3 * spec.init_s
        self.counters.cold_starts[inst.tier] += 1
        if inst.estimate_s > 0:
            self.counters.estimate_ratios.append((self.now - inst.created_at) / inst.estimate_s)
        inst.state = "ready"
        inst.idle_since = self.now
        self._report(node)
        source = inst.migrating_from
        if source is not None:
            self._move_requests(source, inst)
        self._pump_loads(node)
        self._pump(dep)
        self._on_demand(dep)

    def _unload(self, inst: Instance) -> None:
        """The instance is gone: its GPUs go to instances waiting for them, then to the free pool."""
        inst.gone = True
        inst.state = "stopping"
        node = inst.node
        dep = inst.dep
        del dep.instances[inst.id]
        del node.instances[inst.id]
        if inst.pinned_dram and node.dram is not None:
            node.dram.unpin(dep.spec.uri)
        node.account(self.now)
        free = inst.gpus_held
        while free and node.gpu_waiters:
            waiter = node.gpu_waiters[0]
            give = min(free, waiter.dep.spec.gpus - waiter.gpus_held)
            waiter.gpus_held += give
            free -= give
            if waiter.gpus_held == waiter.dep.spec.gpus:
                node.gpu_waiters.popleft()
                node.load_queue.append(waiter)
        node.gpus_free += free
        self._pump_loads(node)
        self._report(node)
        self._capacity_changed()

    # -- migration ----------------------------------------------------------------------------

    def _movable(self, node_id: str) -> list[RunningInstance]:
        """What may move off a node: ready instances not already moving (the planner's input)."""
        out = []
        for inst in self.nodes[node_id].instances.values():
            if inst.state != "ready" or inst.migrate_to is not None:
                continue
            requests = tuple(self._progress(req) for req in inst.in_flight.values())
            assert inst.dep.cost is not None
            out.append(RunningInstance(inst.id, node_id, self.model_info(inst.dep), inst.gpus_held * self.gpu_bytes,
                                       inst.dep.cost, requests))
        return out

    def _progress(self, req: Request) -> RequestProgress:
        spec = req.dep.spec
        generated = 0
        if self.now > req.first_token_at:
            generated = min(req.tokens_out, int((self.now - req.first_token_at) / spec.decode_s_per_token))
        return RequestProgress(req.tokens_in, generated, (req.tokens_in + generated) * spec.kv_bytes_per_token)

    def _migrate(self, dep: Deployment, model: ModelInfo, plan: MigrationPlan) -> None:
        """Start the model on the full node once the plan's instances have moved off it."""
        self.counters.migration_plans += 1
        target = self.nodes[plan.node_id]
        for move in plan.moves:
            # A busy source keeps serving (new requests too) until its replacement is ready; an
            # idle one stops at once, as the plan assumed.
            source = target.instances[move.instance_id]
            destination = self._launch(source.dep, self.nodes[move.destination.node_id],
                                       move.destination.estimate.total_s, move.destination.reserved_bytes)
            destination.migrating_from = source
            source.migrate_to = destination
            self.counters.migrations += 1
            if not source.in_flight:
                self._free(source)
        self._launch(dep, target, plan.total_s, self.scheduler.memory_needed(model))

    def _move_requests(self, source: Instance, destination: Instance) -> None:
        """The destination is ready: each request pauses for its migration, then runs there."""
        destination.migrating_from = None
        if source.gone:
            return
        source.state = "stopping"  # the router sends it nothing new from now on
        cost = source.dep.cost
        assert cost is not None
        slowest = 0.0
        for req in list(source.in_flight.values()):
            progress = self._progress(req)
            move = cost.best(progress.tokens_in, progress.tokens_out, progress.kv_bytes)
            self.counters.migrated_requests[move.method] += 1
            del source.in_flight[req.idx]
            self._count_active(source.node, -1)
            destination.in_flight[req.idx] = req
            destination.idle_since = None
            self._count_active(destination.node, +1)
            req.instance = destination
            if self.now < req.first_token_at:
                req.first_token_at += move.seconds
            req.done_at += move.seconds
            req.version += 1
            self._push(req.done_at, DONE, req, req.version)
            slowest = max(slowest, move.seconds)
        self._push(self.now + slowest, FREE, source)

    def _on_free(self, source: Instance, _: object) -> None:
        self._free(source)

    def _free(self, source: Instance) -> None:
        if not source.gone:
            self._unload(source)

    # -- heartbeats -----------------------------------------------------------------------------

    def _on_heartbeat(self, _a: object, _b: object) -> None:
        self._heartbeat_armed = False
        dirty, self._dirty = self._dirty, {}
        for node in dirty.values():
            self._report(node)

    def _report(self, node: SimNode) -> None:
        """A heartbeat, as the worker would send it: free GPUs, tier contents, measured rates."""
        tiers = {}
        for name, cache in (("dram", node.dram), ("disk", node.disk)):
            if cache is not None:
                tiers[name] = TierView(node.gbps[name], dict(cache.entries), cache.capacity, cache.used)
        self._dirty.pop(node.id, None)
        self.cluster.observe(NodeStatusView(
            id=node.id, address=node.address, free_bytes=node.gpus_free * self.gpu_bytes,
            total_bytes=node.gpus_total * self.gpu_bytes, tiers=tiers, s3_gbps=node.gbps["s3"],
            instance_ids=frozenset(node.instances), active_requests=node.active_requests,
        ), self.now)


def load_seconds(spec: ModelSpec, gbps: float) -> float:
    """Time from the start of a load to a ready instance: size / bandwidth + init (the scheduler's formula)."""
    return spec.size_bytes / (gbps * 1e9) + spec.init_s
