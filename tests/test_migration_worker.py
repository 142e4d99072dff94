"""Live migration between real worker processes: MigrateOut on A moves running requests to B.

What a client sees is the contract: A's tokens up to the "migrated" chunk, then B's tokens from
Generate(resume_id) form exactly the greedy output of the same request run without migration
(the model has no EOS, so every run lasts exactly max_tokens). Failures are injected with real
processes (SIGSTOP/SIGKILL) and with a gRPC relay between the workers that cuts or holds the
MigrateIn stream at a chosen message — a network fault, while both workers stay real.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
import uuid
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from ember.api import worker_pb2 as pb
from ember.api import worker_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(600)

KV, TOKENS, AUTO = pb.MIGRATION_MODE_KV, pb.MIGRATION_MODE_TOKENS, pb.MIGRATION_MODE_AUTO
PROMPTS = ["Once upon a time", "The quick brown fox", "Serverless inference starts", "A cat sat on"]
MAX_TOKENS = 600
FINAL_PHASES = (pb.MIGRATION_PHASE_HANDED_OVER, pb.MIGRATION_PHASE_STAYED, pb.MIGRATION_PHASE_FINISHED)


# ---- helpers ---------------------------------------------------------------------------------


def load(worker, instance_id: str, checkpoint: Path) -> None:
    request = pb.LoadRequest(instance_id=instance_id, checkpoint_uri=str(checkpoint), deployment="m")
    events = list(worker.stub().Load(request, timeout=300, metadata=worker.metadata()))
    assert events[-1].phase == pb.LOAD_PHASE_READY


def gen_request(instance_id: str, prompt: str, request_id: str = "", max_tokens: int = MAX_TOKENS,
                **fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(instance_id=instance_id, request_id=request_id, prompt=prompt,
                              sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0), **fields)


def tokens_of(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def text_of(chunks) -> str:
    return "".join(c.text for c in chunks)


class Stream:
    """A Generate call consumed on a thread, so the test can act while tokens flow."""

    def __init__(self, worker, request: pb.GenerateRequest) -> None:
        self.chunks: list[pb.GenerateChunk] = []
        self.error: grpc.RpcError | None = None
        self._cond = threading.Condition()
        self._done = False
        self.call = worker.stub().Generate(request, timeout=300, metadata=worker.metadata())
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for chunk in self.call:
                with self._cond:
                    self.chunks.append(chunk)
                    self._cond.notify_all()
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    @property
    def tokens(self) -> list[int]:
        return tokens_of(self.chunks)

    def wait_tokens(self, n: int, timeout: float = 120) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.tokens) >= n or self._done, timeout)
        assert len(self.tokens) >= n, f"the stream ended after {len(self.tokens)} tokens: {self.error}"

    def join(self, timeout: float = 300) -> Stream:
        with self._cond:
            assert self._cond.wait_for(lambda: self._done, timeout), "the stream did not end"
        return self


def migrate(worker, instance_id: str, dest_address: str, dest_instance: str, mode: int,
            request_ids: list[str] | None = None) -> list[pb.MigrateOutEvent]:
    request = pb.MigrateOutRequest(instance_id=instance_id, request_ids=request_ids or [],
                                   destination_address=dest_address, destination_instance_id=dest_instance,
                                   mode=mode, destination_node_id="node-b")
    return list(worker.stub().MigrateOut(request, timeout=300, metadata=worker.metadata()))


def finals(events: list[pb.MigrateOutEvent]) -> dict[str, pb.MigrateOutEvent]:
    return {e.request_id: e for e in events if e.phase in FINAL_PHASES}


def attach(handover: pb.Handover) -> list[pb.GenerateChunk]:
    stub = pb_grpc.WorkerStub(grpc.insecure_channel(handover.address))
    request = pb.GenerateRequest(instance_id=handover.instance_id, resume_id=handover.resume_id)
    return list(stub.Generate(request, timeout=300))


def metrics_text(worker) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=10).read().decode()


def launch(launch_worker, checkpoint: Path, instance_id: str):
    from conftest import free_port

    port = free_port()
    worker = launch_worker(args=["--metrics-port", str(port), "--dram-cache-gb", "0.2", "--disk-cache-gb", "1"])
    worker.metrics_port = port
    load(worker, instance_id, checkpoint)
    return worker


def rid() -> str:
    return f"r-{uuid.uuid4().hex[:8]}"


class Relay(pb_grpc.WorkerServicer):
    """Forwards MigrateIn to a real worker; at `at` ("commit" | "accepted") it cuts or holds the stream.

    cut: the source gets UNAVAILABLE and the destination sees its caller half-close without a
    commit (the commit is never forwarded) — a network failure right after the source stopped.
    hold: nothing passes any more until the caller goes away; `reached` is set when it happens.
    """

    def __init__(self, upstream: str, at: str, action: str) -> None:
        self.stub = pb_grpc.WorkerStub(grpc.insecure_channel(upstream))
        self.at, self.action = at, action
        self.reached = threading.Event()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_WorkerServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.address = f"127.0.0.1:{self.port}"

    def _hold(self, context) -> None:
        self.reached.set()
        while context.is_active():
            time.sleep(0.02)

    def MigrateIn(self, request_iterator, context):
        cut = threading.Event()

        def forward():
            for message in request_iterator:
                if message.WhichOneof("body") == "commit" and self.at == "commit":
                    if self.action == "hold":
                        self._hold(context)
                    cut.set()
                    self.reached.set()
                    return
                yield message

        upstream = self.stub.MigrateIn(forward())
        context.add_callback(upstream.cancel)
        for reply in upstream:
            if reply.WhichOneof("body") == "accepted" and self.at == "accepted":
                self._hold(context)
                return
            yield reply
        if cut.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "relay: connection cut")

    def stop(self) -> None:
        self.server.stop(None)


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(launch_worker, migration_checkpoint):
    a = launch(launch_worker, migration_checkpoint, "src")
    b = launch(launch_worker, migration_checkpoint, "dst")
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(scope="module")
def reference(pair):
    """Unmigrated greedy output of every prompt on the source worker."""
    a, _ = pair
    out = {}
    for prompt in PROMPTS:
        chunks = list(a.stub().Generate(gen_request("src", prompt), timeout=300))
        assert len(tokens_of(chunks)) == MAX_TOKENS and chunks[-1].finish_reason == "length"
        out[prompt] = (tokens_of(chunks), text_of(chunks))
    return out


# ---- the happy paths -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [KV, TOKENS], ids=["kv", "tokens"])
def test_a_migrated_stream_continues_exactly(pair, reference, mode) -> None:
    a, b = pair
    prompt = PROMPTS[0]
    stream = Stream(a, gen_request("src", prompt, request_id=rid()))
    stream.wait_tokens(40)
    events = migrate(a, "src", b.address, "dst", mode)
    (final,) = finals(events).values()
    assert final.phase == pb.MIGRATION_PHASE_HANDED_OVER, final.message
    assert final.mode == mode and final.bytes > 0 and final.stop_s > 0
    if mode == KV:
        assert any(e.phase == pb.MIGRATION_PHASE_PRECOPY for e in events)
        # the prefix went over while A decoded: far more KV bytes than a stop-and-copy delta
        assert final.bytes >= 40 * 512
    assert any(e.phase == pb.MIGRATION_PHASE_STOP_AND_COPY for e in events)

    stream.join()
    assert stream.error is None
    head = stream.chunks
    assert head[-1].finish_reason == "migrated" and head[-1].token_ids == []
    handover = head[-1].handover
    assert handover.address == b.address and handover.instance_id == "dst" and handover.node_id == "node-b"
    assert handover.resume_id and handover.mode == mode
    assert final.handover == handover

    tail = attach(handover)
    want_tokens, want_text = reference[prompt]
    assert tokens_of(head) + tokens_of(tail) == want_tokens
    assert text_of(head) + text_of(tail) == want_text
    assert tail[-1].finish_reason == "length" and tail[-1].completion_tokens == MAX_TOKENS
    assert {c.request_id for c in head + tail} == {head[0].request_id}

    # the resume id is single use
    with pytest.raises(grpc.RpcError) as info:
        attach(handover)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    name = "kv" if mode == KV else "tokens"
    out, into = metrics_text(a), metrics_text(b)
    assert f'ember_worker_migrations_total{{direction="out",mode="{name}",outcome="handed_over"}}' in out
    assert f'ember_worker_migrations_total{{direction="in",mode="{name}",outcome="accepted"}}' in into
    assert f'ember_worker_migration_stop_seconds_count{{mode="{name}"}}' in out
    assert f'ember_worker_migration_bytes_total{{direction="out",mode="{name}"}}' in out


def test_concurrent_requests_migrate_together_in_auto_mode(pair, reference) -> None:
    a, b = pair
    streams = {p: Stream(a, gen_request("src", p, request_id=rid())) for p in PROMPTS}
    for s in streams.values():
        s.wait_tokens(20)
    events = migrate(a, "src", b.address, "dst", AUTO)
    by_request = finals(events)
    assert len(by_request) == len(PROMPTS)
    for final in by_request.values():
        assert final.phase == pb.MIGRATION_PHASE_HANDED_OVER, final.message
        assert final.mode in (KV, TOKENS)  # the cost model chose, from measurements
        assert final.estimated_kv_s > 0 and final.estimated_recompute_s > 0
    for prompt, s in streams.items():
        s.join()
        head = s.chunks
        assert head[-1].finish_reason == "migrated", s.error
        tail = attach(head[-1].handover)
        assert tokens_of(head) + tokens_of(tail) == reference[prompt][0]
        assert text_of(head) + text_of(tail) == reference[prompt][1]


def test_a_request_can_move_on_again_and_back(pair, reference) -> None:
    """A → B, then B → A before the client attached on B: the client follows two hand-overs."""
    a, b = pair
    prompt = PROMPTS[1]
    stream = Stream(a, gen_request("src", prompt, request_id=rid()))
    stream.wait_tokens(30)
    (first,) = finals(migrate(a, "src", b.address, "dst", KV)).values()
    assert first.phase == pb.MIGRATION_PHASE_HANDED_OVER, first.message
    (second,) = finals(migrate(b, "dst", a.address, "src", TOKENS)).values()
    assert second.phase == pb.MIGRATION_PHASE_HANDED_OVER, second.message
    head = stream.join().chunks
    middle = attach(head[-1].handover)
    assert middle[-1].finish_reason == "migrated" and middle[-1].handover.address == a.address
    tail = attach(middle[-1].handover)
    assert tokens_of(head) + tokens_of(middle) + tokens_of(tail) == reference[prompt][0]
    assert text_of(head) + text_of(middle) + text_of(tail) == reference[prompt][1]


# ---- failures: the request is never lost -----------------------------------------------------------


def assert_stayed_and_completes(stream: Stream, final: pb.MigrateOutEvent, want: tuple[list[int], str]) -> None:
    assert final.phase == pb.MIGRATION_PHASE_STAYED, final
    stream.join()
    assert stream.error is None
    assert all(c.finish_reason != "migrated" for c in stream.chunks)
    assert stream.chunks[-1].finish_reason == "length"
    assert stream.tokens == want[0]
    assert text_of(stream.chunks) == want[1]


def test_a_refusing_destination_leaves_the_request_at_the_source(pair, reference, launch_worker, tmp_path,
                                                                 migration_hf_dir) -> None:
    a, b = pair
    prompt = PROMPTS[2]
    stream = Stream(a, gen_request("src", prompt, request_id=rid()))
    stream.wait_tokens(20)
    (final,) = finals(migrate(a, "src", b.address, "no-such-instance", KV)).values()
    assert "NOT_FOUND" in final.message and "no-such-instance" in final.message
    assert_stayed_and_completes(stream, final, reference[prompt])

    # An instance of another checkpoint is refused before anything is copied.
    from ember.ckpt_format import convert

    other = tmp_path / "other.ember"
    convert(migration_hf_dir, other)
    load(b, "other", other)
    try:
        stream = Stream(a, gen_request("src", prompt, request_id=rid()))
        stream.wait_tokens(20)
        (final,) = finals(migrate(a, "src", b.address, "other", TOKENS)).values()
        assert "FAILED_PRECONDITION" in final.message and "same deployment" in final.message
        assert final.bytes == 0
        assert_stayed_and_completes(stream, final, reference[prompt])
    finally:
        b.stub().Unload(pb.UnloadRequest(instance_id="other"), timeout=60)
    assert 'ember_worker_migrations_total{direction="out",mode="kv",outcome="stayed"}' in metrics_text(a)


def test_a_destination_that_dies_leaves_the_request_at_the_source(pair, reference, launch_worker,
                                                                  migration_checkpoint) -> None:
    a, _ = pair
    c = launch(launch_worker, migration_checkpoint, "dst")
    prompt = PROMPTS[3]
    stream = Stream(a, gen_request("src", prompt, request_id=rid()))
    stream.wait_tokens(20)
    os.kill(c.proc.pid, signal.SIGSTOP)  # the destination hangs: the source waits for its answer
    with futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(migrate, a, "src", c.address, "dst", KV)
        time.sleep(0.5)
        os.kill(c.proc.pid, signal.SIGKILL)
        (final,) = finals(pending.result(timeout=300)).values()
    c.proc.wait(timeout=30)
    assert "UNAVAILABLE" in final.message
    assert_stayed_and_completes(stream, final, reference[prompt])


@pytest.mark.parametrize("mode", [KV, TOKENS], ids=["kv", "tokens"])
def test_a_connection_cut_after_the_stop_resumes_at_the_source(pair, reference, mode) -> None:
    """The source already stopped the request when the destination became unreachable."""
    a, b = pair
    relay = Relay(b.address, at="commit", action="cut")
    try:
        prompt = PROMPTS[0]
        stream = Stream(a, gen_request("src", prompt, request_id=rid()))
        stream.wait_tokens(30)
        events = migrate(a, "src", relay.address, "dst", mode)
        (final,) = finals(events).values()
        assert relay.reached.is_set()
        assert "after the stop" in final.message and "resumed here" in final.message
        assert_stayed_and_completes(stream, final, reference[prompt])
    finally:
        relay.stop()
    # the destination dropped the half-received request: nothing runs there
    (dst,) = [i for i in b.stub().ListInstances(pb.ListInstancesRequest(), timeout=30).instances if i.id == "dst"]
    assert dst.active_requests == 0 and dst.queued_requests == 0


@pytest.mark.parametrize("held_at", ["commit", "accepted"])
def test_a_source_killed_mid_migration_restarts_from_the_clients_tokens(launch_worker, migration_checkpoint, pair,
                                                                        reference, held_at) -> None:
    """The source dies while the state is in flight: the client's tokens restart it on the destination."""
    _, b = pair
    source = launch(launch_worker, migration_checkpoint, "src")
    relay = Relay(b.address, at=held_at, action="hold")
    try:
        prompt = PROMPTS[1]
        request_id = rid()
        stream = Stream(source, gen_request("src", prompt, request_id=request_id))
        stream.wait_tokens(25)
        with futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(migrate, source, "src", relay.address, "dst", KV)
            assert relay.reached.wait(120), "the migration never reached the relay's hold point"
            source.proc.kill()
            source.proc.wait(timeout=30)
            with pytest.raises(grpc.RpcError):
                pending.result(timeout=120)
        stream.join()
        assert stream.error is not None and stream.error.code() == grpc.StatusCode.UNAVAILABLE
        received = list(stream.chunks)
        assert all(c.finish_reason == "" for c in received)

        # What the controller does: the original request again, continuing after what the client has.
        restart = gen_request("dst", prompt, request_id=request_id, continue_from=pb.Continuation(
            output_token_ids=tokens_of(received), text_emitted=text_of(received)))
        tail = list(b.stub().Generate(restart, timeout=300))
        assert tokens_of(received) + tokens_of(tail) == reference[prompt][0]
        assert text_of(received) + text_of(tail) == reference[prompt][1]
        assert tail[-1].completion_tokens == MAX_TOKENS
    finally:
        relay.stop()
    (dst,) = [i for i in b.stub().ListInstances(pb.ListInstancesRequest(), timeout=30).instances if i.id == "dst"]
    assert dst.active_requests == 0 and dst.queued_requests == 0


