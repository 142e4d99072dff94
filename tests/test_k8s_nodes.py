"""controller/k8s.py against the real `kubernetes` client and a stub API server on loopback.

The stub is of Kubernetes, not of Ember: it serves the two requests the module makes —
GET /api/v1/nodes (paged with limit/continue) and the same path with ?watch=true as a chunked
stream of JSON lines — with resourceVersions, history compaction (410 Gone) and disconnects, the
way the real API server behaves.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from ember.controller.k8s import KubernetesConfigError, NodeGpuInfo, NodeWatcher, api_client, gpu_inventory

WAIT_S = 20.0


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def node(name: str, *, gpus: int = 0, unschedulable: bool = False, labels: dict[str, str] | None = None) -> dict:
    obj: dict[str, Any] = {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
        "spec": {},
        "status": {"capacity": {"cpu": "64", "memory": "512Gi"}, "allocatable": {"cpu": "63", "memory": "500Gi"}},
    }
    if gpus:
        obj["status"]["capacity"]["nvidia.com/gpu"] = str(gpus)
        obj["status"]["allocatable"]["nvidia.com/gpu"] = str(gpus - 1 if gpus > 1 else gpus)
    if unschedulable:
        obj["spec"]["unschedulable"] = True
    return obj


class FakeApiServer:
    """Nodes, a resourceVersion counter, and the event history watches replay from."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.rv = 100
        self.nodes: dict[str, dict] = {}
        self.history: list[tuple[int, dict]] = []
        self.compacted_rv = 0  # a watch from an older resourceVersion gets 410 Gone
        self.generation = 0  # bumping it ends every open watch (as an API server restart would)
        self.open_watches = 0
        self.requests: list[dict[str, Any]] = []  # {"watch", "query", "auth"}
        self.fail_next_lists = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        with self.cond:
            self.generation += 1
            self.cond.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- cluster changes ---------------------------------------------------------------------

    def put(self, obj: dict, *, record: bool = True) -> None:
        with self.cond:
            self.rv += 1
            obj = json.loads(json.dumps(obj))
            obj["metadata"]["resourceVersion"] = str(self.rv)
            kind = "MODIFIED" if obj["metadata"]["name"] in self.nodes else "ADDED"
            self.nodes[obj["metadata"]["name"]] = obj
            if record:
                self.history.append((self.rv, {"type": kind, "object": obj}))
            self.cond.notify_all()

    def delete(self, name: str) -> None:
        with self.cond:
            self.rv += 1
            obj = self.nodes.pop(name)
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self.history.append((self.rv, {"type": "DELETED", "object": obj}))
            self.cond.notify_all()

    def set_unschedulable(self, name: str, flag: bool) -> None:
        obj = json.loads(json.dumps(self.nodes[name]))
        if flag:
            obj["spec"]["unschedulable"] = True
        else:
            obj["spec"].pop("unschedulable", None)
        self.put(obj)

    def bookmark(self) -> None:
        with self.cond:
            self.rv += 1
            self.history.append(
                (self.rv, {"type": "BOOKMARK", "object": {"kind": "Node", "apiVersion": "v1",
                                                          "metadata": {"resourceVersion": str(self.rv)}}})
            )
            self.cond.notify_all()

    def compact_and_disconnect(self, changes: Callable[[], None] = lambda: None) -> None:
        """Make `changes`, then forget history up to now and end open watches, all at once: open
        watches never see the changes, and re-watching from before them is 410 Gone."""
        with self.cond:  # an RLock: the changes take it again
            changes()
            self.compacted_rv = self.rv
            self.history.clear()
            self.generation += 1
            self.cond.notify_all()

    def watch_requests(self) -> list[dict[str, Any]]:
        with self.cond:
            return [r for r in self.requests if r["watch"]]

    def list_requests(self) -> list[dict[str, Any]]:
        with self.cond:
            return [r for r in self.requests if not r["watch"]]

    # -- HTTP --------------------------------------------------------------------------------

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        url = urlparse(req.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        watching = query.get("watch") == "true"
        with self.cond:
            self.requests.append({"watch": watching, "query": query, "auth": req.headers.get("Authorization")})
        if url.path != "/api/v1/nodes":
            self.send_json(req, 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                                      "reason": "NotFound", "message": f"{url.path} is not served by this stub"})
            return
        if watching:
            self.serve_watch(req, query)
        else:
            self.serve_list(req, query)

    @staticmethod
    def send_json(req: BaseHTTPRequestHandler, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)

    def serve_list(self, req: BaseHTTPRequestHandler, query: dict[str, str]) -> None:
        with self.cond:
            if self.fail_next_lists:
                self.fail_next_lists -= 1
                failing = True
            else:
                failing = False
                items = [self.nodes[name] for name in sorted(self.nodes)]
                rv = self.rv
        if failing:
            self.send_json(req, 500, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 500,
                                      "reason": "InternalError", "message": "etcdserver: leader changed"})
            return
        start = int(query.get("continue", "0"))
        limit = int(query.get("limit", "0")) or len(items)
        page = items[start:start + limit]
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if start + limit < len(items):
            meta["continue"] = str(start + limit)
        self.send_json(req, 200, {"kind": "NodeList", "apiVersion": "v1", "metadata": meta, "items": page})

    def serve_watch(self, req: BaseHTTPRequestHandler, query: dict[str, str]) -> None:
        since = int(query.get("resourceVersion") or 0)
        timeout_s = int(query.get("timeoutSeconds", "30"))
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Transfer-Encoding", "chunked")
        req.end_headers()

        def send(event: dict) -> None:
            data = (json.dumps(event) + "\n").encode()
            req.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            req.wfile.flush()

        deadline = time.monotonic() + timeout_s
        with self.cond:
            generation = self.generation
            self.open_watches += 1
        try:
            with self.cond:
                expired = since < self.compacted_rv
            if expired:
                send({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                  "message": f"too old resource version: {since}",
                                                  "reason": "Expired", "code": 410}})
            else:
                sent = since
                while True:
                    with self.cond:
                        pending = [(rv, e) for rv, e in self.history if rv > sent]
                        if not pending:
                            if self.generation != generation or time.monotonic() > deadline:
                                break
                            if client_gone(req):
                                return
                            self.cond.wait(0.05)
                            continue
                    for rv, event in pending:
                        send(event)
                        sent = rv
            req.wfile.write(b"0\r\n\r\n")
            req.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up (NodeWatcher.stop)
        finally:
            with self.cond:
                self.open_watches -= 1


