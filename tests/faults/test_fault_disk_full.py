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


def test_a_full_disk_while_caching_still_writes_through_to_dram(tiny_filesystem: Path, s3_server,
                                                                 demo_checkpoint: Path) -> None:
    """The same fault at the model store: the uncached copy is written through into the DRAM pool,
    so the load is a DRAM hit; releasing it frees the scratch copy and its pool entry."""
    import asyncio

    import boto3

    from ember.ckpt_format.reader import read_state_dict
    from ember.loader import DramPool, last_load_stats, load_state_dict
    from ember.worker.model_store import ModelStore

    bucket = f"disk-full-wt-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    for f in demo_checkpoint.iterdir():
        s3.upload_file(str(f), bucket, f"m/{f.name}")
    pool = DramPool(256 << 20, pin=False)
    store = ModelStore(tiny_filesystem.parent, 1 << 30, dram_pool=pool)

    located = asyncio.run(store.locate(f"s3://{bucket}/m"))
    assert located.tier == "s3" and not located.cached and located.path in pool
    out = load_state_dict(located.path, pool=pool)
    assert last_load_stats().tier == "dram"
    ref = read_state_dict(demo_checkpoint)
    assert all(out[k].equal(ref[k]) for k in ref)
    assert len(pool.contents()) == 1  # the failed attempt at caching left no entry or reservation

    store.release(located)
    assert not located.path.exists() and located.path not in pool and pool.used_bytes == 0
    assert all(out[k].equal(ref[k]) for k in ref)  # the live model keeps its weights
    assert shutil.disk_usage(tiny_filesystem).used < 64 << 10, list(tiny_filesystem.rglob("*"))
