"""The worker as a process: real `ember worker` subprocesses, a real moto S3 server, the tiny demo model.

Tiers are observed through what the worker reports (LoadProgress.source_tier, Inventory, metrics),
never through timing.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import urllib.request
import uuid
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from ember.api import worker_pb2 as pb
from ember.api import worker_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(600)

PROMPTS = [
    "The quick brown fox",
    "Once upon a time",
    "Serverless inference starts",
    "A cat sat on",
]


# ---- helpers ---------------------------------------------------------------------------------


def load(worker, instance_id: str, uri: str, **fields) -> list[pb.LoadProgress]:
    request = pb.LoadRequest(instance_id=instance_id, checkpoint_uri=uri, deployment="demo", **fields)
    return list(worker.stub().Load(request, timeout=300, metadata=worker.metadata()))


def unload(worker, instance_id: str) -> pb.UnloadResponse:
    return worker.stub().Unload(pb.UnloadRequest(instance_id=instance_id), timeout=60, metadata=worker.metadata())


def inventory(worker) -> pb.NodeStatus:
    return worker.stub().Inventory(pb.InventoryRequest(), timeout=30, metadata=worker.metadata())


def generate(worker, instance_id: str, max_tokens: int = 12, **fields) -> list[pb.GenerateChunk]:
    request = pb.GenerateRequest(
        instance_id=instance_id,
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0),
        **fields,
    )
    return list(worker.stub().Generate(request, timeout=300, metadata=worker.metadata()))


def token_ids(chunks: list[pb.GenerateChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if not isinstance(result, pb.UnloadResponse | pb.NodeStatus):
            list(result)  # drain a stream so its status arrives
    return info.value


def upload(bucket: str, prefix: str, checkpoint: Path) -> str:
    import boto3

    client = boto3.client("s3")
    for f in sorted(checkpoint.iterdir()):
        client.upload_file(str(f), bucket, f"{prefix}/{f.name}")
    return f"s3://{bucket}/{prefix}"


def new_bucket() -> str:
    import boto3

    name = f"w-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def tier_uris(status: pb.NodeStatus, tier: str) -> list[str]:
    return [c.uri for c in status.tiers[tier].checkpoints]


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir())


def reference_generate(hf_dir: Path, prompts: list[str], max_new_tokens: int) -> dict[str, list[int]]:
    """Greedy continuations from plain transformers `generate`, one prompt at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = {}
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        out[prompt] = gen[0, ids["input_ids"].shape[1]:].tolist()
    return out


def memory_needed(checkpoint: Path) -> int:
    from ember.ckpt_format.index import open_checkpoint
    from ember.worker.backends import make_backend

    return make_backend("transformers").memory_needed(open_checkpoint(checkpoint), "cpu")


class RecordingRegistry(pb_grpc.NodeRegistryServicer):
    """Stands in for the controller's NodeRegistry: records what the worker reports."""

    def __init__(self) -> None:
        self.statuses: list[pb.NodeStatus] = []
        self.lock = threading.Condition()

    def RegisterNode(self, request, context):
        with self.lock:
            self.statuses.append(request.status)
            self.lock.notify_all()
        return pb.RegisterNodeResponse(node_id=request.status.node_id)

    def Heartbeat(self, request, context):
        with self.lock:
            self.statuses.append(request.status)
            self.lock.notify_all()
        return pb.HeartbeatResponse(known=True)

    def wait_for(self, predicate, timeout: float = 60) -> pb.NodeStatus:
        with self.lock:
            assert self.lock.wait_for(lambda: any(predicate(s) for s in self.statuses), timeout), self.statuses[-1:]
            return next(s for s in reversed(self.statuses) if predicate(s))


# ---- one worker shared by the serving tests --------------------------------------------------


@pytest.fixture(scope="module")
def registry():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = RecordingRegistry()
    pb_grpc.add_NodeRegistryServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture(scope="module")
def serving_worker(launch_worker, s3_server, registry, demo_checkpoint):
    """Memory budget for one instance and a half: a second instance must be refused."""
    from conftest import free_port

    budget_gb = 1.5 * memory_needed(demo_checkpoint) / 1e9
    metrics_port = free_port()
    worker = launch_worker(
        args=["--controller", registry[1], "--node-id", "serving-node", "--metrics-port", str(metrics_port),
              "--dram-cache-gb", "0.5", "--disk-cache-gb", "1"],
        env={"EMBER_WORKER_MEMORY_GB": f"{budget_gb:.6f}"},
    )
    worker.metrics_port = metrics_port
    events = load(worker, "main", f"file://{demo_checkpoint}")
    assert events[-1].phase == pb.LOAD_PHASE_READY
    # READY tells the controller what the instance holds, for its later placements of this model.
    assert events[-1].memory_bytes == memory_needed(demo_checkpoint)
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def reference(demo_hf_dir):
    return reference_generate(demo_hf_dir, PROMPTS, max_new_tokens=24)