def client_gone(req: BaseHTTPRequestHandler) -> bool:
    """True when the client closed its end (an idle chunked response would not notice)."""
    ready, _, _ = select.select([req.connection], [], [], 0)
    if not ready:
        return False
    try:
        return req.connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


@pytest.fixture
def apiserver() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    yield server
    server.close()


class Recorder:
    """Callback pair that records (event, node) in order and can be told to fail."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.fail_on: set[str] = set()

    def cordoned(self, name: str) -> None:
        with self.lock:
            self.events.append(("cordoned", name))
        if name in self.fail_on:
            raise RuntimeError(f"drain of {name} failed")

    def uncordoned(self, name: str) -> None:
        with self.lock:
            self.events.append(("uncordoned", name))

    def snapshot(self) -> list[tuple[str, str]]:
        with self.lock:
            return list(self.events)


def start_watcher(apiserver: FakeApiServer, recorder: Recorder, **kwargs: Any) -> NodeWatcher:
    watcher = NodeWatcher(api_client(host=apiserver.url), recorder.cordoned, recorder.uncordoned,
                          retry_delay_s=0.05, **kwargs)
    watcher.start()
    assert watcher.wait_synced(WAIT_S), "the first list never completed"
    return watcher


# ---- gpu_inventory -------------------------------------------------------------------------------


def test_gpu_inventory_reads_capacity_allocatable_and_gpu_labels_across_pages(apiserver: FakeApiServer) -> None:
    apiserver.put(node("gpu-a", gpus=8, labels={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                                                "nvidia.com/gpu.memory": "81559", "topology.kubernetes.io/zone": "z1"}))
    apiserver.put(node("gpu-b", gpus=1, unschedulable=True, labels={"nvidia.com/gpu.product": "NVIDIA-L4"}))
    apiserver.put(node("cpu-c"))

    inventory = gpu_inventory(api_client(host=apiserver.url), page_size=2)

    assert inventory == {
        "gpu-a": NodeGpuInfo(8, 7, {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.memory": "81559"}),
        "gpu-b": NodeGpuInfo(1, 1, {"nvidia.com/gpu.product": "NVIDIA-L4"}, unschedulable=True),
        "cpu-c": NodeGpuInfo(0, 0, {}),
    }
    pages = apiserver.list_requests()
    assert [r["query"].get("continue") for r in pages] == [None, "2"], "the list must follow continue tokens"
    assert all(r["query"]["limit"] == "2" for r in pages)


def test_api_client_sends_the_bearer_token(apiserver: FakeApiServer) -> None:
    gpu_inventory(api_client(host=apiserver.url, token="s3cr3t"))
    assert apiserver.list_requests()[-1]["auth"] == "Bearer s3cr3t"


def test_api_client_reads_a_kubeconfig(apiserver: FakeApiServer, tmp_path: Path) -> None:
    apiserver.put(node("gpu-a", gpus=2))
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "stub",
        "clusters": [{"name": "stub", "cluster": {"server": apiserver.url}}],
        "users": [{"name": "u", "user": {"token": "from-kubeconfig"}}],
        "contexts": [{"name": "stub", "context": {"cluster": "stub", "user": "u"}}],
    }))
    assert gpu_inventory(api_client(kubeconfig))["gpu-a"].capacity_gpus == 2
    assert apiserver.list_requests()[-1]["auth"] == "Bearer from-kubeconfig"


def test_api_client_explains_a_missing_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KubernetesConfigError, match="does not exist"):
        api_client(tmp_path / "nope")
    # In a pod without a mounted service-account token:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(KubernetesConfigError) as err:
        api_client()
    assert "service account" in (err.value.hint or "")
    # Outside a pod with no kubeconfig:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(KubernetesConfigError, match="cannot configure the Kubernetes client"):
        api_client()


# ---- NodeWatcher ---------------------------------------------------------------------------------


def test_watcher_reports_cordons_from_the_list_and_the_watch(apiserver: FakeApiServer) -> None:
    apiserver.put(node("gpu-a", gpus=8, unschedulable=True))  # cordoned before the controller started
    apiserver.put(node("gpu-b", gpus=8))
    apiserver.put(node("gpu-c", gpus=8))
    list_rv = str(apiserver.rv)
    recorder = Recorder()
    watcher = start_watcher(apiserver, recorder)
    try:
        assert recorder.snapshot() == [("cordoned", "gpu-a")]
        wait_for(lambda: len(apiserver.watch_requests()) == 1, "the watch request")
        first_watch = apiserver.watch_requests()[0]["query"]
        assert first_watch["resourceVersion"] == list_rv, "the watch must start where the list ended"
        assert first_watch["allowWatchBookmarks"] == "true"

        apiserver.set_unschedulable("gpu-b", True)
        apiserver.set_unschedulable("gpu-a", False)
        b = json.loads(json.dumps(apiserver.nodes["gpu-b"]))
        b["metadata"]["labels"]["team"] = "infra"  # still cordoned: no second report
        apiserver.put(b)
        apiserver.put(node("gpu-d", gpus=8, unschedulable=True))  # joins cordoned
        apiserver.delete("gpu-c")
        wait_for(lambda: watcher.resource_version == str(apiserver.rv), "the watcher to catch up")

        assert recorder.snapshot() == [
            ("cordoned", "gpu-a"), ("cordoned", "gpu-b"), ("uncordoned", "gpu-a"), ("cordoned", "gpu-d"),
        ]
        assert watcher.cordoned == {"gpu-b", "gpu-d"}
    finally:
        watcher.stop()
    assert not watcher.running


def test_watcher_resumes_from_the_last_resource_version_after_the_server_ends_a_watch(apiserver: FakeApiServer) -> None:
    apiserver.put(node("gpu-a", gpus=8))
    recorder = Recorder()
    watcher = start_watcher(apiserver, recorder, watch_timeout_s=1)  # the stub ends each watch after 1 s
    try:
        apiserver.bookmark()
        wait_for(lambda: watcher.resource_version == str(apiserver.rv), "the bookmark")
        bookmark_rv = watcher.resource_version
        wait_for(lambda: any(r["query"]["resourceVersion"] == bookmark_rv for r in apiserver.watch_requests()),
                 "a new watch from the bookmark's resourceVersion")
        apiserver.set_unschedulable("gpu-a", True)
        wait_for(lambda: recorder.snapshot() == [("cordoned", "gpu-a")], "the cordon")
        assert len(apiserver.list_requests()) == 1, "a watch that ends normally resumes without relisting"
        assert all(r["query"]["timeoutSeconds"] == "1" for r in apiserver.watch_requests())
    finally:
        watcher.stop()


def test_watcher_relists_after_410_gone_and_reports_what_it_missed(apiserver: FakeApiServer) -> None:
    apiserver.put(node("gpu-a", gpus=8))
    apiserver.put(node("gpu-b", gpus=8, unschedulable=True))
    recorder = Recorder()
    watcher = start_watcher(apiserver, recorder)
    try:
        wait_for(lambda: apiserver.open_watches == 1, "the watch")
        stale_rv = watcher.resource_version

        def changes() -> None:  # made while the watch is down, then compacted away by etcd
            apiserver.set_unschedulable("gpu-a", True)
            apiserver.set_unschedulable("gpu-b", False)

        apiserver.compact_and_disconnect(changes)

        wait_for(lambda: len(apiserver.list_requests()) == 2, "the relist after 410")
        wait_for(lambda: len(recorder.snapshot()) == 3, "the missed transitions")
        assert sorted(recorder.snapshot()[1:]) == [("cordoned", "gpu-a"), ("uncordoned", "gpu-b")]
        wait_for(lambda: apiserver.watch_requests()[-1]["query"]["resourceVersion"] == str(apiserver.rv),
                 "a watch from the relist's resourceVersion")
        assert any(r["query"]["resourceVersion"] == stale_rv for r in apiserver.watch_requests()[1:]), (
            "the watcher should first have tried to resume from its last resourceVersion"
        )
        apiserver.set_unschedulable("gpu-b", True)
        wait_for(lambda: recorder.snapshot()[-1] == ("cordoned", "gpu-b"), "events after the relist")
    finally:
        watcher.stop()


def test_watcher_retries_when_the_api_server_fails(apiserver: FakeApiServer) -> None:
    apiserver.put(node("gpu-a", gpus=8, unschedulable=True))
    apiserver.fail_next_lists = 2
    recorder = Recorder()
    watcher = start_watcher(apiserver, recorder)
    try:
        assert len(apiserver.list_requests()) == 3
        assert recorder.snapshot() == [("cordoned", "gpu-a")]
    finally:
        watcher.stop()


def test_a_failing_callback_does_not_stop_the_watch(apiserver: FakeApiServer) -> None:
    apiserver.put(node("gpu-a", gpus=8))
    apiserver.put(node("gpu-b", gpus=8))
    recorder = Recorder()
    recorder.fail_on.add("gpu-a")
    watcher = start_watcher(apiserver, recorder)
    try:
        apiserver.set_unschedulable("gpu-a", True)
        apiserver.set_unschedulable("gpu-b", True)
        wait_for(lambda: recorder.snapshot() == [("cordoned", "gpu-a"), ("cordoned", "gpu-b")], "both cordons")
        assert watcher.running
    finally:
        watcher.stop()


def test_stop_cuts_an_idle_watch(apiserver: FakeApiServer) -> None:
    apiserver.put(node("gpu-a", gpus=8))
    watcher = start_watcher(apiserver, Recorder(), watch_timeout_s=3600)
    wait_for(lambda: apiserver.open_watches == 1, "the watch")
    watcher.stop(timeout_s=WAIT_S)
    assert not watcher.running, "stop() must not wait for the server to end the watch"
    wait_for(lambda: apiserver.open_watches == 0, "the server to see the connection close")


def test_async_callbacks_run_on_the_event_loop(apiserver: FakeApiServer) -> None:
    apiserver.put(node("gpu-a", gpus=8))

    async def scenario() -> list[tuple[str, str, bool]]:
        loop_thread = threading.current_thread()
        seen: list[tuple[str, str, bool]] = []
        cordoned = asyncio.Event()
        done = asyncio.Event()

        async def on_cordoned(name: str) -> None:
            await asyncio.sleep(0)
            seen.append(("cordoned", name, threading.current_thread() is loop_thread))
            cordoned.set()

        def on_uncordoned(name: str) -> None:  # sync callbacks also run on the loop when there is one
            seen.append(("uncordoned", name, threading.current_thread() is loop_thread))
            done.set()

        watcher = NodeWatcher(api_client(host=apiserver.url), on_cordoned, on_uncordoned, retry_delay_s=0.05)
        watcher.start()  # picks up the running loop
        try:
            await asyncio.to_thread(watcher.wait_synced, WAIT_S)
            await asyncio.to_thread(apiserver.set_unschedulable, "gpu-a", True)
            await asyncio.wait_for(cordoned.wait(), WAIT_S)
            await asyncio.to_thread(apiserver.set_unschedulable, "gpu-a", False)
            await asyncio.wait_for(done.wait(), WAIT_S)
        finally:
            await asyncio.to_thread(watcher.stop)
        return seen

    assert asyncio.run(scenario()) == [("cordoned", "gpu-a", True), ("uncordoned", "gpu-a", True)]


def test_an_async_callback_without_a_loop_is_refused(apiserver: FakeApiServer) -> None:
    async def on_cordoned(name: str) -> None:
        pass

    watcher = NodeWatcher(api_client(host=apiserver.url), on_cordoned)
    with pytest.raises(ValueError, match="coroutine function"):
        watcher.start()
