"""Live migration through the controller: a real `ember controller`, real `ember worker` processes.

The client's view is the contract: a streaming request migrated mid-generation (HTTP SSE and the
gRPC Invoke API, in KV and in token mode) delivers exactly the text/tokens of the same request
run without migration, a drained node ends with no instances and no request lost, and a
source that dies in the middle of a migration is restarted from what the client already has.
The model has no EOS and 8192 positions, so a greedy stream runs for seconds (long enough to
start a destination instance under it) and ends at exactly max_tokens.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from ember.api import controller_pb2 as cpb
from ember.api import controller_pb2_grpc as cpb_grpc
from ember.api import worker_pb2 as pb
from ember.api.client import EmberClient

pytestmark = pytest.mark.timeout(900)

PROMPTS = ["Once upon a time", "The quick brown fox"]
MAX_TOKENS = 5000
NODES = ("mig-a", "mig-b")


def wait_for(condition: Callable[[], object], what: str, timeout: float = 120.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Cluster:
    def __init__(self, controller, workers: dict) -> None:
        self.controller = controller
        self.workers = workers
        self.client = EmberClient(controller.url, timeout_s=600)

    def nodes(self) -> dict[str, dict]:
        return {n["id"]: n for n in self.client.list_nodes()}

    def ready(self, deployment: str) -> list[dict]:
        return [i for i in self.client.list_instances(deployment) if i["state"] == "ready"]

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ember.cli.main", *args, "--url", self.controller.url],
                              capture_output=True, text=True, timeout=600)

    def metrics(self) -> str:
        return urllib.request.urlopen(f"{self.controller.url}/metrics", timeout=10).read().decode()


def launch_node(launch_worker, controller, name: str):
    return launch_worker(args=["--controller", controller.grpc_address, "--node-id", name,
                               "--dram-cache-gb", "0.2", "--disk-cache-gb", "1"])


@pytest.fixture(scope="module")
def cluster(launch_controller, launch_worker, migration_checkpoint: Path):
    controller = launch_controller(args=["--node-timeout", "10", "--max-tokens-cap", str(MAX_TOKENS)])
    workers = {name: launch_node(launch_worker, controller, name) for name in NODES}
    c = Cluster(controller, workers)
    wait_for(lambda: all(c.nodes().get(n, {}).get("state") == "up" for n in NODES), "both workers registered")
    c.client.deploy("mig", str(migration_checkpoint), keep_alive_s=600, max_instances=4)
    yield c
    c.client.close()


@pytest.fixture(scope="module")
def reference(cluster: Cluster) -> dict[str, tuple[str, list[int]]]:
    """Each prompt run once without migration through the gRPC Invoke API: (text, token ids)."""
    out = {}
    for prompt in PROMPTS:
        chunks = list(grpc_invoke(cluster, prompt))
        out[prompt] = ("".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids])
        assert len(out[prompt][1]) == MAX_TOKENS and chunks[-1].finish_reason == "length"
    return out


def grpc_invoke(cluster: Cluster, prompt: str):
    stub = cpb_grpc.ControllerStub(grpc.insecure_channel(cluster.controller.grpc_address))
    request = cpb.InvokeRequest(deployment="mig", prompt=prompt,
                                sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    from conftest import TEST_ADMIN_KEY

    for event in stub.Invoke(request, timeout=600, metadata=(("authorization", f"Bearer {TEST_ADMIN_KEY}"),)):
        if event.HasField("chunk"):
            yield event.chunk


class Reader:
    """Consumes a stream on a thread; the test acts while it runs."""

    def __init__(self, events) -> None:
        self.items: list = []
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._done = False
        threading.Thread(target=self._run, args=(events,), daemon=True).start()

    def _run(self, events) -> None:
        try:
            for item in events:
                with self._cond:
                    self.items.append(item)
                    self._cond.notify_all()
        except BaseException as exc:  # surfaced by join()
            self.error = exc
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def wait_items(self, n: int, timeout: float = 300) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.items) >= n or self._done, timeout)
        assert len(self.items) >= n, f"the stream ended early: {self.error}"

    def join(self, timeout: float = 600) -> list:
        with self._cond:
            assert self._cond.wait_for(lambda: self._done, timeout), "the stream did not end"
        if self.error is not None:
            raise self.error
        return self.items


def sse_stream(cluster: Cluster, prompt: str) -> Reader:
    return Reader(cluster.client.invoke_stream("mig", prompt, max_tokens=MAX_TOKENS, temperature=0))


def the_instance(cluster: Cluster) -> dict:
    (instance,) = wait_for(lambda: cluster.ready("mig") if len(cluster.ready("mig")) == 1 else None,
                           "exactly one ready instance of the deployment")
    return instance


def other_node(node: str) -> str:
    return next(n for n in NODES if n != node)


def wait_migration(cluster: Cluster, migration_id: str) -> dict:
    return wait_for(lambda: (lambda r: r if r["finished_at"] is not None else None)(
        cluster.client.get_migration(migration_id)), f"migration {migration_id} to end", timeout=300)


# ---- tests ---------------------------------------------------------------------------------------


def test_an_sse_stream_moves_with_its_kv_cache_and_the_client_sees_one_stream(cluster, reference) -> None:
    prompt = PROMPTS[0]
    stream = sse_stream(cluster, prompt)
    stream.wait_items(50)
    source = the_instance(cluster)
    target = other_node(source["node"])

    record = cluster.client.migrate_instance(source["id"], node=target, mode="kv")
    assert record["state"] == "starting" and record["destination_node"] == target and record["reason"] == "operator"
    events = stream.join()
    text = "".join(e["text"] for e in events if e["kind"] == "text")
    done = events[-1]
    assert text == reference[prompt][0], "the migrated stream differs from the unmigrated one"
    assert done["kind"] == "done" and done["finish_reason"] == "length"
    assert done["usage"]["completion_tokens"] == MAX_TOKENS
    assert done["node"] == target and done["instance"] == record["destination_instance"]

    final = wait_migration(cluster, record["id"])
    assert final["state"] == "done", final
    assert final["requests"] == {"handed_over": 1} and final["modes"] == {"kv": 1} and final["bytes"] > 0
    # the source is unloaded once its last stream switched; the destination serves the deployment
    wait_for(lambda: [i["id"] for i in cluster.ready("mig")] == [record["destination_instance"]],
             "the source instance to be unloaded")
    metrics = cluster.metrics()
    assert 'ember_controller_migration_stream_pause_seconds_count{mode="kv"}' in metrics
    assert 'ember_controller_migrated_requests_total{mode="kv",outcome="handed_over",reason="operator"}' in metrics
    assert any(m["id"] == record["id"] for m in cluster.client.list_migrations())


def test_a_grpc_stream_moves_by_recompute_via_the_cli(cluster, reference) -> None:
    prompt = PROMPTS[1]
    stream = Reader(grpc_invoke(cluster, prompt))
    stream.wait_items(50)
    source = the_instance(cluster)
    target = other_node(source["node"])

    result = cluster.cli("migrate", source["id"], "--to", target, "--mode", "tokens")
    assert result.returncode == 0, result.stderr
    assert "moved" in result.stdout and "recompute" in result.stdout and target in result.stdout
    chunks = stream.join()
    assert [t for c in chunks for t in c.token_ids] == reference[prompt][1]
    assert "".join(c.text for c in chunks) == reference[prompt][0]
    assert chunks[-1].finish_reason == "length" and chunks[-1].node == target
    assert all(c.finish_reason in ("", "length") for c in chunks)  # "migrated" never reaches a client
    assert 'ember_controller_migration_stream_pause_seconds_count{mode="tokens"}' in cluster.metrics()


def test_draining_a_node_moves_every_stream_and_empties_it(cluster, reference) -> None:
    streams = {prompt: sse_stream(cluster, prompt) for prompt in PROMPTS}
    for s in streams.values():
        s.wait_items(50)
    node = the_instance(cluster)["node"]

    result = cluster.cli("drain", node)
    assert result.returncode == 0, result.stderr
    assert f"node {node} is drained" in result.stdout
    for prompt, s in streams.items():
        events = s.join()
        assert "".join(e["text"] for e in events if e["kind"] == "text") == reference[prompt][0]
        assert events[-1]["finish_reason"] == "length" and events[-1]["node"] == other_node(node)
    view = cluster.nodes()[node]
    assert view["state"] == "drained" and view["instances"] == []
    drain = cluster.client.get_drain(node)
    (migration,) = [cluster.client.get_migration(m) for m in drain["migrations"]]
    assert migration["reason"] == "drain" and migration["requests"] == {"handed_over": 2}

    # drained: new instances go elsewhere until it is undrained
    assert cluster.client.invoke("mig", "Hi", max_tokens=3, temperature=0)["node"] == other_node(node)
    result = cluster.cli("drain", node, "--undo")
    assert result.returncode == 0, result.stderr
    assert cluster.nodes()[node]["state"] == "up"


def test_bad_migrations_are_refused_clearly(cluster) -> None:
    from ember.api.client import ApiError

    c = cluster.client
    with pytest.raises(ApiError) as info:
        c.migrate_instance("no-such-instance")
    assert info.value.status == 404 and "no-such-instance" in info.value.message
    instance = the_instance(cluster)
    with pytest.raises(ApiError) as info:
        c.migrate_instance(instance["id"], node=instance["node"])
    assert info.value.status == 400 and "already runs on node" in info.value.message
    with pytest.raises(ApiError) as info:
        c.migrate_instance(instance["id"], node="no-such-node")
    assert info.value.status == 404 and "no-such-node" in info.value.message
    with pytest.raises(ApiError) as info:
        c.drain_node("no-such-node")
    assert info.value.status == 404
    result = cluster.cli("migrate", "no-such-instance")
    assert result.returncode == 1 and "no-such-instance" in result.stderr and "Traceback" not in result.stderr


def test_a_source_killed_mid_migration_is_restarted_from_the_clients_tokens(cluster, reference, launch_worker) -> None:
    """Last in this module: it kills a worker of the cluster."""
    victim = launch_node(launch_worker, cluster.controller, "mig-c")
    wait_for(lambda: cluster.nodes().get("mig-c", {}).get("state") == "up", "mig-c registered")
    prompt = PROMPTS[0]
    stream = sse_stream(cluster, prompt)
    stream.wait_items(20)
    instance = the_instance(cluster)
    if instance["node"] != "mig-c":  # first bring the stream onto the node that will die
        moved = cluster.client.migrate_instance(instance["id"], node="mig-c", wait=True)
        assert moved["state"] == "done", moved
        instance = the_instance(cluster)
    assert instance["node"] == "mig-c"
    record = cluster.client.migrate_instance(instance["id"], node="mig-a")
    wait_for(lambda: cluster.client.get_migration(record["id"])["state"] != "starting", "the destination ready")
    victim.proc.kill()  # the source dies while its request's state is in flight (or just after)
    victim.proc.wait(timeout=30)

    events = stream.join()
    text = "".join(e["text"] for e in events if e["kind"] == "text")
    assert text == reference[prompt][0], "the restarted stream repeated or dropped text"
    assert events[-1]["finish_reason"] == "length" and events[-1]["node"] == "mig-a"
    assert events[-1]["usage"]["completion_tokens"] == MAX_TOKENS
