"""S3 faults between a worker and its object store (a proxy in front of moto injects them): transient
503s are retried with backoff and the cold start succeeds; an S3 that keeps failing gives the
client a clear error naming S3, and nothing hangs."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from conftest import AUTH_HEADERS, upload_checkpoint
from s3_fault_proxy import S3FaultProxy


def wait_for(condition, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_s3_errors_are_retried_then_reported_clearly(launch_controller, launch_worker, s3_server,
                                                     demo_checkpoint: Path) -> None:
    uri, other_uri = str(upload_checkpoint(demo_checkpoint)), str(upload_checkpoint(demo_checkpoint))
    with S3FaultProxy(s3_server) as proxy:
        controller = launch_controller(args=["--node-timeout", "10"])
        launch_worker(args=["--controller", controller.grpc_address, "--node-id", "s3-fault"],
                      env={"AWS_ENDPOINT_URL": proxy.url})
        with httpx.Client(base_url=controller.url, headers=AUTH_HEADERS, timeout=180) as c:
            wait_for(lambda: [n for n in c.get("/v1/nodes").json()["data"] if n["state"] == "up"], "the worker")
            # Transient: two 503 SlowDown answers, then S3 behaves. The retries hide them.
            proxy.faults.fail_next = 2
            assert c.post("/v1/deployments", json={"name": "flaky", "checkpoint": uri}).status_code == 201
            r = c.post("/functions/flaky/invoke", json={"prompt": "Hello", "max_tokens": 4})
            assert r.status_code == 200, r.text
            assert r.json()["cold_start"] and proxy.faults.failed == 2

            # Persistent: every read of the weights fails (another copy: the first is cached on disk now).
            proxy.faults.fail_all = True
            assert c.post("/v1/deployments", json={"name": "broken", "checkpoint": other_uri}).status_code == 201
            # It must answer, not hang: the client's 180 s timeout would raise here.
            r = c.post("/functions/broken/invoke", json={"prompt": "Hello", "max_tokens": 4})
            assert r.status_code in (502, 503), r.text
            message = r.json()["error"]["message"]
            assert "S3" in message or "SlowDown" in message or "503" in message, message
            assert proxy.faults.failed > 2  # it did retry before giving up
            failed = proxy.faults.failed
            proxy.faults.fail_all = False
            # The cluster is fine afterwards: the healthy deployment still answers.
            assert c.post("/functions/flaky/invoke", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
            assert failed >= 3
