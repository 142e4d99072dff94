"""The scheduler, not an operator, live-migrates a running instance to make room (real processes).

A real `ember controller --migration-min-gain 0` and two real `ember worker` processes whose memory
budget (EMBER_WORKER_MEMORY_GB) fits exactly one instance of the tiny model. Model A is its
local checkpoint, model B the same files in an S3 bucket (another URI: another model to the
scheduler).

- n1 fetched model B from S3 once and keeps it in its disk cache; it now runs an instance of
  model A with a greedy stream in flight: n1 is full;
- n2 is empty, but it would have to fetch B from S3.

S3 sits behind a proxy that delays every read of weights (a far-away bucket): n1 measured that
when it fetched B, so the scheduler honestly expects B to take seconds to start on n2 and
milliseconds from n1's cache. Nothing else is slow about a 0.5 MB model, so the plan "start A
on n2, move its stream there, then start B on n1" wins by the S3 delay minus A's measured start
on n2. The controller runs with `--migration-min-gain 0` so that the decision does not hinge on
how fast this machine initialises A against the default 1 s threshold (the threshold itself is
covered in-process by test_migration_controller.py).

The checks are the client's: A's stream ends with exactly the text of an unmigrated run, B
answers from n1, and the controller's records say the scheduler moved A's instance from n1 to
n2 with its one request handed over.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import upload_checkpoint
from faults.s3_fault_proxy import S3FaultProxy

from ember.api import worker_pb2 as pb
from ember.api.client import EmberClient

pytestmark = pytest.mark.timeout(300)

MAX_TOKENS = 5000
PROMPT = "Once upon a time"
S3_DELAY_S = 2.0  # added to every GET of checkpoint weights: B's fetch takes at least this long


def wait_for(condition: Callable[[], object], what: str, timeout: float = 120.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Stream:
    """Reads a streaming invocation on a thread while the test goes on."""

    def __init__(self, events) -> None:
        self.events: list[dict] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(events,), daemon=True)
        self._thread.start()

    def _run(self, events) -> None:
        try:
            for event in events:
                self.events.append(event)
        except BaseException as exc:  # surfaced by join()
            self.error = exc

    def text_events(self) -> int:
        return sum(1 for e in list(self.events) if e["kind"] == "text")

    def join(self, timeout: float = 240.0) -> tuple[str, dict]:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream did not end"
        if self.error is not None:
            raise self.error
        return "".join(e["text"] for e in self.events if e["kind"] == "text"), self.events[-1]


def one_instance_budget_gb(checkpoint: Path) -> float:
    """A worker memory budget that holds one instance of the checkpoint and has no room for a
    second one, neither for the worker nor for the controller (which counts memory_factor x the
    checkpoint per instance until an instance's READY event tells it what one really holds)."""
    from ember.ckpt_format import open_checkpoint
    from ember.controller.config import SchedulerConfig
    from ember.worker.transformers_backend import TransformersBackend

    index = open_checkpoint(checkpoint)
    needed = TransformersBackend().memory_needed(index, "cpu")
    return (needed + 0.5 * SchedulerConfig().memory_factor * index.total_bytes) / 1e9


def test_the_scheduler_migrates_a_running_stream_to_start_a_model_where_it_is_cached(
        launch_controller, launch_worker, s3_server, migration_checkpoint: Path) -> None:
    b_uri = str(upload_checkpoint(migration_checkpoint, prefix="b"))
    with S3FaultProxy(s3_server) as proxy:
        proxy.faults.delay_s = S3_DELAY_S
        controller = launch_controller(args=["--node-timeout", "10", "--max-tokens-cap", str(MAX_TOKENS),
                                             "--migration-min-gain", "0"])
        worker_env = {"AWS_ENDPOINT_URL": proxy.url,
                      "EMBER_WORKER_MEMORY_GB": f"{one_instance_budget_gb(migration_checkpoint):.9f}"}

        def launch(name: str):
            return launch_worker(args=["--controller", controller.grpc_address, "--node-id", name,
                                       "--dram-cache-gb", "0.2", "--disk-cache-gb", "1"], env=worker_env)

        n1 = launch("n1")
        client = EmberClient(controller.url, timeout_s=300)
        try:
            wait_for(lambda: any(n["id"] == "n1" and n["state"] == "up" for n in client.list_nodes()), "n1 registered")
            # B once on n1: fetched from S3 (slowly) into its disk cache, then scaled to zero.
            client.deploy("b", b_uri, keep_alive_s=0)
            assert client.invoke("b", "Hi", max_tokens=4, temperature=0)["node"] == "n1"
            wait_for(lambda: not client.list_instances("b"), "B's first instance to stop")
            client.update_deployment("b", keep_alive_s=600)

            # A on n1: its first run is the reference, and the instance then stays (n1 is full).
            client.deploy("a", str(migration_checkpoint), keep_alive_s=600, max_instances=2)
            reference = Stream(client.invoke_stream("a", PROMPT, max_tokens=MAX_TOKENS, temperature=0))
            wait_for(lambda: reference.text_events() > 0, "A's reference run to start")
            n2: list = []
            starter = threading.Thread(target=lambda: n2.append(launch("n2")), daemon=True)
            starter.start()  # n2 comes up while the reference runs (A is placed on n1 already)
            reference_text, done = reference.join()
            assert done["kind"] == "done" and done["finish_reason"] == "length" and done["node"] == "n1"
            (a_instance,) = client.list_instances("a")
            assert a_instance["node"] == "n1" and a_instance["state"] == "ready"
            starter.join(180)
            assert n2, "n2 did not start"
            wait_for(lambda: any(n["id"] == "n2" and n["state"] == "up" for n in client.list_nodes()),
                     "n2 registered")

            # Moving a stream needs its cost: the worker measures it once the instance is idle
            # (worker.proto fields 20-22), and the controller learns it from the next heartbeat.
            inventory = n1.stub().Inventory

            def costs_known() -> float | None:
                status = inventory(pb.InventoryRequest(), timeout=5, metadata=n1.metadata())
                known = any(i.id == a_instance["id"] and i.recompute_s_per_token > 0 for i in status.instances)
                return time.time() if known else None

            measured_at = wait_for(costs_known, "n1 to measure A's migration cost", timeout=60)
            wait_for(lambda: next(n for n in client.list_nodes() if n["id"] == "n1")["last_heartbeat"] > measured_at,
                     "a heartbeat carrying the cost to the controller", timeout=30)

            stream = Stream(client.invoke_stream("a", PROMPT, max_tokens=MAX_TOKENS, temperature=0))
            wait_for(lambda: stream.text_events() >= 20, "A's stream to run on n1")
            b_reply: list = []
            b_call = threading.Thread(target=lambda: b_reply.append(client.invoke("b", "Hi", max_tokens=8,
                                                                                  temperature=0)), daemon=True)
            b_call.start()
            text, done = stream.join()
            b_call.join(120)
            assert b_reply, "B's request did not finish"

            # A's client saw one stream, identical to the unmigrated run, ending on n2.
            assert text == reference_text, "the migrated stream differs from the unmigrated run"
            assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == MAX_TOKENS
            assert done["node"] == "n2"
            # B started on n1, where its checkpoint was cached, not from S3 on n2.
            assert b_reply[0]["node"] == "n1" and b_reply[0]["usage"]["completion_tokens"] == 8
            (b_instance,) = client.list_instances("b")
            assert b_instance["node"] == "n1" and b_instance["source_tier"] in ("disk", "dram"), b_instance
            # The controller's record: the scheduler moved A's instance off n1, its request handed over.
            (migration,) = client.list_migrations()
            assert migration["reason"] == "scheduler" and migration["instance"] == a_instance["id"], migration
            assert (migration["source_node"], migration["destination_node"]) == ("n1", "n2"), migration
            assert migration["state"] == "done" and migration["requests"] == {"handed_over": 1}, migration
            wait_for(lambda: [(i["node"], i["state"]) for i in client.list_instances("a")] == [("n2", "ready")],
                     "A's source instance on n1 to be unloaded")
            metrics = urllib.request.urlopen(f"{controller.url}/metrics", timeout=10).read().decode()
            assert 'ember_controller_instance_migrations_total{reason="scheduler",state="done"} 1.0' in metrics
        finally:
            client.close()
            # Shown if the test fails: where the scheduler put what, and why (its estimates).
            print("\n".join(line for line in controller.log().splitlines()
                            if "ember.controller.instances" in line or "ember.controller.migrations" in line))
