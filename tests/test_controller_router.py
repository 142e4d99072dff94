"""The controller's request path and instance lifecycle, with a fake worker client.

These are unit tests of the layer above the workers (router, autoscaler wiring, scheduler
wiring, node health, restart): the workers are a recording fake with gates, so each test
controls exactly when a load finishes or a token comes. The clock is a fake too, so keep-alive
and heartbeat timeouts are exercised without sleeping. Real workers are in test_e2e_*.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from controller_fakes import GB, Clock, FakeWorkers, close, make_controller, node_status, ready_instance, run, until

from ember.controller.app import Controller
from ember.controller.errors import QueueFull, Unavailable
from ember.controller.inference import Generation, Progress, Tokens
from ember.controller.models import DeploymentSpec, DeploymentUpdate
from ember.controller.worker_client import GenerateInput, WorkerCallError

def spec(checkpoint: Path, **fields) -> DeploymentSpec:
    return DeploymentSpec(name=fields.pop("name", "demo"), checkpoint=str(checkpoint), **fields)


async def invoke(ctl: Controller, name: str = "demo", progress: bool = False) -> tuple[list, Generation]:
    gen = Generation(ctl, name, GenerateInput(prompt="hi", max_tokens=3), progress=progress, keepalive_s=3600)
    await gen.admit()
    return [e async for e in gen.events()], gen


def test_first_request_cold_starts_one_instance_and_a_second_rides_along(demo_checkpoint: Path) -> None:
    async def body() -> None:
        workers = FakeWorkers()
        workers.hold_loads = True
        ctl = await make_controller(workers=workers)
        try:
            await ctl.node_report(node_status("n1"), register=True)
            await ctl.create_deployment(spec(demo_checkpoint))
            assert workers.loads == []  # min_instances 0: nothing runs before a request
            first = asyncio.create_task(invoke(ctl, progress=True))
            await until(lambda: len(workers.load_gates) == 1, "a load started")
            second = asyncio.create_task(invoke(ctl))
            await until(lambda: ctl.deployment_view("demo").queued == 2, "both queued")
            assert len(workers.loads) == 1  # the starting instance counts as capacity
            workers.release_loads()
            (events, gen), (events2, gen2) = await asyncio.gather(first, second)
            assert gen.cold_start and gen2.cold_start is False  # only the first ends the cold start
            kinds = [type(e) for e in events]
            assert Progress in kinds and kinds.index(Progress) < kinds.index(Tokens)
            assert "".join(e.text for e in events if isinstance(e, Tokens)) == "t0 t1 t2 "
            assert [e for e in events2 if isinstance(e, Tokens)][-1].finish_reason == "length"
            # Warm: dispatched at once to the same instance, nothing loaded.
            _, warm = await invoke(ctl)
            assert warm.instance == gen.instance and not warm.cold_start and len(workers.loads) == 1
            assert ctl.deployment_view("demo").in_flight == 0
        finally:
            await close(ctl)

    run(body)


def test_the_memory_an_instance_reported_is_what_later_placements_reserve(demo_checkpoint: Path) -> None:
    async def body() -> None:
        workers = FakeWorkers()
        workers.memory_bytes = 3 * GB
        ctl = await make_controller(workers=workers)
        try:
            await ctl.node_report(node_status("n1"), register=True)
            await ctl.create_deployment(spec(demo_checkpoint))
            state = ctl.router.get("demo")
            guess = ctl.scheduler.memory_needed(ctl.model_info(state))
            assert guess < GB  # the demo checkpoint times memory_factor
            await invoke(ctl)
            assert state.memory_bytes == 3 * GB
            assert ctl.scheduler.memory_needed(ctl.model_info(state)) == 3 * GB
        finally:
            await close(ctl)

    run(body)


def test_a_full_queue_refuses_with_a_retry_after(demo_checkpoint: Path) -> None:
    async def body() -> None:
        workers = FakeWorkers()
        workers.hold_loads = True
        ctl = await make_controller(workers=workers)
        try:
            await ctl.node_report(node_status("n1"), register=True)
            await ctl.create_deployment(spec(demo_checkpoint, queue_limit=2))
            waiting = [asyncio.create_task(invoke(ctl)) for _ in range(2)]
            await until(lambda: ctl.deployment_view("demo").queued == 2, "queue full")
            gen = Generation(ctl, "demo", GenerateInput(prompt="x"))
            with pytest.raises(QueueFull) as info:
                await gen.admit()
            assert info.value.status == 429 and int(info.value.headers["Retry-After"]) >= 1
            assert "queue of 'demo' is full" in info.value.message
            workers.release_loads()
            await asyncio.gather(*waiting)
        finally:
            await close(ctl)

    run(body)


def test_a_burst_starts_every_needed_instance_at_once_up_to_max(demo_checkpoint: Path) -> None:
    async def body() -> None:
        workers = FakeWorkers()
        workers.hold_loads = True
        ctl = await make_controller(workers=workers)
        try:
            await ctl.node_report(node_status("n1"), register=True)
            await ctl.node_report(node_status("n2"), register=True)
            await ctl.create_deployment(spec(demo_checkpoint, target_concurrency=1, max_instances=3))
            requests = [asyncio.create_task(invoke(ctl)) for _ in range(5)]
            await until(lambda: len(workers.load_gates) == 3, "three loads")
            assert len(workers.loads) == 3  # max_instances, before any instance is ready
            workers.release_loads()
            results = await asyncio.gather(*requests)
            assert len({gen.instance for _, gen in results}) == 3
        finally:
            await close(ctl)

    run(body)


def test_idle_instances_stop_after_keep_alive_and_min_instances_stay(demo_checkpoint: Path) -> None:
    async def body() -> None:
        clock = Clock()
        workers = FakeWorkers()
        ctl = await make_controller(workers=workers, clock=clock)
        try:
            await ctl.node_report(node_status("n1"), register=True)
            await ctl.create_deployment(spec(demo_checkpoint, keep_alive_s=60))
            _, gen = await invoke(ctl)
            state = ctl.router.get("demo")
            assert state.timer is not None  # one timer for the keep-alive, no polling
            clock.now += 59
            ctl.reconcile("demo")
            assert list(state.slots) == [gen.instance] and workers.unloads == []
            clock.now += 2
            ctl.reconcile("demo")  # what the timer does when it fires
            await until(lambda: not state.slots, "scaled to zero")
            assert workers.unloads == [gen.instance]
            assert ctl.deployment_view("demo").instances == {}
            assert [m["id"] for m in [i.model_dump() for i in ctl.list_instances()]] == []

            await ctl.update_deployment("demo", DeploymentUpdate(min_instances=1))
            await until(lambda: state.counts().get("ready") == 1, "min_instances started")
            clock.now += 10_000
            ctl.reconcile("demo")
            assert state.counts().get("ready") == 1
        finally:
            await close(ctl)

    run(body)


def test_cancelled_requests_leave_the_queue_and_cancel_the_worker_stream(demo_checkpoint: Path) -> None:
    async def body() -> None:
        workers = FakeWorkers()
        workers.hold_loads = True
        ctl = await make_controller(workers=workers)
        try:
            await ctl.node_report(node_status("n1"), register=True)
            await ctl.create_deployment(spec(demo_checkpoint))
            queued = asyncio.create_task(invoke(ctl, progress=True))
            await until(lambda: ctl.deployment_view("demo").queued == 1, "queued")
            queued.cancel()
            await asyncio.gather(queued, return_exceptions=True)
            assert ctl.deployment_view("demo").queued == 0
            workers.release_loads()
            state = ctl.router.get("demo")
            await until(lambda: state.counts().get("ready") == 1, "instance ready anyway")

            workers.hold_generation = asyncio.Event()
            streaming = asyncio.create_task(invoke(ctl))
            await until(lambda: workers.generating == 1, "generating")
            assert ctl.deployment_view("demo").in_flight == 1
            streaming.cancel()
            await asyncio.gather(streaming, return_exceptions=True)
            await until(lambda: workers.cancelled == 1, "worker stream cancelled")
            assert ctl.deployment_view("demo").in_flight == 0
            assert workers.generating == 0
        finally:
            await close(ctl)

    run(body)


def test_a_silent_node_goes_down_and_its_instances_and_requests_move(demo_checkpoint: Path) -> None:
    async def body() -> None:
        clock = Clock()
        workers = FakeWorkers()
        ctl = await make_controller(workers=workers, clock=clock, node_timeout_s=10)
        try:
            uri = str(demo_checkpoint.resolve())
            await ctl.node_report(node_status("n1", disk={uri: 1}), register=True)
            await ctl.node_report(node_status("n2", free_gb=4), register=True)
            await ctl.create_deployment(spec(demo_checkpoint))
            _, gen = await invoke(ctl)
            assert gen.node == "n1"
            await ctl.node_report(node_status("n1", instances=[ready_instance(gen.instance)], disk={uri: 1}), False)
            clock.now += 8
            await ctl.node_report(node_status("n2", free_gb=4), register=False)
            assert await ctl.check_nodes() == []
            clock.now += 3  # n1 silent for 11 s, n2 for 3 s
            assert await ctl.check_nodes() == ["n1"]
            assert [n.state for n in ctl.list_nodes()] == ["down", "up"]
            assert ctl.list_instances() == []
            _, moved = await invoke(ctl)
            assert moved.node == "n2" and moved.cold_start
            # A heartbeat from the node brings it back.
            assert await ctl.node_report(node_status("n1"), register=False) is True
            assert [n.state for n in ctl.list_nodes()] == ["up", "up"]
        finally:
            await close(ctl)

    run(body)


def test_load_failures_move_to_another_node_or_fail_the_queue_with_the_reason(demo_checkpoint: Path) -> None:
    async def body() -> None:
        workers = FakeWorkers()
        ctl = await make_controller(workers=workers)
        try:
            uri = str(demo_checkpoint.resolve())
            await ctl.node_report(node_status("n1", disk={uri: 1}), register=True)
            await ctl.node_report(node_status("n2"), register=True)
            await ctl.create_deployment(spec(demo_checkpoint))
            workers.load_errors["n1"] = WorkerCallError("n1", "RESOURCE_EXHAUSTED", "needs 2 GB, 1 GB free")
            _, gen = await invoke(ctl)
            assert [n for n, _ in workers.loads] == ["n1", "n2"] and gen.node == "n2"

            await ctl.create_deployment(spec(demo_checkpoint, name="broken"))
            workers.load_errors["n2"] = WorkerCallError("n2", "NOT_FOUND", "checkpoint directory is gone")
            workers.load_errors["n1"] = WorkerCallError("n1", "NOT_FOUND", "checkpoint directory is gone")
            with pytest.raises(Unavailable, match="checkpoint directory is gone"):
                await invoke(ctl, "broken")
            assert "NOT_FOUND" in (ctl.deployment_view("broken").last_error or "")
        finally:
            await close(ctl)

    run(body)


def test_an_instance_failing_before_its_first_token_is_retried_elsewhere(demo_checkpoint: Path) -> None:
    async def body() -> None:
        workers = FakeWorkers()
        ctl = await make_controller(workers=workers)
        try:
            await ctl.node_report(node_status("n1"), register=True)
            await ctl.create_deployment(spec(demo_checkpoint))
            _, first = await invoke(ctl)
            workers.generate_errors[first.instance] = WorkerCallError("n1", "UNAVAILABLE", "connection refused")
            events, retried = await invoke(ctl)
            # The failed instance is dropped (a heartbeat re-adopts it if it still exists) and the
            # request, which had received nothing yet, runs on a new one.
            assert retried.instance != first.instance
            assert first.instance not in ctl.router.get("demo").slots
            assert "".join(e.text for e in events if isinstance(e, Tokens)) == "t0 t1 t2 "
        finally:
            await close(ctl)

    run(body)


def test_a_restarted_controller_rebuilds_from_the_store_and_heartbeats(demo_checkpoint: Path, tmp_path: Path) -> None:
    async def body() -> None:
        state = f"sqlite:///{tmp_path / 'state.db'}"
        first_workers = FakeWorkers()
        ctl = await make_controller(state, workers=first_workers)
        await ctl.node_report(node_status("n1"), register=True)
        await ctl.create_deployment(spec(demo_checkpoint, keep_alive_s=600))
        _, gen = await invoke(ctl)
        await close(ctl)  # a crash or an upgrade: the worker keeps its instance

        workers = FakeWorkers()
        ctl = await make_controller(state, workers=workers)
        try:
            assert [d.name for d in ctl.list_deployments()] == ["demo"]
            assert [(i.id, i.state) for i in ctl.list_instances()] == [(gen.instance, "loading")]
            assert await ctl.node_report(node_status("n1", instances=[ready_instance(gen.instance)]), False)
            assert [(i.id, i.state) for i in ctl.list_instances()] == [(gen.instance, "ready")]
            _, warm = await invoke(ctl)
            assert warm.instance == gen.instance and workers.loads == []
            # An instance of a deployment nobody knows is unloaded; a known one unknown to the store adopted.
            await ctl.node_report(node_status("n1", instances=[ready_instance(gen.instance),
                                                               ready_instance("stray", "nobody"),
                                                               ready_instance("demo-extra")]), False)
            await until(lambda: workers.unloads == ["stray"], "orphan unloaded")
            assert sorted(i.id for i in ctl.list_instances()) == sorted([gen.instance, "demo-extra"])
        finally:
            await close(ctl)

    run(body)


def test_deleting_a_deployment_unloads_it_and_answers_its_queue(demo_checkpoint: Path) -> None:
    async def body() -> None:
        workers = FakeWorkers()
        workers.hold_loads = True
        ctl = await make_controller(workers=workers)
        try:
            await ctl.node_report(node_status("n1"), register=True)
            await ctl.create_deployment(spec(demo_checkpoint))
            waiting = asyncio.create_task(invoke(ctl))
            await until(lambda: ctl.deployment_view("demo").queued == 1, "queued")
            await ctl.delete_deployment("demo")
            with pytest.raises(Exception, match="deleted"):
                await waiting
            assert ctl.list_deployments() == [] and await ctl.store.get_deployment("demo") is None
        finally:
            await close(ctl)

    run(body)


def test_the_deployments_file_is_applied_idempotently(demo_checkpoint: Path, tmp_path: Path) -> None:
    path = tmp_path / "deployments.yaml"
    path.write_text(f"- name: alpha\n  checkpoint: {demo_checkpoint}\n  max_instances: 2\n"
                    f"- name: beta\n  checkpoint: {demo_checkpoint}\n")
    state = f"sqlite:///{tmp_path / 'state.db'}"

    async def body() -> None:
        ctl = await make_controller(state, deployments_file=path)
        created = {d.name: d.created_at for d in ctl.list_deployments()}
        assert sorted(created) == ["alpha", "beta"] and ctl.deployment_view("alpha").max_instances == 2
        await close(ctl)
        path.write_text(f"deployments:\n- name: alpha\n  checkpoint: {demo_checkpoint}\n  max_instances: 3\n"
                        f"- name: beta\n  checkpoint: {demo_checkpoint}\n")
        ctl = await make_controller(state, deployments_file=path)
        try:
            assert ctl.deployment_view("alpha").max_instances == 3
            assert ctl.deployment_view("beta").created_at == created["beta"]  # untouched
        finally:
            await close(ctl)

    run(body)


def test_a_broken_checkpoint_with_min_instances_backs_off_instead_of_looping(demo_checkpoint: Path) -> None:
    async def body() -> None:
        clock = Clock()
        workers = FakeWorkers()
        workers.load_errors["n1"] = WorkerCallError("n1", "NOT_FOUND", "checkpoint directory is gone")
        ctl = await make_controller(workers=workers, clock=clock)
        try:
            await ctl.node_report(node_status("n1"), register=True)
            await ctl.create_deployment(spec(demo_checkpoint, min_instances=1))
            await until(lambda: len(workers.loads) == 1 and not ctl.router.get("demo").slots, "first attempt failed")
            for _ in range(50):
                await asyncio.sleep(0)
            assert len(workers.loads) == 1
            assert ctl.router.get("demo").timer is not None  # the retry is a timer, not a loop
            clock.now += 31
            ctl.reconcile("demo")
            await until(lambda: len(workers.loads) == 2, "retried after the back-off")
        finally:
            await close(ctl)

    run(body)


def test_a_cordoned_node_is_drained_without_dropping_requests(demo_checkpoint: Path) -> None:
    async def body() -> None:
        workers = FakeWorkers()
        ctl = await make_controller(workers=workers)
        try:
            await ctl.node_report(node_status("n1", free_gb=20), register=True)
            await ctl.node_report(node_status("n2", free_gb=10), register=True)
            await ctl.create_deployment(spec(demo_checkpoint, keep_alive_s=600))
            _, first = await invoke(ctl)
            assert first.node == "n1"
            workers.hold_generation = asyncio.Event()
            running = asyncio.create_task(invoke(ctl))
            await until(lambda: workers.generating == 1, "a request in flight on n1")

            ctl.cordon("n1")  # what the Kubernetes node watcher calls on `kubectl cordon`
            assert {n.id: n.state for n in ctl.list_nodes()} == {"n1": "draining", "n2": "up"}
            state = ctl.router.get("demo")
            await until(lambda: state.counts().get("ready") == 1 and len(workers.loads) == 2, "replacement ready")
            assert workers.loads[-1][0] == "n2" and workers.unloads == []  # n1 still finishes its request
            slot = state.free_slot()
            assert slot is not None and slot.node == "n2"  # new requests go to the replacement
            workers.hold_generation.set()
            events, _ = await running
            assert events[-1].finish_reason == "length"  # the in-flight request was not dropped
            _, moved = await invoke(ctl)
            assert moved.node == "n2"
            await until(lambda: workers.unloads == [first.instance], "the old instance unloaded")

            ctl.uncordon("n1")
            assert {n.id: n.state for n in ctl.list_nodes()} == {"n1": "up", "n2": "up"}
        finally:
            await close(ctl)

    run(body)
