"""The controller's migration logic on its own: stream switching, leases, and the scheduler's trigger.

Unit tests of the layer above the workers (the rule for fakes): the worker client is a fake that
behaves like the real MigrateOut / Generate(resume_id) protocol — a moved stream ends with a
"migrated" chunk naming where it goes on, and the destination continues after the last token
sent. Real-process coverage is in test_migration_worker.py and test_migration_e2e.py.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from controller_fakes import GB, FakeWorkers, close, make_controller, node_status, run, until

from ember.api import worker_pb2 as pb
from ember.controller.config import SchedulerConfig
from ember.controller.inference import Generation, Tokens
from ember.controller.models import DeploymentSpec
from ember.controller.worker_client import GenerateInput


class MigratingWorkers(FakeWorkers):
    """Streams token i as [i]; MigrateOut hands every running stream of an instance over."""

    def __init__(self, total: int = 40) -> None:
        super().__init__()
        self.total = total
        self.running: dict[str, list[dict]] = {}  # instance id -> live streams
        self.parked: dict[str, int] = {}  # resume id -> next token index
        self.inputs: list[tuple[str, GenerateInput]] = []
        self.gate = asyncio.Event()  # streams pause after their first tokens until it is set

    async def generate(self, node, address, instance_id, inp, timeout_s=None):
        self.inputs.append((instance_id, inp))
        if inp.resume_id:
            start = self.parked.pop(inp.resume_id)
        elif inp.continue_token_ids is not None:
            start = len(inp.continue_token_ids)
        else:
            start = 0
        stream = {"handover": None}
        self.running.setdefault(instance_id, []).append(stream)
        try:
            for i in range(start, self.total):
                if i >= 5:
                    await self.gate.wait()
                await asyncio.sleep(0)
                if stream["handover"] is not None:
                    handover, moved = stream["handover"]
                    self.parked[handover.resume_id] = i
                    moved.set()
                    yield pb.GenerateChunk(finish_reason="migrated", handover=handover, prompt_tokens=2,
                                           completion_tokens=i)
                    return
                last = i == self.total - 1
                yield pb.GenerateChunk(text=f"t{i} ", token_ids=[i], prompt_tokens=2, completion_tokens=i + 1,
                                       finish_reason="length" if last else "")
        finally:
            self.running[instance_id].remove(stream)

    async def migrate_out(self, node, address, request, timeout_s=None):
        streams = list(self.running.get(request.instance_id, []))
        for stream in streams:
            handover = pb.Handover(address=request.destination_address, instance_id=request.destination_instance_id,
                                   resume_id=uuid.uuid4().hex, node_id=request.destination_node_id,
                                   mode=pb.MIGRATION_MODE_KV)
            moved = asyncio.Event()
            stream["handover"] = (handover, moved)
            self.gate.set()
            await moved.wait()
            yield pb.MigrateOutEvent(request_id="r", phase=pb.MIGRATION_PHASE_HANDED_OVER, mode=pb.MIGRATION_MODE_KV,
                                     bytes=1000, stop_s=0.01, handover=handover)


async def collect(gen: Generation) -> list[Tokens]:
    await gen.admit()
    return [e async for e in gen.events() if isinstance(e, Tokens)]


def status(node_id: str, *, free_gb: float, dram: tuple[str, ...] = (), instances=()) -> pb.NodeStatus:
    s = node_status(node_id, free_gb=free_gb, instances=instances)
    s.tiers["dram"].checkpoints.extend(pb.CachedCheckpoint(uri=u, bytes=4 * GB) for u in dram)
    s.migration_net_gbps = 1.0
    return s


def test_an_operator_migration_moves_the_stream_and_its_lease(demo_checkpoint: Path) -> None:
    async def body() -> None:
        workers = MigratingWorkers()
        ctl = await make_controller(workers=workers)
        try:
            await ctl.node_report(status("n1", free_gb=20), register=True)
            await ctl.node_report(status("n2", free_gb=10), register=True)
            await ctl.create_deployment(DeploymentSpec(name="demo", checkpoint=str(demo_checkpoint), keep_alive_s=600))
            gen = Generation(ctl, "demo", GenerateInput(prompt="hi", request_id="req-1"))
            running = asyncio.create_task(collect(gen))
            await until(lambda: gen.lease is not None and len(gen.delivered_ids) == 5, "five tokens on n1")
            source = gen.lease.slot
            assert source.node == "n1"

            record = ctl.migrations.migrate(source.id, node="n2", mode="kv")
            tokens = await running
            assert [t for e in tokens for t in e.token_ids] == list(range(workers.total))
            assert "".join(e.text for e in tokens) == "".join(f"t{i} " for i in range(workers.total))
            assert all(e.finish_reason != "migrated" for e in tokens)
            assert gen.node == "n2" and gen.instance == record.destination_instance
            (attach,) = [inp for iid, inp in workers.inputs if inp.resume_id]
            assert attach.request_id == "req-1"
            done = await ctl.migrations.wait(record.id)
            assert done.state == "done" and done.requests == {"handed_over": 1} and done.modes == {"kv": 1}
            await until(lambda: source.id in workers.unloads, "the source unloaded once its stream moved")
            destination = ctl.router.get("demo").slots[record.destination_instance]
            assert destination.in_flight == 0 and source.in_flight == 0
            assert 'ember_controller_migration_stream_pause_seconds_count{mode="kv"} 1.0' in ctl.metrics.render().decode()
        finally:
            await close(ctl)

    run(body)


def test_a_failed_source_restarts_from_the_delivered_tokens(demo_checkpoint: Path) -> None:
    async def body() -> None:
        from ember.controller.worker_client import WorkerCallError

        class Failing(MigratingWorkers):
            async def generate(self, node, address, instance_id, inp, timeout_s=None):
                async for chunk in super().generate(node, address, instance_id, inp, timeout_s):
                    yield chunk
                    if node == "n1" and chunk.token_ids == [4]:
                        raise WorkerCallError(node, "UNAVAILABLE", "connection reset")

        workers = Failing()
        workers.gate.set()
        ctl = await make_controller(workers=workers)
        try:
            await ctl.node_report(status("n1", free_gb=20), register=True)
            await ctl.create_deployment(DeploymentSpec(name="demo", checkpoint=str(demo_checkpoint), keep_alive_s=600))
            await ctl.node_report(status("n2", free_gb=10), register=True)
            gen = Generation(ctl, "demo", GenerateInput(prompt="hi", request_id="req-2"))
            tokens = await collect(gen)
            assert [t for e in tokens for t in e.token_ids] == list(range(workers.total))
            assert "".join(e.text for e in tokens) == "".join(f"t{i} " for i in range(workers.total))
            (first, restart) = [(iid, inp) for iid, inp in workers.inputs]
            assert restart[1].continue_token_ids == [0, 1, 2, 3, 4] and restart[1].continue_text == "t0 t1 t2 t3 t4 "
            assert restart[1].request_id == "req-2" and restart[0] != first[0]  # a fresh instance took over
            assert 'ember_controller_migration_stream_pause_seconds_count{mode="restart"} 1.0' in \
                ctl.metrics.render().decode()
        finally:
            await close(ctl)

    run(body)


async def full_holder_scenario(workers: MigratingWorkers, checkpoint: Path, big_checkpoint: Path,
                               min_gain_s: float):
    """n1 holds `big` in DRAM but is full with `other` (one request streaming); n2 has room but would
    read `big` from a slow disk (it holds `other` in DRAM). Freeing n1 saves about 78 s (4 GB at
    0.05 GB/s against 8 GB/s). Returns the controller, the running `other` stream and `big`'s request."""
    ctl = await make_controller(
        workers=workers, scheduler=SchedulerConfig(default_gbps={"dram": 8.0, "disk": 0.05, "s3": 0.01}),
        migration_min_gain_s=min_gain_s)
    assert ctl.migrations.planner.config.min_gain_s == min_gain_s  # the flag reaches the planner
    await ctl.node_report(status("n1", free_gb=20), register=True)
    await ctl.create_deployment(DeploymentSpec(name="other", checkpoint=str(checkpoint), keep_alive_s=600))
    await ctl.create_deployment(DeploymentSpec(name="big", checkpoint=str(big_checkpoint), keep_alive_s=600))
    for name in ("other", "big"):  # big models: the disk read on n2 is what n1's DRAM saves
        state = ctl.router.get(name)
        state.record = state.record.model_copy(update={"checkpoint_bytes": 4 * GB})
    gen = Generation(ctl, "other", GenerateInput(prompt="hi", request_id="req-3"))
    running = asyncio.create_task(collect(gen))
    await until(lambda: gen.lease is not None and len(gen.delivered_ids) == 5, "other streaming on n1")
    other = gen.lease.slot
    big_uri = ctl.router.get("big").record.checkpoint
    costs = pb.InstanceStatus(id=other.id, deployment="other", state=pb.INSTANCE_STATE_READY,
                              kv_bytes_per_token=512, recompute_s_per_token=1e-4, recompute_overhead_s=0.01)
    other_uri = ctl.router.get("other").record.checkpoint
    await ctl.node_report(status("n1", free_gb=0, dram=(big_uri,), instances=[costs]), register=False)
    await ctl.node_report(status("n2", free_gb=10, dram=(other_uri,)), register=True)

    big = Generation(ctl, "big", GenerateInput(prompt="hello", request_id="req-4"))
    big_run = asyncio.create_task(collect(big))
    return ctl, gen, other, running, big, big_run