def test_greedy_output_equals_transformers_generate(serving_worker, reference, demo_hf_dir) -> None:
    from transformers import AutoTokenizer

    chunks = generate(serving_worker, "main", max_tokens=24, prompt=PROMPTS[0])
    assert token_ids(chunks) == reference[PROMPTS[0]]
    assert chunks[-1].finish_reason in ("length", "stop")
    assert chunks[-1].completion_tokens == len(reference[PROMPTS[0]])
    tokenizer = AutoTokenizer.from_pretrained(demo_hf_dir)
    assert "".join(c.text for c in chunks) == tokenizer.decode(reference[PROMPTS[0]], skip_special_tokens=True)
    # The same request as pre-tokenized input gives the same tokens.
    ids = tokenizer(PROMPTS[0])["input_ids"]
    assert token_ids(generate(serving_worker, "main", max_tokens=24, prompt_token_ids=ids)) == reference[PROMPTS[0]]


def test_concurrent_requests_are_batched_and_each_correct(serving_worker, reference) -> None:
    barrier = threading.Barrier(len(PROMPTS))

    def one(prompt: str) -> list[int]:
        barrier.wait()
        return token_ids(generate(serving_worker, "main", max_tokens=24, prompt=prompt))

    with futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = dict(zip(PROMPTS, pool.map(one, PROMPTS)))
    assert results == reference
    (status,) = serving_worker.stub().ListInstances(pb.ListInstancesRequest(), timeout=30).instances
    assert status.peak_batch_size >= 2, "concurrent requests were decoded one at a time"
    assert status.generated_tokens >= sum(len(v) for v in reference.values())


def test_a_cancelled_stream_frees_its_slot(serving_worker, reference) -> None:
    import time

    stub = serving_worker.stub()
    call = stub.Generate(
        pb.GenerateRequest(instance_id="main", prompt=PROMPTS[1], sampling=pb.SamplingParams(max_tokens=4000)),
        timeout=300,
    )
    next(call)  # the request is running
    call.cancel()
    deadline = time.monotonic() + 60
    while True:
        (status,) = stub.ListInstances(pb.ListInstancesRequest(), timeout=30).instances
        if status.active_requests == 0 and status.queued_requests == 0:
            break
        assert time.monotonic() < deadline, "a cancelled request kept its batch slot"
        time.sleep(0.1)
    assert token_ids(generate(serving_worker, "main", max_tokens=24, prompt=PROMPTS[1])) == reference[PROMPTS[1]]