# ---- restarts and bad calls -------------------------------------------------------------------------


def test_continue_from_restarts_exactly_and_ends_a_complete_request(pair, reference) -> None:
    a, b = pair
    prompt = PROMPTS[2]
    want_tokens, want_text = reference[prompt]
    head = list(a.stub().Generate(gen_request("src", prompt, max_tokens=MAX_TOKENS), timeout=300))[:1]
    # the first chunk's tokens and text are what the client had when its source failed
    restart = gen_request("dst", prompt, continue_from=pb.Continuation(
        output_token_ids=tokens_of(head), text_emitted=text_of(head)))
    tail = list(b.stub().Generate(restart, timeout=300))
    assert tokens_of(head) + tokens_of(tail) == want_tokens and text_of(head) + text_of(tail) == want_text

    done = gen_request("dst", prompt, continue_from=pb.Continuation(output_token_ids=want_tokens,
                                                                    text_emitted=want_text))
    (end,) = list(b.stub().Generate(done, timeout=60))
    assert end.finish_reason == "length" and not end.token_ids and end.completion_tokens == MAX_TOKENS

    wrong_text = gen_request("dst", prompt, continue_from=pb.Continuation(output_token_ids=want_tokens[:5],
                                                                          text_emitted="not what was sent"))
    with pytest.raises(grpc.RpcError) as info:
        list(b.stub().Generate(wrong_text, timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "text already sent" in info.value.details()


def test_bad_migration_calls_are_refused_clearly(pair) -> None:
    a, b = pair
    stub = a.stub()

    def error(request: pb.MigrateOutRequest) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as info:
            list(stub.MigrateOut(request, timeout=60))
        return info.value

    err = error(pb.MigrateOutRequest(instance_id="nope", destination_address=b.address, destination_instance_id="d"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.details()
    err = error(pb.MigrateOutRequest(instance_id="src", destination_address="no-port", destination_instance_id="d"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "HOST:PORT" in err.details()
    err = error(pb.MigrateOutRequest(instance_id="src", destination_address=b.address))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "destination_instance_id" in err.details()
    err = error(pb.MigrateOutRequest(instance_id="src", destination_address=a.address, destination_instance_id="src"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "itself" in err.details()
    events = list(stub.MigrateOut(pb.MigrateOutRequest(instance_id="src", request_ids=["gone"],
                                                       destination_address=b.address, destination_instance_id="dst"),
                                  timeout=60))
    assert [(e.request_id, e.phase) for e in events] == [("gone", pb.MIGRATION_PHASE_FINISHED)]

    err = None
    with pytest.raises(grpc.RpcError) as info:
        list(b.stub().Generate(pb.GenerateRequest(instance_id="dst", resume_id="nope"), timeout=60))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "continue_from" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        list(b.stub().Generate(pb.GenerateRequest(instance_id="dst", resume_id="x", prompt="hi"), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # A MigrateIn that does not start with begin is refused.
    with pytest.raises(grpc.RpcError) as info:
        list(b.stub().MigrateIn(iter([pb.MigrateInMessage(kv=pb.KVChunk())]), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "begin" in info.value.details()
    status = b.stub().Inventory(pb.InventoryRequest(), timeout=30)
    assert status.migrations_in_flight == 0


def test_status_reports_the_cost_model_inputs(pair) -> None:
    """Heartbeats (the same NodeStatus as Inventory) carry what the scheduler's migration planner needs."""
    a, b = pair
    deadline = time.monotonic() + 120
    while True:
        statuses = [w.stub().Inventory(pb.InventoryRequest(), timeout=30) for w in (a, b)]
        instances = [i for s in statuses for i in s.instances if i.id in ("src", "dst")]
        measured = all(i.recompute_s_per_token > 0 for i in instances) and all(
            s.migration_net_gbps > 0 for s in statuses)
        if measured or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert measured, statuses
    for instance in instances:
        assert instance.kv_bytes_per_token == 2 * 2 * 16 * 2 * 4  # layers × kv heads × head dim × K,V × fp32
        assert instance.recompute_overhead_s >= 0
    assert all(s.migration_overhead_s >= 0 for s in statuses)