def test_the_scheduler_frees_a_full_node_that_holds_the_model(demo_checkpoint: Path, tmp_path: Path) -> None:
    """The planner moves `other` (and its stream) to n2 and starts `big` on n1."""
    import shutil

    big_checkpoint = tmp_path / "big.ember"
    shutil.copytree(demo_checkpoint, big_checkpoint)

    async def body() -> None:
        workers = MigratingWorkers()
        ctl, gen, other, running, big, big_run = await full_holder_scenario(workers, demo_checkpoint, big_checkpoint,
                                                                            min_gain_s=0.0)
        try:
            await until(lambda: any(m.reason == "scheduler" for m in ctl.migrations.records.values()),
                        "a scheduler-triggered migration")
            tokens = await running
            assert [t for e in tokens for t in e.token_ids] == list(range(workers.total))  # nothing lost
            assert gen.node == "n2"
            big_tokens = await big_run
            assert [t for e in big_tokens for t in e.token_ids] == list(range(workers.total))
            assert big.node == "n1", "big must start where its checkpoint is in DRAM"
            loads = [(node, iid.split("-")[0]) for node, iid in workers.loads]
            assert loads == [("n1", "other"), ("n2", "other"), ("n1", "big")]
            assert other.id in workers.unloads
            assert not ctl.migrations.planned and all(not s.id.startswith("big-planned")
                                                       for s in ctl.router.get("big").slots.values())
        finally:
            await close(ctl)

    run(body)


