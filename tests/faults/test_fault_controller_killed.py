"""The controller is SIGKILLed while a cold start is in flight, then restarted on the same store:
the client's request ends (never hangs), and the restarted controller has its deployments back,
re-registers the worker, reconciles the instance that was loading and serves requests again."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from pathlib import Path

import httpx
from conftest import AUTH_HEADERS
from s3_fault_proxy import S3FaultProxy


def wait_for(condition, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_controller_killed_mid_cold_start_recovers(launch_controller, launch_worker, s3_server,
                                                   demo_checkpoint: Path, tmp_path: Path) -> None:
    import boto3

    bucket = f"ctl-kill-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    for f in demo_checkpoint.iterdir():
        s3.upload_file(str(f), bucket, f"m/{f.name}")
    with S3FaultProxy(s3_server) as proxy:
        controller = launch_controller(state=f"sqlite:///{tmp_path / 'state.db'}", args=["--node-timeout", "6"])
        launch_worker(args=["--controller", controller.grpc_address, "--node-id", "ctl-kill"],
                      env={"AWS_ENDPOINT_URL": proxy.url})
        client = httpx.Client(base_url=controller.url, headers=AUTH_HEADERS, timeout=httpx.Timeout(120, connect=5))
        with client as c:
            wait_for(lambda: [n for n in c.get("/v1/nodes").json()["data"] if n["state"] == "up"], "the worker")
            r = c.post("/v1/deployments", json={"name": "slow", "checkpoint": f"s3://{bucket}/m", "max_instances": 1,
                                                "keep_alive_s": 600})
            assert r.status_code == 201, r.text
            proxy.faults.delay_s = 1.0  # every S3 request takes a second: the cold start lasts a while

            outcome: dict = {}

            def invoke() -> None:
                try:
                    with httpx.Client(base_url=controller.url, headers=AUTH_HEADERS, timeout=120) as own:
                        outcome["response"] = own.post("/functions/slow/invoke", json={"prompt": "Hi", "max_tokens": 3})
                except httpx.HTTPError as exc:
                    outcome["error"] = exc

            caller = threading.Thread(target=invoke)
            caller.start()
            wait_for(lambda: c.get("/v1/instances", params={"deployment": "slow"}).json()["data"],
                     "the cold start to begin")
            controller.proc.send_signal(signal.SIGKILL)
            controller.proc.wait(timeout=10)
            caller.join(timeout=30)
            assert not caller.is_alive(), "the accepted request hung after the controller died"
            if "response" in outcome:  # it completed before the kill landed, or failed with a clear 5xx
                response = outcome["response"]
                assert response.status_code == 200 or response.json()["error"]["message"], response.text
            else:  # the connection dropped: a transport error the client can retry
                assert isinstance(outcome["error"], (httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError))

        proxy.faults.delay_s = 0.0
        controller.start()
        with httpx.Client(base_url=controller.url, headers=AUTH_HEADERS, timeout=180) as c:
            assert [d["name"] for d in c.get("/v1/deployments").json()["data"]] == ["slow"]
            wait_for(lambda: [n for n in c.get("/v1/nodes").json()["data"] if n["state"] == "up"],
                     "the worker to re-register")
            r = c.post("/functions/slow/invoke", json={"prompt": "Hi", "max_tokens": 3})
            assert r.status_code == 200, r.text
            # One instance (max_instances=1): the load from before the kill was adopted or replaced, not doubled.
            instances = wait_for(lambda: [i for i in c.get("/v1/instances", params={"deployment": "slow"})
                                          .json()["data"] if i["state"] != "stopped"], "the instances")
            assert [i["state"] for i in instances] == ["ready"], instances
