"""The migration planner as pure decision logic: a cluster view and running instances in, a plan out."""

from __future__ import annotations

import pytest

from ember.controller.config import SchedulerConfig
from ember.controller.migration_planner import MigrationConfig, MigrationPlanner, RequestProgress, RunningInstance
from ember.controller.nodes import ClusterView, NodeStatusView, TierView
from ember.controller.scheduler import ModelInfo, Scheduler
from ember.migration.cost_model import MigrationCostModel

GB = 10**9
BIG = ModelInfo(uri="s3://m/big", size_bytes=40 * GB, init_s=1.0)  # needs 48 GB
SMALL = ModelInfo(uri="s3://m/small", size_bytes=10 * GB, init_s=1.0)  # needs 12 GB
COST = MigrationCostModel(recompute_s_per_token=1e-3, recompute_overhead_s=0.0, net_gbps=10.0, kv_overhead_s=0.1)


def node(node_id: str, free_gb: float, dram: tuple[ModelInfo, ...] = (), disk: tuple[ModelInfo, ...] = (),
         instances: tuple[str, ...] = ()) -> NodeStatusView:
    return NodeStatusView(
        id=node_id, address=f"{node_id}:1", free_bytes=int(free_gb * GB), total_bytes=80 * GB,
        tiers={"dram": TierView(10.0, {m.uri: m.size_bytes for m in dram}),
               "disk": TierView(2.0, {m.uri: m.size_bytes for m in disk})},
        s3_gbps=0.5, instance_ids=frozenset(instances),
    )


def setup(*statuses: NodeStatusView, min_gain_s: float = 1.0) -> tuple[ClusterView, Scheduler, MigrationPlanner]:
    cluster = ClusterView()
    for status in statuses:
        cluster.observe(status, now=0.0)
    scheduler = Scheduler(SchedulerConfig(default_gbps={"dram": 10.0, "disk": 2.0, "s3": 0.5}))
    return cluster, scheduler, MigrationPlanner(scheduler, MigrationConfig(min_gain_s=min_gain_s))


def victim(instance_id: str, node_id: str, *requests: RequestProgress, model: ModelInfo = SMALL) -> RunningInstance:
    return RunningInstance(instance_id, node_id, model, 20 * GB, COST, tuple(requests))


def test_an_idle_instance_makes_room_at_once_for_a_model_in_dram() -> None:
    cluster, scheduler, planner = setup(node("full", 40, dram=(BIG,), instances=("x",)),
                                        node("spare", 70, dram=(SMALL,)))
    alternative = scheduler.place(cluster, BIG, now=0.0)
    assert alternative is not None and alternative.node_id == "spare"
    assert alternative.estimate.total_s == pytest.approx(40 / 0.5 + 1)  # from S3

    plan = planner.plan(cluster, BIG, 0.0, lambda n: [victim("x", "full")] if n == "full" else [], alternative)
    assert plan is not None and plan.node_id == "full"
    (move,) = plan.moves
    assert (move.instance_id, move.destination.node_id, move.method) == ("x", "spare", "none")
    assert plan.free_after_s == 0.0
    assert plan.total_s == pytest.approx(40 / 10 + 1)  # from the full node's DRAM
    assert plan.alternative_s == pytest.approx(81.0)


def test_busy_instances_free_their_memory_after_their_replacement_loads_and_requests_move() -> None:
    cluster, scheduler, planner = setup(node("full", 40, dram=(BIG,), instances=("x",)),
                                        node("spare", 70, dram=(SMALL,)))
    request = RequestProgress(tokens_in=800, tokens_out=200, kv_bytes=GB)  # recompute 1.0 s, KV 0.2 s
    plan = planner.plan(cluster, BIG, 0.0, lambda n: [victim("x", "full", request)], scheduler.place(cluster, BIG, 0.0))
    assert plan is not None
    (move,) = plan.moves
    assert move.method == "kv" and move.migration_s == pytest.approx(0.2)
    replacement = 10 / 10 + 1  # the small model from the spare node's DRAM
    assert move.free_after_s == pytest.approx(replacement + 0.2)
    assert plan.total_s == pytest.approx(replacement + 0.2 + 40 / 10 + 1)


