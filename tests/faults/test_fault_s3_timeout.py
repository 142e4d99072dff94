"""S3 that stops talking (a proxy in front of moto injects it): a request accepted and never
answered, or an answer whose body stalls after its first bytes. Transient silences are retried
(botocore retries the request; the worker resumes a stalled range from the last byte written)
and the checkpoint arrives byte for byte; a store that stays silent gives a clear error naming
the bucket/key and the setting to raise, after the bounded timeouts, never a hang."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from conftest import AUTH_HEADERS, upload_checkpoint
from s3_fault_proxy import S3FaultProxy

from ember.worker.s3_source import S3Settings, S3Source
from ember.worker.store_errors import StoreError

pytestmark = pytest.mark.timeout(240)

PART = "part-00000.bin"
# Timeouts in tests are short, so a silent store costs little; transient cases leave room for a
# loaded machine (a spurious timeout is one more retry, not a failure).
TRANSIENT = S3Settings(connect_timeout_s=2.0, read_timeout_s=1.0, max_attempts=5)
PERSISTENT = S3Settings(connect_timeout_s=2.0, read_timeout_s=0.5, max_attempts=3)


@pytest.fixture
def proxy(s3_server: str, monkeypatch: pytest.MonkeyPatch):
    """The fault proxy, with this process's boto3 clients pointed at it (uploads go direct)."""
    with S3FaultProxy(s3_server) as p:
        yield p, lambda: monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)


def assert_same_files(src: Path, dest: Path) -> None:
    for f in src.iterdir():
        assert (dest / f.name).read_bytes() == f.read_bytes(), f.name


def test_requests_left_unanswered_are_retried_and_the_fetch_is_exact(proxy, demo_checkpoint: Path,
                                                                     tmp_path: Path) -> None:
    p, through_proxy = proxy
    location = upload_checkpoint(demo_checkpoint)
    through_proxy()
    source = S3Source(threads=2, part_bytes=4 << 20, settings=TRANSIENT)
    plan = source.plan(location)
    p.faults.hang_next = 2
    stats = source.fetch(location, tmp_path / "out", plan=plan)
    assert_same_files(demo_checkpoint, tmp_path / "out")
    assert stats.bytes == plan.total_bytes
    assert p.faults.hung == 2


def test_a_body_that_stalls_mid_stream_is_resumed_from_the_last_byte_written(proxy, demo_checkpoint: Path,
                                                                             tmp_path: Path) -> None:
    p, through_proxy = proxy
    location = upload_checkpoint(demo_checkpoint)
    through_proxy()
    source = S3Source(threads=2, part_bytes=4 << 20, settings=TRANSIENT)
    plan = source.plan(location)
    # 1.5 MiB arrive, then silence: the first 1 MiB read is written, the second times out.
    p.faults.stall_after = 3 << 19
    p.faults.stall_next = 2
    seen: list[int] = []
    stats = source.fetch(location, tmp_path / "out", lambda done, total: seen.append(done), plan=plan)
    assert_same_files(demo_checkpoint, tmp_path / "out")
    assert p.faults.stalled == 2 and stats.bytes == plan.total_bytes
    # Bytes that arrived before a stall are counted once: progress ends exactly at the total.
    assert max(seen) == plan.total_bytes
    # The retries asked only for what was missing: ranges that start inside a 4 MiB part.
    starts = [int(r.removeprefix("bytes=").split("-")[0]) for r in p.faults.ranges]
    assert any(start % (4 << 20) for start in starts), p.faults.ranges


def test_a_store_that_never_answers_fails_with_a_clear_error(proxy, demo_checkpoint: Path, tmp_path: Path) -> None:
    p, through_proxy = proxy
    location = upload_checkpoint(demo_checkpoint)
    through_proxy()
    source = S3Source(threads=2, part_bytes=4 << 20, settings=PERSISTENT)
    plan = source.plan(location)
    p.faults.hang_all = True
    with pytest.raises(StoreError) as info:
        source.fetch(location, tmp_path / "out", plan=plan)
    message = info.value.full_message()
    assert "timed out" in message and f"s3://{location.bucket}/m/{PART}" in message, message
    assert "3 attempt" in message and "EMBER_S3_READ_TIMEOUT" in message, message
    assert p.faults.hung >= PERSISTENT.max_attempts  # botocore retried before giving up


