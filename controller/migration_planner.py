"""Whether to free a GPU on the best node by migrating its instances away (DESIGN.md, scheduling).

The scheduler places a new instance on the node with the smallest time-to-ready *among nodes
with room*. A node that holds the model in a faster tier but is full is out of its reach. This
planner asks whether making room there wins anyway:

    ready on the full node = free_after + load from its tier
    free_after             = max over moved instances of (their time-to-ready elsewhere + the
                             migration of their requests, the slowest request's)

An instance leaves the way DESIGN.md's live migration works: its destination loads its model
first (chosen by the same scheduler, the full node excluded), then its requests move with their
KV blocks or by recompute, whichever the cost model says is cheaper, then its memory is free.
An instance with no request in flight has nothing to move: it stops at once and its
replacement starts elsewhere in parallel, so its deployment keeps its warm capacity.
The plan is taken only when it beats the best node with room by `min_gain_s`: a migration
disturbs running streams and is not worth a rounding error.

Pure decision logic like the scheduler: the cluster view, the running instances (given by the
caller, who owns them) and `now` in; a plan or None out. The trace-driven simulator and the
controller drive it unchanged. Cost per decision is bounded: `max_targets` full nodes, their
movable instances, one scheduler placement each.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from ember.controller.config import DEFAULT_MIGRATION_MIN_GAIN_S
from ember.controller.nodes import CACHE_TIERS, ClusterView
from ember.controller.scheduler import Estimate, ModelInfo, Placement, Scheduler
from ember.migration.cost_model import MigrationCostModel


@dataclass(frozen=True)
class RequestProgress:
    """One in-flight request of an instance, as far as migrating it costs."""

    tokens_in: int
    tokens_out: int  # generated so far
    kv_bytes: int


@dataclass(frozen=True)
class RunningInstance:
    id: str
    node_id: str
    model: ModelInfo
    memory_bytes: int  # what its node gets back once it is gone
    cost: MigrationCostModel  # per model: recompute speed depends on the model
    requests: tuple[RequestProgress, ...] = ()


@dataclass(frozen=True)
class Move:
    instance_id: str
    destination: Placement
    method: str  # "recompute" | "kv" | "none" (no request in flight: nothing to move but the instance)
    migration_s: float  # the slowest of its requests
    free_after_s: float  # destination time-to-ready + migration_s; 0 for an idle instance (stops at once)


@dataclass(frozen=True)
class MigrationPlan:
    node_id: str
    address: str
    estimate: Estimate  # the model's time-to-ready on the node, were it free now
    moves: tuple[Move, ...]
    free_after_s: float
    total_s: float  # when the model is expected ready on the node, from now
    alternative_s: float | None  # the best node with room (None: no node had room)
    examined: int  # nodes considered as targets


@dataclass
class MigrationConfig:
    max_targets: int = 4  # full nodes holding the model that are examined per decision
    # Holders looked at per tier, in the index's order as the scheduler's holder_candidates are
    # (a set: its order follows string hashing; a caller that needs the same answer in every
    # process, like the simulator, sets this to the cluster size so that every holder is seen).
    scan_limit: int = 32
    # A plan must beat the best node with room by at least this (`--migration-min-gain`).
    min_gain_s: float = DEFAULT_MIGRATION_MIN_GAIN_S

    def validate(self) -> None:
        if self.max_targets < 1 or self.scan_limit < 1:
            raise ValueError(f"max_targets and scan_limit must be >= 1, got {self.max_targets}, {self.scan_limit}")
        if not math.isfinite(self.min_gain_s) or self.min_gain_s < 0:
            raise ValueError(f"min_gain_s must be >= 0, got {self.min_gain_s}")


InstancesOn = Callable[[str], Sequence[RunningInstance]]


class MigrationPlanner:
    def __init__(self, scheduler: Scheduler, config: MigrationConfig | None = None) -> None:
        self.scheduler = scheduler
        self.config = config or MigrationConfig()
        self.config.validate()

    def plan(self, cluster: ClusterView, model: ModelInfo, now: float, instances_on: InstancesOn,
             alternative: Placement | None, exclude: Iterable[str] = ()) -> MigrationPlan | None:
        """The best plan that beats `alternative` (the scheduler's placement) by min_gain_s, or None.

        `instances_on(node_id)` lists the instances that may move off a node: ready ones, not of
        this model, not already moving — the caller knows which those are."""
        excluded = frozenset(exclude)
        alternative_s = alternative.estimate.total_s if alternative is not None else math.inf
        targets = self._targets(cluster, model, now, excluded, alternative_s)
        best: MigrationPlan | None = None
        for estimate in targets:
            # A plan on a node is never faster than the node's own time-to-ready: once that is no
            # better than the best plan so far, neither is any target after it (they are sorted).
            if best is not None and estimate.total_s >= best.total_s:
                break
            bound = alternative_s if best is None else best.total_s + self.config.min_gain_s
            plan = self._plan_for(cluster, model, now, estimate, instances_on(estimate.node_id), excluded,
                                  bound, len(targets))
            if plan is not None and (best is None or plan.total_s < best.total_s):
                best = plan
        if best is not None and not math.isinf(alternative_s):
            return dataclasses.replace(best, alternative_s=alternative_s)
        return best

    def _targets(self, cluster: ClusterView, model: ModelInfo, now: float, excluded: frozenset[str],
                 alternative_s: float) -> list[Estimate]:
        """Full nodes holding the model whose load alone would beat the alternative."""
        scheduler = self.scheduler
        seen: set[str] = set()
        estimates: list[Estimate] = []
        for tier in CACHE_TIERS:
            for scanned, node_id in enumerate(cluster.holders_of(model.uri, tier)):
                if scanned >= self.config.scan_limit:
                    break
                if node_id in seen or node_id in excluded:
                    continue
                seen.add(node_id)
                node = cluster.nodes[node_id]
                if not node.up or scheduler.fits(node, model):
                    continue  # a node with room is the scheduler's business, not a migration's
                estimate = scheduler.time_to_ready(cluster, node, model, now)
                if estimate.total_s + self.config.min_gain_s < alternative_s:
                    estimates.append(estimate)
        estimates.sort(key=lambda e: (e.total_s, e.node_id))
        return estimates[: self.config.max_targets]

    def _plan_for(self, cluster: ClusterView, model: ModelInfo, now: float, estimate: Estimate,
                  instances: Sequence[RunningInstance], excluded: frozenset[str], alternative_s: float,
                  examined: int) -> MigrationPlan | None:
        """The cheapest moves that make room on one node, if they beat `alternative_s` by min_gain_s."""
        scheduler = self.scheduler
        node = cluster.nodes[estimate.node_id]
        need = scheduler.memory_needed(model) - node.available_bytes
        movable = [i for i in instances if i.node_id == node.id and i.model.uri != model.uri]
        if need <= 0 or sum(i.memory_bytes for i in movable) < need:
            return None
        # Cheapest first: idle instances (free at once), then by their requests' migration time.
        # Destinations are looked up only for the instances taken, so a decision costs one
        # placement per move rather than one per instance on the node.
        costed = sorted(movable, key=lambda i: (bool(i.requests), self._migration_s(i)[1], -i.memory_bytes, i.id))
        committed: dict[str, int] = {}  # destination node -> bytes already promised to earlier moves
        moves: list[Move] = []
        freed = 0
        for instance in costed:
            if freed >= need:
                break
            destination = self._destination(cluster, instance, now, excluded | {node.id}, committed)
            if destination is None:
                continue
            method, migration_s = self._migration_s(instance)
            committed[destination.node_id] = committed.get(destination.node_id, 0) + instance.memory_bytes
            moves.append(Move(instance.id, destination, method, migration_s,
                              _free_after(destination, instance, migration_s)))
            freed += instance.memory_bytes
            if max(m.free_after_s for m in moves) + estimate.transfer_s + estimate.init_s + \
                    self.config.min_gain_s >= alternative_s:
                return None  # already too slow: more moves only add to the wait
        if freed < need:
            return None
        free_after = max(m.free_after_s for m in moves)
        total = max(free_after, estimate.queue_wait_s) + estimate.transfer_s + estimate.init_s
        if total + self.config.min_gain_s >= alternative_s:
            return None
        return MigrationPlan(node.id, node.address, estimate, tuple(moves), free_after, total,
                             None if math.isinf(alternative_s) else alternative_s, examined)

    def _destination(self, cluster: ClusterView, instance: RunningInstance, now: float, excluded: frozenset[str],
                     committed: dict[str, int]) -> Placement | None:
        """Where the instance would start, leaving out nodes whose room earlier moves took (an
        instance takes at its destination the memory it holds now)."""
        skip = set(excluded)
        for _ in range(len(committed) + 1):
            placement = self.scheduler.place(cluster, instance.model, now, skip)
            if placement is None:
                return None
            promised = committed.get(placement.node_id, 0)
            room = cluster.nodes[placement.node_id].available_bytes - promised
            if not promised or room >= max(instance.memory_bytes, placement.reserved_bytes):
                return placement
            skip.add(placement.node_id)
        return None

    @staticmethod
    def _migration_s(instance: RunningInstance) -> tuple[str, float]:
        """The slowest request decides when the instance's memory is free (they move in parallel)."""
        if not instance.requests:
            return "none", 0.0
        costs = [instance.cost.best(r.tokens_in, r.tokens_out, r.kv_bytes) for r in instance.requests]
        slowest = max(costs, key=lambda c: c.seconds)
        return slowest.method, slowest.seconds


def _free_after(destination: Placement, instance: RunningInstance, migration_s: float) -> float:
    return destination.estimate.total_s + migration_s if instance.requests else 0.0


__all__ = ["MigrationConfig", "MigrationPlan", "MigrationPlanner", "Move", "RequestProgress", "RunningInstance"]