def test_no_plan_when_the_gain_is_below_the_threshold() -> None:
    statuses = (node("full", 40, dram=(BIG,), instances=("x",)), node("spare", 70, dram=(SMALL,), disk=(BIG,)))
    request = RequestProgress(800, 200, GB)
    cluster, scheduler, planner = setup(*statuses, min_gain_s=15.0)
    alternative = scheduler.place(cluster, BIG, 0.0)
    assert alternative is not None and alternative.estimate.total_s == pytest.approx(40 / 2 + 1)  # spare's disk
    assert planner.plan(cluster, BIG, 0.0, lambda n: [victim("x", "full", request)], alternative) is None
    cluster, scheduler, planner = setup(*statuses, min_gain_s=1.0)
    assert planner.plan(cluster, BIG, 0.0, lambda n: [victim("x", "full", request)], alternative) is not None


def test_no_plan_when_the_instances_have_nowhere_to_go_or_are_not_movable() -> None:
    cluster, scheduler, planner = setup(node("full", 40, dram=(BIG,), instances=("x",)), node("tiny", 5))
    assert scheduler.place(cluster, BIG, 0.0) is None
    assert planner.plan(cluster, BIG, 0.0, lambda n: [victim("x", "full")], None) is None
    # With room for the small model somewhere, the move makes a plan even when no node fits the big one.
    cluster, scheduler, planner = setup(node("full", 40, dram=(BIG,), instances=("x",)), node("some", 15))
    plan = planner.plan(cluster, BIG, 0.0, lambda n: [victim("x", "full")], None)
    assert plan is not None and plan.alternative_s is None
    # An instance of the model itself, or one on another node, is never a candidate.
    same = victim("x", "full", model=BIG)
    elsewhere = victim("y", "some")
    assert planner.plan(cluster, BIG, 0.0, lambda n: [same, elsewhere], None) is None


def test_moves_do_not_share_a_destination_that_has_room_for_one() -> None:
    statuses = [node("full", 8, dram=(BIG,), instances=("x1", "x2")), node("spare1", 25, dram=(SMALL,))]
    victims = [victim("x1", "full"), victim("x2", "full")]
    cluster, scheduler, planner = setup(*statuses)
    # 48 GB needed, 8 free: both must go, and spare1 (25 GB) can take only one of two 20 GB instances.
    assert planner.plan(cluster, BIG, 0.0, lambda n: victims, None) is None
    cluster, scheduler, planner = setup(*statuses, node("spare2", 25))
    plan = planner.plan(cluster, BIG, 0.0, lambda n: victims, None)
    assert plan is not None
    assert sorted(m.destination.node_id for m in plan.moves) == ["spare1", "spare2"]


def test_the_fastest_full_holder_is_the_target() -> None:
    cluster, scheduler, planner = setup(
        node("disk-full", 0, disk=(BIG,), instances=("a",)), node("dram-full", 0, dram=(BIG,), instances=("b",)),
        node("spare", 70),
    )
    instances = {"disk-full": [victim("a", "disk-full")], "dram-full": [victim("b", "dram-full")]}
    # Moving one 20 GB instance is not enough (48 GB needed): give each node enough to move.
    for name in instances:
        instances[name] = [RunningInstance(f"{name}-{i}", name, SMALL, 20 * GB, COST) for i in range(3)]
    cluster.observe(node("spare2", 70), now=0.0)
    plan = planner.plan(cluster, BIG, 0.0, lambda n: instances[n], scheduler.place(cluster, BIG, 0.0))
    assert plan is not None and plan.node_id == "dram-full" and plan.examined == 2
    assert len(plan.moves) == 3
