"""The disk cache's filesystem fills up while a checkpoint streams in from S3 (a real ENOSPC: a
2 MiB tmpfs under an 8 MiB model): the cache entry is dropped and the load goes on uncached."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import AUTH_HEADERS


def wait_for(condition, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def tiny_filesystem(tmp_path: Path):
    mountpoint = tmp_path / "cache" / "disk"
    mountpoint.mkdir(parents=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a size-limited tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_a_full_disk_while_caching_drops_the_entry_and_the_load_goes_on(
        tiny_filesystem: Path, launch_controller, launch_worker, s3_server, demo_checkpoint: Path) -> None:
    import boto3

    size = sum(f.stat().st_size for f in demo_checkpoint.iterdir())
    assert size > shutil.disk_usage(tiny_filesystem).total, "the model must not fit on the tmpfs"
    bucket = f"disk-full-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    for f in demo_checkpoint.iterdir():
        s3.upload_file(str(f), bucket, f"m/{f.name}")

    controller = launch_controller(args=["--node-timeout", "10"])
    # The cache believes it has 1 GB; the filesystem under it has 2 MiB.
    worker = launch_worker(cache_dir=tiny_filesystem.parent,
                           args=["--controller", controller.grpc_address, "--node-id", "disk-full",
                                 "--disk-cache-gb", "1"])
    with httpx.Client(base_url=controller.url, headers=AUTH_HEADERS, timeout=180) as c:
        wait_for(lambda: [n for n in c.get("/v1/nodes").json()["data"] if n["state"] == "up"], "the worker")
        assert c.post("/v1/deployments", json={"name": "big", "checkpoint": f"s3://{bucket}/m"}).status_code == 201
        r = c.post("/functions/big/invoke", json={"prompt": "Hello", "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert r.json()["cold_start"] and r.json()["usage"]["completion_tokens"] == 4
        (instance,) = c.get("/v1/instances", params={"deployment": "big"}).json()["data"]
        assert instance["source_tier"] == "s3"
    # Nothing half-written is left on the full filesystem, nothing uncached is left in memory.
    assert shutil.disk_usage(tiny_filesystem).used < 64 << 10, list(tiny_filesystem.rglob("*"))
    assert not list(Path("/dev/shm").glob("ember-uncached-*"))
    assert "entry dropped, loading it uncached" in worker.log()
