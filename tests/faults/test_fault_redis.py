"""Redis (the cluster state store) dies under a running cluster: warm traffic keeps flowing, calls
that need the store fail clearly with 503, and everything works again once Redis is back."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import AUTH_HEADERS, free_port


class Redis:
    """A redis-server of this test's own (the session one must not die), persisted with an AOF so a
    restart on the same port comes back with the same data."""

    def __init__(self, workdir: Path) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.fail("redis-server is not on PATH: run `make services`")
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Redis:
        with open(self.workdir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                          "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


def wait_for(condition, what: str, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_redis_outage_keeps_warm_traffic_and_fails_admin_calls_clearly(launch_controller, launch_worker,
                                                                     demo_checkpoint: Path, tmp_path: Path) -> None:
    redis = Redis(tmp_path).start()
    try:
        controller = launch_controller(state=redis.url, args=["--node-timeout", "6"])
        launch_worker(args=["--controller", controller.grpc_address, "--node-id", "redis-fault"])
        with httpx.Client(base_url=controller.url, headers=AUTH_HEADERS, timeout=120) as c:
            wait_for(lambda: [n for n in c.get("/v1/nodes").json()["data"] if n["state"] == "up"], "the worker")
            r = c.post("/v1/deployments", json={"name": "warm", "checkpoint": str(demo_checkpoint),
                                                "keep_alive_s": 600})
            assert r.status_code == 201, r.text
            r = c.post("/v1/keys", json={"name": "app", "scope": "invoke"})
            app_key = r.json()["key"]

            def invoke(key: str | None = None) -> httpx.Response:
                headers = {"authorization": f"Bearer {key}"} if key else {}
                return c.post("/functions/warm/invoke", json={"prompt": "Hello", "max_tokens": 4}, headers=headers)

            assert invoke().status_code == 200  # cold start while Redis is up
            assert invoke(app_key).status_code == 200  # the key is now cached by the controller

            redis.kill()
            # Beyond the node timeout: heartbeats that cannot be persisted must still keep the node up.
            outage_end = time.monotonic() + 8
            while time.monotonic() < outage_end:
                r = invoke()
                assert r.status_code == 200, r.text
                assert invoke(app_key).status_code == 200
                time.sleep(0.5)
            r = c.post("/v1/deployments", json={"name": "new", "checkpoint": str(demo_checkpoint)})
            assert r.status_code == 503, r.text
            err = r.json()["error"]
            assert err["code"] == "state_store_unavailable" and "Redis" in err["message"]
            assert c.get("/readyz").status_code == 503
            assert c.post("/v1/keys", json={"name": "other"}).status_code == 503

            redis.start()
            wait_for(lambda: c.get("/readyz").status_code == 200, "ready again")
            r = c.post("/v1/deployments", json={"name": "new", "checkpoint": str(demo_checkpoint)})
            assert r.status_code == 201, r.text
            assert invoke().status_code == 200
            assert {d["name"] for d in c.get("/v1/deployments").json()["data"]} == {"warm", "new"}
    finally:
        if redis.proc is not None and redis.proc.poll() is None:
            redis.kill()
