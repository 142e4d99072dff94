"""Ember end to end on loopback: a real `ember controller`, two real `ember worker` processes,
the tiny demo model, a real moto S3 server. Nothing is faked.

Covers the issue's "done when": cold start 0 → 1, warm invoke, scale to zero after keep-alive,
locality (the cold start lands on the worker that has the checkpoint cached), scale-out to max
under concurrency, 429 on a full queue, the official openai client, SSE load progress, client
disconnects, the gRPC Controller API and the CLI. Deployment names are unique per test, so the
tests share one cluster (workers take seconds to start).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import pytest
from conftest import AUTH_HEADERS, TEST_ADMIN_KEY, authed_channel

from ember.api import controller_pb2 as cpb
from ember.api import controller_pb2_grpc as cpb_grpc
from ember.api import worker_pb2 as pb
from ember.api.client import ApiError, EmberClient

pytestmark = pytest.mark.timeout(600)

LONG_PROMPT = "Tell me a long story"  # greedy on the tiny demo model: 1000 tokens without EOS


def wait_for(condition: Callable[[], object], what: str, timeout: float = 90.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class Cluster:
    def __init__(self, controller, workers: dict) -> None:
        self.controller = controller
        self.workers = workers
        self.url = controller.url
        self.client = EmberClient(controller.url, timeout_s=300)

    def nodes(self) -> dict[str, dict]:
        return {n["id"]: n for n in self.client.list_nodes()}

    def instances(self, deployment: str) -> list[dict]:
        return self.client.list_instances(deployment)


@pytest.fixture(scope="module")
def cluster(launch_controller, launch_worker, s3_server) -> Cluster:
    controller = launch_controller(args=["--node-timeout", "15"])
    workers = {
        name: launch_worker(args=["--controller", controller.grpc_address, "--node-id", name,
                                  "--dram-cache-gb", "1", "--disk-cache-gb", "5"])
        for name in ("e2e-a", "e2e-b")
    }
    c = Cluster(controller, workers)
    wait_for(lambda: all(c.nodes().get(n, {}).get("state") == "up" for n in workers), "both workers registered")
    yield c
    c.client.close()


def test_cold_start_then_warm_then_scale_to_zero(cluster: Cluster, demo_checkpoint: Path) -> None:
    c = cluster.client
    c.deploy("cycle", str(demo_checkpoint), keep_alive_s=2)
    assert cluster.instances("cycle") == []
    assert "cycle" in [m["id"] for m in c.models()]

    cold = c.invoke("cycle", "Hello", max_tokens=4, temperature=0)
    assert cold["cold_start"] is True and cold["usage"]["completion_tokens"] == 4 and cold["text"]
    instances = cluster.instances("cycle")
    assert [(i["id"], i["state"]) for i in instances] == [(cold["instance"], "ready")]
    assert instances[0]["source_tier"] in ("disk", "dram") and instances[0]["actual_ready_s"] > 0

    warm = c.invoke("cycle", "Hello", max_tokens=4, temperature=0)
    assert warm["cold_start"] is False and warm["instance"] == cold["instance"]
    assert warm["text"] == cold["text"]  # greedy: same prompt, same output

    wait_for(lambda: cluster.instances("cycle") == [], "scale to zero after keep-alive")
    assert c.get_deployment("cycle")["instances"] == {}
    again = c.invoke("cycle", "Hello", max_tokens=4, temperature=0)
    assert again["cold_start"] is True and again["instance"] != cold["instance"]
    c.delete_deployment("cycle")


def test_the_cold_start_lands_where_the_checkpoint_is_cached(cluster: Cluster, demo_checkpoint: Path) -> None:
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="e2e-locality")
    for f in demo_checkpoint.iterdir():
        s3.upload_file(str(f), "e2e-locality", f"tiny/{f.name}")
    uri = "s3://e2e-locality/tiny"
    # Put the checkpoint in worker b's caches (a load and an unload fetch it from S3 to its disk).
    b = cluster.workers["e2e-b"]
    list(b.stub().Load(pb.LoadRequest(instance_id="prime", deployment="prime", checkpoint_uri=uri), timeout=300))
    # The controller unloads instances it did not start (orphans) as soon as a heartbeat shows them,
    # so it may have beaten us to it (the instance is gone) or be doing it (it is unloading): either
    # way, the instance goes and the checkpoint stays cached.
    try:
        b.stub().Unload(pb.UnloadRequest(instance_id="prime"), timeout=60)
    except grpc.RpcError as exc:
        unloading = exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "is unloading" in exc.details()
        assert exc.code() == grpc.StatusCode.NOT_FOUND or unloading, exc
    wait_for(lambda: all(i.id != "prime" for i in b.stub().Inventory(pb.InventoryRequest(), timeout=30).instances),
             "the prime instance to be unloaded")

    def cached_on_b() -> bool:
        tiers = cluster.nodes()["e2e-b"]["tiers"]
        return any(ck["uri"] == uri for t in tiers.values() for ck in t["checkpoints"])

    wait_for(cached_on_b, "worker b's heartbeat to report the cached checkpoint")
    a_tiers = cluster.nodes()["e2e-a"]["tiers"]
    assert not any(ck["uri"] == uri for t in a_tiers.values() for ck in t["checkpoints"])

    c = cluster.client
    c.deploy("locality", uri, keep_alive_s=60)
    result = c.invoke("locality", "Hello", max_tokens=4)
    assert result["cold_start"] is True and result["node"] == "e2e-b"
    (instance,) = cluster.instances("locality")
    assert instance["node"] == "e2e-b" and instance["source_tier"] in ("disk", "dram")
    c.delete_deployment("locality")


def test_concurrency_above_target_scales_out_to_max(cluster: Cluster, demo_checkpoint: Path) -> None:
    c = cluster.client
    c.deploy("burst", str(demo_checkpoint), target_concurrency=1, max_instances=3, keep_alive_s=120)
    results: list = [None] * 6
    barrier = threading.Barrier(6)

    def one(i: int) -> None:
        with EmberClient(cluster.url, timeout_s=300) as client:
            barrier.wait()
            results[i] = client.invoke("burst", f"Request {i}", max_tokens=16)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None and r["usage"]["completion_tokens"] > 0 for r in results)
    instances = cluster.instances("burst")
    assert len(instances) == 3 and all(i["state"] == "ready" for i in instances)
    assert len({r["instance"] for r in results}) >= 2
    c.delete_deployment("burst")


def test_a_full_queue_answers_429_with_retry_after(cluster: Cluster, demo_checkpoint: Path) -> None:
    cluster.client.deploy("narrow", str(demo_checkpoint), max_instances=1, target_concurrency=1, queue_limit=1)
    statuses: list = [None] * 6
    barrier = threading.Barrier(6)

    def one(i: int) -> None:
        with httpx.Client(base_url=cluster.url, timeout=300, headers=AUTH_HEADERS) as http:
            barrier.wait()
            r = http.post("/functions/narrow/invoke", json={"prompt": "Hello", "max_tokens": 8})
            statuses[i] = (r.status_code, r.headers.get("retry-after"), r.json())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = [s[0] for s in statuses]
    assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes
    for code, retry_after, body in statuses:
        if code == 429:
            assert int(retry_after) >= 1 and body["error"]["code"] == "queue_full"
    cluster.client.delete_deployment("narrow")


def test_the_official_openai_client_works(cluster: Cluster, demo_checkpoint: Path) -> None:
    import openai

    cluster.client.deploy("oai", str(demo_checkpoint), keep_alive_s=60)
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key=TEST_ADMIN_KEY, max_retries=0, timeout=300)
    assert "oai" in [m.id for m in client.models.list()]

    chat = client.chat.completions.create(model="oai", messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.usage.completion_tokens == 6 and chat.choices[0].finish_reason == "length"

    pieces, finish = [], None
    for chunk in client.chat.completions.create(model="oai", messages=[{"role": "user", "content": "Hello"}],
                                                max_tokens=6, temperature=0, stream=True):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == chat.choices[0].message.content and finish == "length"

    completion = client.completions.create(model="oai", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert completion.choices[0].text and completion.usage.completion_tokens == 5
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="oai", prompt="Once upon a time", max_tokens=5, temperature=0, stream=True) if c.choices)
    assert streamed == completion.choices[0].text

    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        client.chat.completions.create(model="oai", messages=[{"role": "user", "content": "x"}], temperature=9)
    cluster.client.delete_deployment("oai")


def test_sse_shows_cold_start_progress_and_a_disconnect_cancels(cluster: Cluster, demo_checkpoint: Path) -> None:
    cluster.client.deploy("progress", str(demo_checkpoint), keep_alive_s=60)
    lines: list[str] = []
    request = {"model": "progress", "prompt": LONG_PROMPT, "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.Client(base_url=cluster.url, timeout=300, headers=AUTH_HEADERS) as http:
        with http.stream("POST", "/v1/completions", json=request) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith("data: "):
                    break  # the first token: hang up mid-stream
    comments = [line for line in lines if line.startswith(": loading")]
    assert comments, lines
    assert json.loads(lines[-1][6:])["choices"][0]["text"] is not None

    def finished() -> bool:
        d = cluster.client.get_deployment("progress")
        return d["in_flight"] == 0 and d["queued"] == 0

    wait_for(finished, "the request to be cancelled")
    metrics = httpx.get(f"{cluster.url}/metrics").text
    assert 'ember_controller_requests_total{deployment="progress",outcome="cancelled"} 1.0' in metrics
    cluster.client.delete_deployment("progress")


def test_grpc_controller_api(cluster: Cluster, demo_checkpoint: Path) -> None:
    with authed_channel(cluster.controller.grpc_address) as channel:
        stub = cpb_grpc.ControllerStub(channel)
        d = stub.Deploy(cpb.DeployRequest(name="grpc-demo", checkpoint=str(demo_checkpoint), keep_alive_s=60))
        assert d.name == "grpc-demo" and d.max_instances == 4 and d.keep_alive_s == 60
        with pytest.raises(grpc.RpcError) as info:
            stub.Deploy(cpb.DeployRequest(name="grpc-demo", checkpoint=str(demo_checkpoint)))
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(grpc.RpcError) as info:
            stub.Deploy(cpb.DeployRequest(name="grpc-bad", checkpoint=str(demo_checkpoint.parent / "no-such-dir")))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no-such-dir" in info.value.details()
        assert "grpc-demo" in [x.name for x in stub.List(cpb.ListRequest()).deployments]
        assert stub.Get(cpb.GetRequest(name="grpc-demo")).checkpoint == str(demo_checkpoint.resolve())
        with pytest.raises(grpc.RpcError) as info:
            stub.Get(cpb.GetRequest(name="nope"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

        events = list(stub.Invoke(cpb.InvokeRequest(deployment="grpc-demo", prompt="Hello",
                                                    sampling=pb.SamplingParams(max_tokens=5, temperature=0)),
                                  timeout=300))
        kinds = [e.WhichOneof("event") for e in events]
        assert "loading" in kinds and kinds[-1] == "chunk"
        chunks = [e.chunk for e in events if e.WhichOneof("event") == "chunk"]
        assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 5 and chunks[-1].cold_start
        status = stub.Status(cpb.StatusRequest())
        assert {"e2e-a", "e2e-b"} <= {n.id for n in status.nodes}
        assert [i.deployment for i in status.instances if i.deployment == "grpc-demo"] == ["grpc-demo"]
        assert stub.Delete(cpb.DeleteRequest(name="grpc-demo")).name == "grpc-demo"


def ember(*args: str, url: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.cli.main", *args, "--url", url],
                          capture_output=True, text=True, timeout=300)


def test_cli_deploy_list_get_invoke_status_delete(cluster: Cluster, demo_checkpoint: Path) -> None:
    url = cluster.url
    r = ember("deploy", "cli-demo", "--checkpoint", str(demo_checkpoint), "--keep-alive", "30", "--max", "2", url=url)
    assert r.returncode == 0 and "deployed cli-demo" in r.stdout, r.stderr
    r = ember("deploy", "cli-demo", "--checkpoint", str(demo_checkpoint), url=url)
    assert r.returncode == 1 and "already exists" in r.stderr and "Traceback" not in r.stderr
    r = ember("list", "--json", url=url)
    listed = {d["name"]: d for d in json.loads(r.stdout)["data"]}
    assert listed["cli-demo"]["max_instances"] == 2 and listed["cli-demo"]["keep_alive_s"] == 30
    assert "cli-demo" in ember("list", url=url).stdout
    r = ember("invoke", "cli-demo", "Hello", "--max-tokens", "4", "--temperature", "0", url=url)
    assert r.returncode == 0 and r.stdout.strip() and "cold start" in r.stderr, r.stderr
    r = ember("invoke", "cli-demo", "Hello", "--max-tokens", "4", "--temperature", "0", "--stream", url=url)
    assert r.returncode == 0 and r.stdout.strip() and "cold start" not in r.stderr
    r = ember("get", "cli-demo", url=url)
    assert r.returncode == 0 and "ready" in r.stdout
    r = ember("status", url=url)
    assert r.returncode == 0 and "e2e-a" in r.stdout and "e2e-b" in r.stdout
    assert ember("delete", "cli-demo", url=url).returncode == 0
    r = ember("get", "cli-demo", url=url)
    assert r.returncode == 1 and "does not exist" in r.stderr
    r = ember("invoke", "cli-demo", "x", url=url)
    assert r.returncode == 1 and "ember deploy cli-demo" in r.stderr
    r = ember("list", url="http://127.0.0.1:9")
    assert r.returncode == 1 and "cannot reach the Ember controller" in r.stderr and "ember serve" in r.stderr


def test_the_client_reports_errors_with_status_and_message(cluster: Cluster) -> None:
    with pytest.raises(ApiError) as info:
        cluster.client.get_deployment("never-deployed")
    assert info.value.status == 404 and info.value.code == "model_not_found"
