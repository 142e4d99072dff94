"""The autoscaler as pure decision logic: loads and `now` in, instances to start and stop out."""

from __future__ import annotations

from ember.controller.autoscaler import Autoscaler, DeploymentLoad, InstanceLoad


def load(queued: int = 0, instances: list[InstanceLoad] | None = None, **fields) -> DeploymentLoad:
    settings = {"min_instances": 0, "max_instances": 4, "target_concurrency": 8, "keep_alive_s": 60.0} | fields
    return DeploymentLoad(name="demo", queued=queued, instances=instances or [], **settings)


def ready(instance_id: str, in_flight: int = 0, idle_since: float | None = None) -> InstanceLoad:
    return InstanceLoad(instance_id, "ready", in_flight, idle_since if in_flight == 0 else None)


def test_the_first_request_starts_one_instance_and_a_second_waits_for_it() -> None:
    scaler = Autoscaler()
    assert scaler.decide(load(queued=1), now=0).start == 1
    starting = [InstanceLoad("i-1", "loading")]
    assert scaler.decide(load(queued=2, instances=starting), now=1).start == 0


def test_a_burst_starts_every_instance_it_needs_in_one_decision_up_to_max() -> None:
    scaler = Autoscaler()
    assert scaler.decide(load(queued=40, max_instances=10), now=0).start == 5
    decision = scaler.decide(load(queued=40, max_instances=4), now=0)
    assert (decision.desired, decision.start) == (4, 4)
    # Concurrency above target on the ready instances scales out too.
    busy = [ready("i-1", in_flight=8), ready("i-2", in_flight=8)]
    assert scaler.decide(load(queued=9, instances=busy), now=0).start == 2


def test_min_instances_are_kept_without_any_demand() -> None:
    decision = Autoscaler().decide(load(min_instances=2), now=0)
    assert decision.start == 2
    decision = Autoscaler().decide(load(min_instances=1, instances=[ready("i-1", idle_since=0)]), now=1e6)
    assert decision.stop == () and decision.start == 0


def test_idle_instances_go_after_keep_alive_down_to_zero() -> None:
    scaler = Autoscaler()
    instances = [ready("i-1", idle_since=100.0)]
    early = scaler.decide(load(instances=instances, keep_alive_s=60), now=130.0)
    assert early.stop == () and early.next_check_at == 160.0  # one timer, not a polling loop
    late = scaler.decide(load(instances=instances, keep_alive_s=60), now=160.0)
    assert late.stop == ("i-1",) and late.next_check_at is None


def test_busy_and_starting_instances_are_never_stopped() -> None:
    scaler = Autoscaler()
    instances = [ready("i-busy", in_flight=1), InstanceLoad("i-loading", "loading"), ready("i-idle", idle_since=0)]
    decision = scaler.decide(load(instances=instances, keep_alive_s=10), now=1000.0)
    assert decision.stop == ("i-idle",)


def test_scale_in_keeps_enough_capacity_for_the_demand_oldest_idle_first() -> None:
    scaler = Autoscaler()
    instances = [
        ready("i-1", in_flight=8),
        ready("i-2", idle_since=50.0),
        ready("i-3", idle_since=10.0),
        ready("i-4", idle_since=20.0),
    ]
    # Demand 9 needs 2 instances: of the three idle ones, two go, oldest idle first.
    decision = scaler.decide(load(queued=1, instances=instances, keep_alive_s=5), now=100.0)
    assert decision.desired == 2 and decision.stop == ("i-3", "i-4")


def test_a_load_that_dips_and_returns_within_keep_alive_does_not_thrash() -> None:
    scaler = Autoscaler()
    instances = [ready("i-1", in_flight=8), ready("i-2", in_flight=8)]
    assert scaler.decide(load(instances=instances, keep_alive_s=30), now=0).start == 0
    # The load halves for a few seconds: the second instance idles but stays (keep-alive) ...
    instances = [ready("i-1", in_flight=8), ready("i-2", idle_since=1.0)]
    for now in (2.0, 10.0, 25.0):
        decision = scaler.decide(load(instances=instances, keep_alive_s=30), now=now)
        assert decision.start == 0 and decision.stop == ()
    # ... and serves the load when it comes back, with no new cold start.
    instances = [ready("i-1", in_flight=8), ready("i-2", in_flight=8)]
    assert scaler.decide(load(queued=0, instances=instances, keep_alive_s=30), now=26.0).start == 0