def test_bad_inputs_get_the_right_status_and_the_worker_keeps_serving(serving_worker, demo_checkpoint) -> None:
    w = serving_worker
    stub = w.stub()

    def gen(**fields):
        return lambda: stub.Generate(pb.GenerateRequest(**fields), timeout=60)

    def load_call(uri: str, instance_id: str = "x", **fields):
        return lambda: stub.Load(pb.LoadRequest(instance_id=instance_id, checkpoint_uri=uri, **fields), timeout=60)

    err = rpc_error(gen(instance_id="nope", prompt="hi"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.details()
    err = rpc_error(lambda: stub.Unload(pb.UnloadRequest(instance_id="nope"), timeout=60))
    assert err.code() == grpc.StatusCode.NOT_FOUND

    err = rpc_error(gen(instance_id="main", prompt="hi", sampling=pb.SamplingParams(max_tokens=0)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in err.details()
    err = rpc_error(gen(instance_id="main", prompt="hi", sampling=pb.SamplingParams(max_tokens=-3)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = rpc_error(gen(instance_id="main"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "exactly one" in err.details()
    err = rpc_error(gen(instance_id="main", prompt="hi", prompt_token_ids=[1, 2]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT

    (instance,) = stub.ListInstances(pb.ListInstancesRequest(), timeout=30).instances
    long_prompt = [5] * 100_000
    err = rpc_error(gen(instance_id="main", prompt_token_ids=long_prompt))
    assert err.code() in (grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.INVALID_ARGUMENT)
    assert "100000" in err.details()

    err = rpc_error(load_call("s3:/bucket/x"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "s3:/bucket/x" in err.details()
    err = rpc_error(load_call("ftp://host/model"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "ftp" in err.details()
    err = rpc_error(load_call("s3://ember-no-such-bucket/m"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "ember-no-such-bucket" in err.details()
    bucket = new_bucket()
    err = rpc_error(load_call(f"s3://{bucket}/missing/model"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert bucket in err.details() and "missing/model/ember.json" in err.details()
    err = rpc_error(load_call("/definitely/not/here"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "/definitely/not/here" in err.details()
    err = rpc_error(load_call(str(demo_checkpoint), instance_id="main"))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    err = rpc_error(load_call(str(demo_checkpoint), backend="no-such-backend"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "no-such-backend" in err.details()
    err = rpc_error(load_call(str(demo_checkpoint), device="cuda"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "cuda" in err.details()

    # A second instance does not fit the budget: refused with what would fit and whom to unload.
    err = rpc_error(load_call(str(demo_checkpoint), instance_id="second"))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "GiB free" in err.details() and "unloading main" in err.details()
    assert [i.id for i in stub.ListInstances(pb.ListInstancesRequest(), timeout=30).instances] == [instance.id]

    assert stub.Health(pb.HealthRequest(), timeout=10).ok
    assert token_ids(generate(w, "main", max_tokens=3, prompt="still alive"))


def test_heartbeats_and_metrics_report_instances_and_tiers(serving_worker, registry, demo_checkpoint) -> None:
    servicer, _ = registry
    status = servicer.wait_for(lambda s: any(i.id == "main" and i.state == pb.INSTANCE_STATE_READY for i in s.instances))
    assert status.node_id == "serving-node" and status.address == serving_worker.address
    assert status.devices[0].name == "cpu" and status.devices[0].free_memory_bytes >= 0
    assert set(status.tiers) == {"disk", "dram"}
    assert status.tiers["dram"].capacity_bytes == 500_000_000
    assert str(demo_checkpoint.resolve()) in tier_uris(status, "dram")
    assert status.loads_by_tier["disk"] >= 1

    text = urllib.request.urlopen(f"http://127.0.0.1:{serving_worker.metrics_port}/metrics", timeout=10).read().decode()
    assert 'ember_worker_loads_total{tier="disk"} 1.0' in text
    assert "ember_worker_generated_tokens_total" in text
    assert 'ember_worker_load_seconds_count{tier="disk"} 1.0' in text
    assert "ember_worker_tier_read_gbps" in text


# ---- tiers: S3 -> disk -> DRAM -----------------------------------------------------------------


def test_first_load_from_s3_then_disk_then_dram(launch_worker, s3_server, demo_checkpoint, reference) -> None:
    bucket = new_bucket()
    uri_a = upload(bucket, "models/a", demo_checkpoint)
    uri_b = upload(bucket, "models/b", demo_checkpoint)
    size = checkpoint_bytes(demo_checkpoint)
    # The DRAM tier holds one copy of the model, not two: loading B evicts A from DRAM (LRU).
    worker = launch_worker(args=["--dram-cache-gb", f"{1.5 * size / 1e9:.6f}", "--disk-cache-gb", "1"])

    def final_tier(instance_id: str, uri: str) -> str:
        events = load(worker, instance_id, uri)
        assert events[-1].phase == pb.LOAD_PHASE_READY, events[-1]
        assert token_ids(generate(worker, instance_id, max_tokens=24, prompt=PROMPTS[0])) == reference[PROMPTS[0]]
        unload(worker, instance_id)
        return events[-1].source_tier

    first = load(worker, "a1", uri_a)
    assert [e.phase for e in first][-1] == pb.LOAD_PHASE_READY
    assert any(e.phase == pb.LOAD_PHASE_FETCH and e.source_tier == "s3" and e.bytes_done == e.bytes_total > 0
               for e in first)
    assert first[-1].source_tier == "s3" and first[-1].fetch_s > 0
    # The download wrote through into the DRAM pool: the load after it read no disk.
    assert [e.source_tier for e in first if e.phase == pb.LOAD_PHASE_LOAD] == ["dram"]
    status = inventory(worker)
    assert tier_uris(status, "disk") == [uri_a] and tier_uris(status, "dram") == [uri_a]
    assert status.s3_read_gbps > 0
    assert status.tiers["disk"].read_gbps == 0  # no disk rate was made up from it
    unload(worker, "a1")

    assert final_tier("b1", uri_b) == "s3"
    status = inventory(worker)
    assert sorted(tier_uris(status, "disk")) == sorted([uri_a, uri_b])
    assert tier_uris(status, "dram") == [uri_b]  # A was evicted from DRAM, still on disk

    assert final_tier("a2", uri_a) == "disk"
    assert final_tier("a3", uri_a) == "dram"
    status = inventory(worker)
    assert dict(status.loads_by_tier) == {"s3": 2, "disk": 1, "dram": 1}
    assert status.tiers["disk"].read_gbps > 0 and status.tiers["dram"].read_gbps > 0
    worker.stop()


def test_restart_keeps_the_disk_cache_and_a_corrupt_entry_is_refetched(
    launch_worker, s3_server, demo_checkpoint, reference, tmp_path: Path
) -> None:
    bucket = new_bucket()
    uri = upload(bucket, "m", demo_checkpoint)
    cache = tmp_path / "cache"
    args = ["--dram-cache-gb", "0", "--disk-cache-gb", "1"]
    worker = launch_worker(cache_dir=cache, args=args)
    assert load(worker, "m1", uri)[-1].source_tier == "s3"
    before = inventory(worker).tiers["disk"]
    worker.stop()

    restarted = launch_worker(cache_dir=cache, args=args)
    after = inventory(restarted).tiers["disk"]
    assert [(c.uri, c.bytes) for c in after.checkpoints] == [(c.uri, c.bytes) for c in before.checkpoints]
    assert after.used_bytes == before.used_bytes > 0
    events = load(restarted, "m2", uri)
    assert events[-1].source_tier == "disk"
    unload(restarted, "m2")
    restarted.stop()

    # Flip one byte inside the cached weights: sizes still match, so only the checksums can tell.
    (part,) = cache.glob("disk/*/checkpoint/part-00000.bin")
    data = bytearray(part.read_bytes())
    data[len(data) // 3] ^= 0x5A
    part.write_bytes(bytes(data))
    third = launch_worker(cache_dir=cache, args=args)
    events = load(third, "m3", uri)
    assert events[-1].phase == pb.LOAD_PHASE_READY and events[-1].source_tier == "s3"
    assert any("corrupt" in e.message for e in events)
    assert token_ids(generate(third, "m3", max_tokens=24, prompt=PROMPTS[0])) == reference[PROMPTS[0]]
    assert tier_uris(inventory(third), "disk") == [uri]
    third.stop()


# ---- authentication: worker token and S3 credentials -------------------------------------------


@pytest.fixture
def auth_s3(tmp_path: Path):
    """A moto server that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT=0): the test keys are unknown to it."""
    from conftest import free_port

    port = free_port()
    log = open(tmp_path / "moto.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**__import__("os").environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    import time

    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError((tmp_path / "moto.log").read_text())
            time.sleep(0.2)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def test_worker_token_is_required_and_bad_s3_credentials_are_reported(
    launch_worker, s3_server, auth_s3, demo_checkpoint
) -> None:
    worker = launch_worker(env={"EMBER_WORKER_TOKEN": "t0ken", "AWS_ENDPOINT_URL": auth_s3},
                           args=["--dram-cache-gb", "0"])
    stub = worker.stub()
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        err = rpc_error(lambda: stub.Inventory(pb.InventoryRequest(), timeout=10, metadata=metadata))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "EMBER_WORKER_TOKEN" in err.details()
        err = rpc_error(lambda: stub.Load(pb.LoadRequest(instance_id="x", checkpoint_uri="/x"), timeout=10,
                                          metadata=metadata))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert inventory(worker).node_id  # with the token

    err = rpc_error(lambda: stub.Load(pb.LoadRequest(instance_id="x", checkpoint_uri="s3://some-bucket/m"),
                                      timeout=60, metadata=worker.metadata()))
    assert err.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    assert "some-bucket" in err.details() and "AWS_ACCESS_KEY_ID" in err.details()
    assert worker.stub().Health(pb.HealthRequest(), timeout=10, metadata=worker.metadata()).ok
    worker.stop()


def test_cli_refuses_bad_flags_with_a_message(tmp_path: Path) -> None:
    for args, needle in (
        (["--device", "tpu"], "--device"),
        (["--controller", "nohostport"], "--controller"),
        (["--disk-cache-gb", "-1"], "--disk-cache-gb"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "ember.cli.main", "worker", "--cache-dir", str(tmp_path), *args],
            capture_output=True, text=True, timeout=120,
        )
        assert out.returncode != 0
        assert needle in out.stderr and "Traceback" not in out.stderr