def test_a_plan_that_saves_less_than_the_min_gain_is_not_taken(demo_checkpoint: Path, tmp_path: Path) -> None:
    """The same cluster with --migration-min-gain above the ~78 s a plan would save: nothing moves,
    `big` starts on n2 and `other` finishes where it runs."""
    import shutil

    big_checkpoint = tmp_path / "big.ember"
    shutil.copytree(demo_checkpoint, big_checkpoint)

    async def body() -> None:
        workers = MigratingWorkers()
        ctl, gen, other, running, big, big_run = await full_holder_scenario(workers, demo_checkpoint, big_checkpoint,
                                                                            min_gain_s=120.0)
        try:
            await until(lambda: big.lease is not None, "big placed while other streams on n1")
            assert big.lease.slot.node == "n2" and not ctl.migrations.planned
            workers.gate.set()
            big_tokens = await big_run
            assert [t for e in big_tokens for t in e.token_ids] == list(range(workers.total))
            assert big.node == "n2"
            tokens = await running
            assert [t for e in tokens for t in e.token_ids] == list(range(workers.total))
            assert gen.node == "n1" and not ctl.migrations.records and not ctl.migrations.planned
            loads = [(node, iid.split("-")[0]) for node, iid in workers.loads]
            assert loads == [("n1", "other"), ("n2", "big")]
        finally:
            await close(ctl)

    run(body)
