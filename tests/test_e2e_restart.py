"""A restarted controller keeps its deployments and adopts running instances, with each state
store; a worker that dies is marked down and its instances are dropped. Real processes only."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from ember.api.client import ApiError, EmberClient

pytestmark = pytest.mark.timeout(600)


def wait_for(condition: Callable[[], object], what: str, timeout: float = 90.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(params=["sqlite", "redis"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'controller.db'}"
    return request.getfixturevalue("redis_server").rsplit("/", 1)[0] + "/40"


def test_restart_keeps_deployments_adopts_instances_and_a_dead_worker_goes_down(
    launch_controller, launch_worker, demo_checkpoint: Path, state_url: str
) -> None:
    controller = launch_controller(state=state_url, args=["--node-timeout", "4"])
    worker = launch_worker(args=["--controller", controller.grpc_address, "--node-id", "restart-node"])
    with EmberClient(controller.url) as client:
        wait_for(lambda: [n["state"] for n in client.list_nodes()] == ["up"], "worker registered")
        client.deploy("survivor", str(demo_checkpoint), keep_alive_s=600, max_instances=2)
        first = client.invoke("survivor", "Hello", max_tokens=4, temperature=0)
        assert first["cold_start"] is True

    controller.stop()
    controller.start()  # same ports, same store
    with EmberClient(controller.url) as client:
        d = client.get_deployment("survivor")
        assert (d["checkpoint"], d["keep_alive_s"], d["max_instances"]) == (str(demo_checkpoint.resolve()), 600, 2)
        # The worker's next heartbeat confirms the instance: it serves warm, no new cold start.
        wait_for(lambda: [(i["id"], i["state"]) for i in client.list_instances("survivor")] ==
                 [(first["instance"], "ready")], "instance adopted")
        warm = client.invoke("survivor", "Hello", max_tokens=4, temperature=0)
        assert warm["cold_start"] is False and warm["instance"] == first["instance"]
        assert warm["text"] == first["text"]

        worker.proc.kill()  # no goodbye: only missed heartbeats tell
        wait_for(lambda: [n["state"] for n in client.list_nodes()] == ["down"], "node marked down")
        assert client.list_instances("survivor") == []
        with pytest.raises(ApiError) as info:
            client.invoke("survivor", "Hello", max_tokens=4)
        assert info.value.status == 503 and "no worker node is up" in info.value.message
        assert "ember worker --controller" in info.value.message
        metrics = httpx.get(f"{controller.url}/metrics").text
        assert 'ember_controller_nodes{state="down"} 1.0' in metrics
    controller.stop()