def test_a_body_that_keeps_stalling_fails_with_a_clear_error(proxy, demo_checkpoint: Path, tmp_path: Path) -> None:
    p, through_proxy = proxy
    location = upload_checkpoint(demo_checkpoint)
    through_proxy()
    source = S3Source(threads=1, part_bytes=16 << 20, settings=PERSISTENT)
    plan = source.plan(location)
    p.faults.stall_all = True
    with pytest.raises(StoreError) as info:
        source.fetch(location, tmp_path / "out", plan=plan)
    message = info.value.full_message()
    assert f"s3://{location.bucket}/m/{PART}" in message, message
    assert "timed out" in message and "each of 3 attempts" in message, message
    assert "--s3-read-timeout" in message and "EMBER_S3_READ_TIMEOUT" in message, message
    assert p.faults.stalled == PERSISTENT.max_attempts  # one range, tried exactly max_attempts times


def test_a_silent_store_fails_the_plan_clearly(proxy, demo_checkpoint: Path) -> None:
    p, through_proxy = proxy
    location = upload_checkpoint(demo_checkpoint)
    through_proxy()
    p.faults.match_all = True  # the listing and the index hang too
    p.faults.hang_all = True
    with pytest.raises(StoreError) as info:
        S3Source(settings=PERSISTENT).plan(location)
    message = info.value.full_message()
    assert "timed out" in message and location.bucket in message and "EMBER_S3_READ_TIMEOUT" in message, message
    assert p.faults.hung == PERSISTENT.max_attempts  # the listing, tried max_attempts times in all


def test_the_controllers_deploy_check_is_bounded_too(proxy, demo_checkpoint: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from ember.controller import registry
    from ember.controller.errors import InvalidCheckpoint

    p, through_proxy = proxy
    location = upload_checkpoint(demo_checkpoint)
    through_proxy()
    # Its real bounds (5 s connect, 10 s read, 3 attempts) are fine but slow for a test.
    monkeypatch.setattr(registry, "S3_READ_TIMEOUT_S", 0.5)
    p.faults.match_all = True
    p.faults.hang_next = 2  # transient: the retries hide it
    assert registry.check_checkpoint(str(location)).size_bytes > 0
    assert p.faults.hung == 2
    p.faults.hang_all = True
    with pytest.raises(InvalidCheckpoint) as info:
        registry.check_checkpoint(str(location))
    assert "cannot reach S3" in str(info.value) and f"{location.bucket}/m/ember.json" in str(info.value)
    assert p.faults.hung == 2 + registry.S3_MAX_ATTEMPTS  # its first request, tried S3_MAX_ATTEMPTS times


def wait_for(condition, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_worker_rides_out_stalls_and_reports_a_silent_store(launch_controller, launch_worker, s3_server,
                                                              demo_checkpoint: Path) -> None:
    uri, other_uri = str(upload_checkpoint(demo_checkpoint)), str(upload_checkpoint(demo_checkpoint))
    with S3FaultProxy(s3_server) as p:
        controller = launch_controller(args=["--node-timeout", "10"])
        # The timeout comes from the environment, as a Helm chart or `ember serve` would pass it.
        launch_worker(args=["--controller", controller.grpc_address, "--node-id", "s3-silent"],
                      env={"AWS_ENDPOINT_URL": p.url, "EMBER_S3_READ_TIMEOUT": "2", "EMBER_S3_MAX_ATTEMPTS": "3"})
        with httpx.Client(base_url=controller.url, headers=AUTH_HEADERS, timeout=180) as c:
            wait_for(lambda: [n for n in c.get("/v1/nodes").json()["data"] if n["state"] == "up"], "the worker")
            p.faults.stall_after = 3 << 19
            p.faults.stall_next = 2
            assert c.post("/v1/deployments", json={"name": "stalls", "checkpoint": uri}).status_code == 201
            r = c.post("/functions/stalls/invoke", json={"prompt": "Hello", "max_tokens": 4})
            assert r.status_code == 200, r.text
            assert r.json()["cold_start"] and p.faults.stalled == 2

            p.faults.stall_all = True
            assert c.post("/v1/deployments", json={"name": "silent", "checkpoint": other_uri}).status_code == 201
            r = c.post("/functions/silent/invoke", json={"prompt": "Hello", "max_tokens": 4})
            assert r.status_code in (502, 503), r.text
            message = r.json()["error"]["message"]
            assert "timed out" in message and "EMBER_S3_READ_TIMEOUT" in message and PART in message, message
            assert "stalled for 2 s" in message, message  # the worker took its timeout from the environment
            p.faults.stall_all = False
            assert c.post("/functions/stalls/invoke", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
