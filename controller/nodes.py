"""The scheduler's view of the cluster: nodes, what their tiers hold, and an index to avoid scans.

Pure data and bookkeeping — no I/O, no clocks: every method that needs the time takes `now`,
so the simulator can drive the same code with a virtual clock. The controller feeds it from
heartbeats and from its own placements (memory reserved and loads in progress are known here
before the next heartbeat reports them).

The index keeps a decision's cost independent of the cluster's size:
- `holders[tier][uri]`: the nodes whose DRAM (or disk) tier holds a checkpoint;
- a max-heap of up, uncordoned nodes by free memory (lazy deletion by version), whose top is the roomiest
  node: if it cannot fit an instance, no node that does not already hold the model can.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

CACHE_TIERS = ("dram", "disk")


@dataclass
class TierView:
    gbps: float = 0.0  # measured read bandwidth; 0 = not measured yet
    checkpoints: dict[str, int] = field(default_factory=dict)  # uri -> bytes
    capacity_bytes: int = 0
    used_bytes: int = 0


@dataclass
class NodeStatusView:
    """One heartbeat, as the cluster view needs it (built from the wire NodeStatus)."""

    id: str
    address: str
    free_bytes: int
    total_bytes: int
    tiers: dict[str, TierView] = field(default_factory=dict)
    s3_gbps: float = 0.0
    instance_ids: frozenset[str] = frozenset()
    active_requests: int = 0
    queued_requests: int = 0


@dataclass
class PendingLoad:
    instance_id: str
    reserved_bytes: int
    ready_by: float  # estimated end of the load (absolute time)


@dataclass
class NodeView:
    id: str
    address: str
    state: str = "up"  # "up" | "down"
    last_heartbeat: float = 0.0
    free_bytes: int = 0  # as last reported (the worker's budget minus what its instances hold)
    total_bytes: int = 0
    tiers: dict[str, TierView] = field(default_factory=dict)
    s3_gbps: float = 0.0
    instance_ids: frozenset[str] = frozenset()
    active_requests: int = 0
    queued_requests: int = 0
    pending: dict[str, PendingLoad] = field(default_factory=dict)
    cordoned: bool = False  # being drained (Kubernetes cordon): no new instances
    version: int = 0

    @property
    def up(self) -> bool:
        return self.state == "up"

    @property
    def reserved_bytes(self) -> int:
        """Memory of loads placed here that the last heartbeat did not account for yet."""
        if not self.pending:
            return 0
        return sum(p.reserved_bytes for p in self.pending.values() if p.instance_id not in self.instance_ids)

    @property
    def available_bytes(self) -> int:
        return self.free_bytes - self.reserved_bytes

    def busy_until(self) -> float:
        """When the loads in progress here are expected to be done (0 when there are none)."""
        return max((p.ready_by for p in self.pending.values()), default=0.0)

    def tier_holding(self, uri: str) -> list[str]:
        tiers = self.tiers
        return [t for t in CACHE_TIERS if t in tiers and uri in tiers[t].checkpoints]


class ClusterView:
    def __init__(self, ewma_alpha: float = 0.3) -> None:
        self.nodes: dict[str, NodeView] = {}
        self.holders: dict[str, dict[str, set[str]]] = {t: {} for t in CACHE_TIERS}
        self._free_heap: list[tuple[int, str, int]] = []  # (-available_bytes, node id, version)
        self._up: list[str] = []
        self._up_pos: dict[str, int] = {}
        self.ewma_alpha = ewma_alpha
        self.cluster_gbps: dict[str, float] = {}  # EWMA over every node's measurements, per tier
        self.cordoned: set[str] = set()  # kept for nodes that have not registered yet

    # -- updates ------------------------------------------------------------------------------

    def observe(self, status: NodeStatusView, now: float) -> NodeView:
        """Apply a heartbeat (or a registration): the node is up and its report is current."""
        node = self.nodes.get(status.id)
        if node is None:
            node = self.nodes[status.id] = NodeView(id=status.id, address=status.address,
                                                    cordoned=status.id in self.cordoned)
        self._unindex_holdings(node)
        for tier, view in status.tiers.items():
            previous = node.tiers.get(tier)
            if view.gbps > 0 and (previous is None or previous.gbps != view.gbps):
                self._observe_cluster_gbps(tier, view.gbps)
        if status.s3_gbps > 0 and status.s3_gbps != node.s3_gbps:
            self._observe_cluster_gbps("s3", status.s3_gbps)
        node.address = status.address
        node.state = "up"
        node.last_heartbeat = now
        node.free_bytes = status.free_bytes
        node.total_bytes = status.total_bytes
        node.tiers = {t: TierView(v.gbps, dict(v.checkpoints), v.capacity_bytes, v.used_bytes)
                      for t, v in status.tiers.items()}
        node.s3_gbps = status.s3_gbps
        node.instance_ids = frozenset(status.instance_ids)
        node.active_requests = status.active_requests
        node.queued_requests = status.queued_requests
        self._index_holdings(node)
        self._set_up(node.id, True)
        self._touch(node)
        return node

    def mark_down(self, node_id: str) -> NodeView | None:
        node = self.nodes.get(node_id)
        if node is None or not node.up:
            return None
        node.state = "down"
        node.pending.clear()
        self._unindex_holdings(node)
        self._set_up(node_id, False)
        node.version += 1
        return node

    def remove(self, node_id: str) -> None:
        node = self.nodes.pop(node_id, None)
        if node is not None:
            self._unindex_holdings(node)
            self._set_up(node_id, False)

    def set_cordoned(self, node_id: str, cordoned: bool) -> NodeView | None:
        """A cordoned node takes no new instances (its running ones are the caller's to move)."""
        (self.cordoned.add if cordoned else self.cordoned.discard)(node_id)
        node = self.nodes.get(node_id)
        if node is not None:
            node.cordoned = cordoned
            self._touch(node)
        return node

    def reserve(self, node_id: str, instance_id: str, nbytes: int, ready_by: float) -> None:
        """A load was placed on the node: hold its memory until a heartbeat reports the instance."""
        node = self.nodes[node_id]
        node.pending[instance_id] = PendingLoad(instance_id, nbytes, ready_by)
        self._touch(node)

    def finish(self, node_id: str, instance_id: str) -> None:
        """The load ended (ready or failed): its time no longer delays other loads on the node."""
        node = self.nodes.get(node_id)
        if node is not None and node.pending.pop(instance_id, None) is not None:
            self._touch(node)

    def release_memory(self, node_id: str, nbytes: int) -> None:
        """An instance went away: count its memory as free until the next heartbeat says."""
        node = self.nodes.get(node_id)
        if node is not None:
            node.free_bytes = min(node.total_bytes or node.free_bytes + nbytes, node.free_bytes + nbytes)
            self._touch(node)

    def add_holding(self, node_id: str, tier: str, uri: str, nbytes: int) -> None:
        """A load put the checkpoint in a tier (the next heartbeat will confirm it)."""
        node = self.nodes.get(node_id)
        if node is None:
            return
        node.tiers.setdefault(tier, TierView()).checkpoints[uri] = nbytes
        if node.up and tier in self.holders:
            self.holders[tier].setdefault(uri, set()).add(node_id)

    def observe_load(self, node_id: str, tier: str, nbytes: int, seconds: float) -> None:
        """A finished load's measured rate updates the node's bandwidth for that tier at once."""
        node = self.nodes.get(node_id)
        if node is None or nbytes <= 0 or seconds <= 0:
            return
        gbps = nbytes / seconds / 1e9
        if tier == "s3":
            node.s3_gbps = gbps if node.s3_gbps <= 0 else self._ewma(node.s3_gbps, gbps)
        else:
            view = node.tiers.setdefault(tier, TierView())
            view.gbps = gbps if view.gbps <= 0 else self._ewma(view.gbps, gbps)
        self._observe_cluster_gbps(tier, gbps)

    # -- health -------------------------------------------------------------------------------

    def stale(self, now: float, timeout_s: float) -> list[str]:
        """Up nodes whose last heartbeat is older than the timeout."""
        return [n.id for n in self.nodes.values() if n.up and now - n.last_heartbeat > timeout_s]

    # -- queries ------------------------------------------------------------------------------

    def up_nodes(self) -> list[str]:
        return list(self._up)

    def holders_of(self, uri: str, tier: str | None = None) -> set[str]:
        """Nodes whose cache holds the checkpoint, in one tier or in any."""
        if tier is not None:
            return self.holders[tier].get(uri, set())
        return set().union(*(self.holders[t].get(uri, set()) for t in CACHE_TIERS))

    def roomiest(self, limit: int) -> list[NodeView]:
        """Up to `limit` up, uncordoned nodes, most available memory first; O(limit · log n)."""
        taken: list[tuple[int, str, int]] = []
        nodes: list[NodeView] = []
        while self._free_heap and len(taken) < limit:
            entry = heapq.heappop(self._free_heap)
            node = self.nodes.get(entry[1])
            if node is None or not node.up or node.cordoned or node.version != entry[2]:
                continue  # stale entry: dropped for good
            taken.append(entry)
            nodes.append(node)
        for entry in taken:
            heapq.heappush(self._free_heap, entry)
        return nodes

    # -- internals ----------------------------------------------------------------------------

    def _ewma(self, old: float, new: float) -> float:
        return (1 - self.ewma_alpha) * old + self.ewma_alpha * new

    def _observe_cluster_gbps(self, tier: str, gbps: float) -> None:
        old = self.cluster_gbps.get(tier)
        self.cluster_gbps[tier] = gbps if old is None else self._ewma(old, gbps)

    def _touch(self, node: NodeView) -> None:
        node.version += 1
        if node.up and not node.cordoned:
            heapq.heappush(self._free_heap, (-node.available_bytes, node.id, node.version))
        if len(self._free_heap) > 4 * len(self.nodes) + 64:
            self._free_heap = [(-n.available_bytes, n.id, n.version) for n in self.nodes.values()
                               if n.up and not n.cordoned]
            heapq.heapify(self._free_heap)

    def _set_up(self, node_id: str, up: bool) -> None:
        pos = self._up_pos.get(node_id)
        if up and pos is None:
            self._up_pos[node_id] = len(self._up)
            self._up.append(node_id)
        elif not up and pos is not None:
            last = self._up.pop()
            del self._up_pos[node_id]
            if last != node_id:
                self._up[pos] = last
                self._up_pos[last] = pos

    def _index_holdings(self, node: NodeView) -> None:
        if not node.up:
            return
        for tier in CACHE_TIERS:
            for uri in node.tiers.get(tier, TierView()).checkpoints:
                self.holders[tier].setdefault(uri, set()).add(node.id)

    def _unindex_holdings(self, node: NodeView) -> None:
        for tier in CACHE_TIERS:
            index = self.holders[tier]
            for uri in node.tiers.get(tier, TierView()).checkpoints:
                holders = index.get(uri)
                if holders is not None:
                    holders.discard(node.id)
                    if not holders:
                        del index[uri]
