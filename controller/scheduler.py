"""Where to start an instance: the node with the smallest estimated time-to-ready.

    time_to_ready(m, n) = queue_wait(n) + min over tiers t holding m on n of size(m) / bw(n, t) + init(m)

S3 is always a tier (a node can always fetch), the disk tier holds local-path checkpoints on
every node, and bandwidths come from what nodes measured (their heartbeats, and the loads the
controller watched finish), falling back to the cluster's average and then to configured
defaults. queue_wait(n) is the time until the loads already placed on n are expected to finish.

Pure decision logic: inputs are the ClusterView, a ModelInfo and `now`; the output is a
Placement (or None when no node has room). No I/O and no clock reads, so the trace-driven
simulator runs this module unchanged. A decision examines only the nodes that hold the model
plus a few of the roomiest others (`free_candidates`), never the whole cluster.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from ember.controller.config import SchedulerConfig
from ember.controller.nodes import CACHE_TIERS, ClusterView, NodeView


@dataclass(frozen=True)
class ModelInfo:
    uri: str
    size_bytes: int
    init_s: float | None = None  # measured model initialisation time; None = use the default
    local: bool = False  # a local path: readable from disk on every node, never from S3
    memory_bytes: int | None = None  # what a started instance held against its node's budget; None = not seen yet


@dataclass(frozen=True)
class Estimate:
    node_id: str
    tier: str
    total_s: float
    queue_wait_s: float
    transfer_s: float
    init_s: float


@dataclass(frozen=True)
class Placement:
    node_id: str
    address: str
    estimate: Estimate
    policy: str
    examined: int  # nodes whose time-to-ready was computed: bounded, whatever the cluster size
    reserved_bytes: int


class Policy(Protocol):
    name: str

    def choose(self, scheduler: Scheduler, cluster: ClusterView, model: ModelInfo, now: float,
               exclude: frozenset[str]) -> tuple[Estimate | None, int]: ...


class Scheduler:
    def __init__(self, config: SchedulerConfig | None = None, rng: random.Random | None = None) -> None:
        self.config = config or SchedulerConfig()
        self.config.validate()
        self.rng = rng or random.Random(self.config.seed)
        self.policy: Policy = make_policy(self.config.policy)

    # -- the estimate -----------------------------------------------------------------------------

    def bandwidth(self, cluster: ClusterView, node: NodeView, tier: str) -> float:
        """GB/s: the node's measurement, else the cluster's average, else the configured default."""
        if tier == "s3":
            measured = node.s3_gbps
        else:
            view = node.tiers.get(tier)
            measured = view.gbps if view is not None else 0.0
        if measured > 0:
            return measured
        average = cluster.cluster_gbps.get(tier, 0.0)
        if average > 0:
            return average
        return self.config.default_gbps.get(tier, self.config.default_gbps["s3"])

    def tiers_for(self, node: NodeView, model: ModelInfo) -> list[str]:
        tiers = node.tier_holding(model.uri)
        if model.local:
            if "disk" not in tiers:
                tiers.append("disk")
        else:
            tiers.append("s3")
        return tiers

    def time_to_ready(self, cluster: ClusterView, node: NodeView, model: ModelInfo, now: float) -> Estimate:
        queue_wait = node.busy_until() - now if node.pending else 0.0
        queue_wait = max(0.0, queue_wait)
        init = model.init_s if model.init_s is not None else self.config.default_init_s
        best_tier, best_gbps = "s3", 0.0
        for tier in self.tiers_for(node, model):
            gbps = self.bandwidth(cluster, node, tier)
            if gbps > best_gbps:
                best_tier, best_gbps = tier, gbps
        transfer = model.size_bytes / (best_gbps * 1e9)
        return Estimate(node.id, best_tier, queue_wait + transfer + init, queue_wait, transfer, init)

    def memory_needed(self, model: ModelInfo) -> int:
        """What an instance will hold on its node: the worker's own figure once an instance of the
        model reported it (weights plus the backend's KV budget and logits, which for a 7B model
        with a 32k-token KV budget is more than twice the weights), the checkpoint size times
        memory_factor before that."""
        if model.memory_bytes:
            return model.memory_bytes
        return int(model.size_bytes * self.config.memory_factor)

    def fits(self, node: NodeView, model: ModelInfo) -> bool:
        return node.up and not node.cordoned and node.available_bytes >= self.memory_needed(model)

    # -- the decision -----------------------------------------------------------------------------

    def place(self, cluster: ClusterView, model: ModelInfo, now: float,
              exclude: Iterable[str] = ()) -> Placement | None:
        """The best node for a new instance of `model`, or None when no up node has room."""
        estimate, examined = self.policy.choose(self, cluster, model, now, frozenset(exclude))
        if estimate is None:
            return None
        node = cluster.nodes[estimate.node_id]
        return Placement(node.id, node.address, estimate, self.policy.name, examined, self.memory_needed(model))

    def candidates(self, cluster: ClusterView, model: ModelInfo, exclude: frozenset[str]) -> list[NodeView]:
        """Nodes with room that are not excluded: up to `holder_candidates` holding the model per
        tier (fastest tier first) plus the `free_candidates` roomiest others."""
        chosen: dict[str, NodeView] = {}
        for tier in CACHE_TIERS:
            taken = 0
            # Sorted so that a decision never depends on set order (string hashing differs per
            # process): the same cluster and model give the same placement in every run.
            for node_id in sorted(cluster.holders_of(model.uri, tier)):
                if taken >= self.config.holder_candidates:
                    break
                node = cluster.nodes[node_id]
                if node_id not in exclude and node_id not in chosen and self.fits(node, model):
                    chosen[node_id] = node
                    taken += 1
        need = self.memory_needed(model)
        for node in cluster.roomiest(self.config.free_candidates + len(exclude)):
            if node.available_bytes < need:
                break  # the heap is ordered by room: nobody further down fits either
            if node.id not in exclude and self.fits(node, model):
                chosen.setdefault(node.id, node)
        return list(chosen.values())


def _best(estimates: list[Estimate], key) -> Estimate | None:
    return min(estimates, key=key) if estimates else None


class LocalityPolicy:
    """Smallest time-to-ready; ties go to the node with more room (then the lower id)."""

    name = "locality"

    def choose(self, scheduler: Scheduler, cluster: ClusterView, model: ModelInfo, now: float,
               exclude: frozenset[str]) -> tuple[Estimate | None, int]:
        nodes = scheduler.candidates(cluster, model, exclude)
        estimates = [scheduler.time_to_ready(cluster, n, model, now) for n in nodes]
        room = {n.id: n.available_bytes for n in nodes}
        return _best(estimates, key=lambda e: (round(e.total_s, 6), -room[e.node_id], e.node_id)), len(nodes)


class LeastLoadedPolicy:
    """Fewest requests and loads in flight among the roomiest nodes; locality ignored."""

    name = "least-loaded"

    def choose(self, scheduler: Scheduler, cluster: ClusterView, model: ModelInfo, now: float,
               exclude: frozenset[str]) -> tuple[Estimate | None, int]:
        nodes = [n for n in cluster.roomiest(scheduler.config.free_candidates + len(exclude))
                 if n.id not in exclude and scheduler.fits(n, model)]
        if not nodes:
            return None, 0
        node = min(nodes, key=lambda n: (n.active_requests + n.queued_requests + len(n.pending) + len(n.instance_ids),
                                         -n.available_bytes, n.id))
        return scheduler.time_to_ready(cluster, node, model, now), len(nodes)


class RandomPolicy:
    """A uniformly random node with room: the baseline the others are measured against."""

    name = "random"

    def choose(self, scheduler: Scheduler, cluster: ClusterView, model: ModelInfo, now: float,
               exclude: frozenset[str]) -> tuple[Estimate | None, int]:
        up = cluster.up_nodes()
        tries = min(len(up), scheduler.config.free_candidates * 2)
        for i in range(tries):
            node = cluster.nodes[up[scheduler.rng.randrange(len(up))]]
            if node.id not in exclude and scheduler.fits(node, model):
                return scheduler.time_to_ready(cluster, node, model, now), i + 1
        # Sampling missed (a nearly full cluster): any node with room, roomiest first.
        for node in cluster.roomiest(scheduler.config.free_candidates + len(exclude)):
            if node.id not in exclude and scheduler.fits(node, model):
                return scheduler.time_to_ready(cluster, node, model, now), tries + 1
        return None, tries


POLICY_TYPES: dict[str, type] = {"locality": LocalityPolicy, "least-loaded": LeastLoadedPolicy, "random": RandomPolicy}


def make_policy(name: str) -> Policy:
    try:
        return POLICY_TYPES[name]()
    except KeyError:
        raise ValueError(f"unknown scheduling policy {name!r}; choose one of {', '.join(POLICY_TYPES)}") from None


__all__ = ["CACHE_TIERS", "Estimate", "ModelInfo", "Placement", "Policy", "Scheduler", "make_policy"]
